"""`abq keda plan`: KEDA's Kafka scaler rules on table-driven cases, and live lag from a real broker.

The expected values follow KEDA's pkg/scalers/kafka_scaler.go (kedacore/keda main at 8b4f083,
v2.20.x: getLagForPartition, getTotalLag) and its docs (scalers/apache-kafka.md), and the HPA's
replica calculator (kubernetes pkg/controller/podautoscaler/replica_calculator.go):
  - an uncommitted partition (offset -1) counts 1 under offsetResetPolicy latest and its whole log
    under earliest, 0 with scaleToZeroOnInvalidOffset;
  - excludePersistentLag drops a partition whose committed offset did not move since the last
    poll from the metric, but not from activation;
  - unless allowIdleConsumers, the metric is capped at partitions x lagThreshold when
    lag / lagThreshold (integer division) exceeds the partitions; limitToPartitionsWithLag caps at
    the partitions that have lag; ensureEvenDistributionOfPartitions rounds up to a divisor;
  - active when the lag (persistent included) is strictly above activationLagThreshold;
  - the HPA wants ceil(metric / lagThreshold), keeps the current count within 10%, clamps to
    [max(min, 1), max]; inactive with minReplicas 0 means zero.
"""

import json
import subprocess

import pytest
from conftest import REPO, abq_cmd, new_experiment
from kafka import KafkaProducer
from kafka.structs import OffsetAndMetadata, TopicPartition

from abqueue.kafka import consumer, ensure_topics
from abqueue.scaling.kafka_scaler import TriggerError
from abqueue.scaling.plan import plan_situation, read_situation

P = lambda latest, committed=-1, prev=None: {"latest": latest, "committed": committed, "previous_committed": prev}  # noqa: E731

CASES = [
    # name, trigger metadata, min, max, partitions, (lag_metric, active, desired)
    ("plain lag", {"lagThreshold": 10}, 0, 10, [P(30, 10), P(15, 10), P(7, 7)], (25, True, 3)),
    ("no commits, latest: 1 per partition", {"offsetResetPolicy": "latest"}, 0, 5, [P(100), P(50), P(0)], (3, True, 1)),
    (
        "no commits, earliest: the whole log",
        {"offsetResetPolicy": "earliest", "lagThreshold": 10},
        0,
        10,
        [P(100), P(50), P(0)],
        (30, True, 3),
    ),
    (
        "no commits, scaleToZeroOnInvalidOffset",
        {"offsetResetPolicy": "earliest", "scaleToZeroOnInvalidOffset": "true"},
        0,
        5,
        [P(100), P(50)],
        (0, False, 0),
    ),
    ("capped at partitions", {"lagThreshold": 10}, 0, 20, [P(500, 0), P(500, 0), P(500, 0)], (30, True, 3)),
    ("integer division leaves 39 uncapped", {"lagThreshold": 10}, 0, 20, [P(13, 0), P(13, 0), P(13, 0)], (39, True, 4)),
    (
        "allowIdleConsumers: no cap",
        {"lagThreshold": 10, "allowIdleConsumers": "true"},
        0,
        20,
        [P(500, 0), P(500, 0)],
        (1000, True, 20),
    ),
    (
        "limitToPartitionsWithLag",
        {"lagThreshold": 10, "limitToPartitionsWithLag": "true"},
        0,
        20,
        [P(500, 0), P(5, 5), P(5, 5)],
        (10, True, 1),
    ),
    (
        "ensureEvenDistribution rounds to a divisor",
        {"lagThreshold": 10, "ensureEvenDistributionOfPartitions": "true"},
        0,
        20,
        [P(9, 0), P(9, 0), P(9, 0), P(8, 0), P(0, 0), P(0, 0)],
        (60, True, 6),
    ),
    (
        "ensureEvenDistribution small lag",
        {"lagThreshold": 10, "ensureEvenDistributionOfPartitions": "true"},
        0,
        20,
        [P(12, 0), P(0, 0), P(0, 0), P(0, 0), P(0, 0), P(0, 0)],
        (20, True, 2),
    ),
    (
        "persistent lag leaves the metric, not activation",
        {"lagThreshold": 10, "excludePersistentLag": "true"},
        0,
        5,
        [P(50, 20, 20), P(12, 10, 4)],
        (2, True, 1),
    ),
    (
        "first poll has no previous offsets",
        {"lagThreshold": 10, "excludePersistentLag": "true"},
        0,
        5,
        [P(50, 20, None), P(0, 0)],
        (20, True, 2),
    ),
    ("activation threshold is strict", {"activationLagThreshold": "5"}, 0, 5, [P(5, 0)], (5, False, 0)),
    ("inactive keeps minReplicas", {"activationLagThreshold": "5"}, 2, 5, [P(3, 0)], (3, False, 2)),
    # KEDA leaves a ScaledObject with minReplicaCount >= 1 to the HPA whether or not it is active: the
    # activation threshold only decides 0 <-> 1 (keda docs: "ignored when minReplicaCount >= 1").
    (
        "inactive with minReplicas 1: the HPA scales on the metric",
        {"lagThreshold": 10, "activationLagThreshold": "50"},
        1,
        10,
        [P(40, 0), P(0, 0), P(0, 0), P(0, 0)],
        (40, False, 4),
    ),
    (
        "active with a zero metric still wakes one",
        {"lagThreshold": 10, "excludePersistentLag": "true"},
        0,
        5,
        [P(50, 20, 20)],
        (0, True, 1),
    ),
    ("max clamps", {"lagThreshold": 1}, 0, 3, [P(100, 0), P(100, 0), P(100, 0), P(100, 0)], (4, True, 3)),
    ("negative lag (committed past latest) reads 0", {"lagThreshold": 10}, 0, 5, [P(10, 15)], (0, False, 0)),
]


@pytest.mark.parametrize("name,meta,lo,hi,parts,expected", CASES, ids=[c[0] for c in CASES])
def test_plan_follows_kedas_kafka_scaler(name, meta, lo, hi, parts, expected):
    out = plan_situation(
        {"variants": {"v": {"trigger": meta, "minReplicas": lo, "maxReplicas": hi, "partitions": parts}}}
    )
    v = out["variants"]["v"]
    assert (v["lag_metric"], v["active"], v["desired_replicas"]) == expected


def test_hpa_tolerance_keeps_the_current_count():
    spec = {"trigger": {"lagThreshold": 10}, "minReplicas": 0, "maxReplicas": 10, "partitions": [P(105, 0)] * 2}
    # 210 lag / (10 x 2) would be 10.5 replicas... 2 current: ratio 10.5 -> scale; 20 current: ratio 1.05 -> keep
    assert (
        plan_situation({"variants": {"v": {**spec, "currentReplicas": 2}}})["variants"]["v"]["desired_replicas"] == 2
    )  # capped by partitions
    spec = {
        "trigger": {"lagThreshold": 10, "allowIdleConsumers": "true"},
        "minReplicas": 0,
        "maxReplicas": 30,
        "partitions": [P(105, 0)] * 2,
    }
    assert (
        plan_situation({"variants": {"v": {**spec, "currentReplicas": 20}}})["variants"]["v"]["desired_replicas"] == 20
    )
    assert (
        plan_situation({"variants": {"v": {**spec, "currentReplicas": 10}}})["variants"]["v"]["desired_replicas"] == 21
    )


def test_known_traps_are_warned_about():
    v = plan_situation(
        {
            "variants": {
                "v": {
                    "trigger": {"lagThreshold": 100, "offsetResetPolicy": "latest", "activationLagThreshold": 3},
                    "minReplicas": 0,
                    "maxReplicas": 8,
                    "maxInflight": 32,
                    "cooldownPeriod": 60,
                    "drainSeconds": 120,
                    "partitions": [P(10), P(10), P(10)],
                }
            }
        }
    )["variants"]["v"]
    text = "\n".join(v["warnings"])
    assert "maxReplicas 8 is above the 3 partitions" in text
    assert "lagThreshold 100 is above a worker's --max-inflight 32" in text
    assert "activation never fires" in text
    assert "cooldownPeriod 60s is shorter than a worker's drain (120s)" in text


def test_settings_keda_refuses_are_refused():
    with pytest.raises(TriggerError, match="limitToPartitionsWithLag cannot be combined"):
        plan_situation(
            {
                "variants": {
                    "v": {
                        "trigger": {"limitToPartitionsWithLag": "true", "allowIdleConsumers": "true"},
                        "partitions": [P(1, 0)],
                    }
                }
            }
        )
    with pytest.raises(TriggerError, match="lagThreshold must be > 0"):
        plan_situation({"variants": {"v": {"trigger": {"lagThreshold": 0}, "partitions": [P(1, 0)]}}})


@pytest.mark.parametrize(
    "version,expected_lag",
    [("2.21", [20, 0, 7]), ("2.20", [100, 50, 7]), (None, [20, 0, 7])],  # None: the default, the current release
)
def test_an_uncommitted_partition_under_earliest_counts_what_keda_s_version_counts(version, expected_lag):
    """KEDA 2.21 (kedacore/keda#7937) counts log end minus log start, not retention-deleted records."""
    parts = [
        {"latest": 100, "log_start": 80, "committed": -1},
        {"latest": 50, "log_start": 50, "committed": -1},  # nothing retained: nothing to consume
        {"latest": 7, "log_start": 0, "committed": -1},
    ]
    situation = {
        "variants": {"v": {"trigger": {"offsetResetPolicy": "earliest"}, "maxReplicas": 3, "partitions": parts}}
    }
    if version:
        situation["kedaVersion"] = version
    v = plan_situation(situation)["variants"]["v"]
    assert [p["lag"] for p in v["triggers"][0]["partitions"]] == expected_lag


def test_offline_plan_command_prints_json(tmp_path):
    situation = {
        "variants": {
            "a": {
                "trigger": {"lagThreshold": "10", "offsetResetPolicy": "earliest"},
                "minReplicas": 0,
                "maxReplicas": 4,
                "partitions": [P(40, 0), P(20, 20), P(5)],
            }
        }
    }
    path = tmp_path / "situation.json"
    path.write_text(json.dumps(situation))
    out = subprocess.run(
        abq_cmd("keda", "plan", "--input", str(path), "--format", "json"), capture_output=True, text=True, cwd=REPO
    )
    assert out.returncode == 0, out.stderr
    a = json.loads(out.stdout)["variants"]["a"]
    assert (a["lag_metric"], a["active"], a["desired_replicas"]) == (30, True, 3)  # lag 45 capped at 3 partitions
    bad = subprocess.run(
        abq_cmd("keda", "plan", "--input", str(tmp_path / "missing.json")), capture_output=True, text=True, cwd=REPO
    )
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "does not exist" in bad.stderr


def test_live_plan_reads_lag_of_a_real_consumer_group(settings, kafka_bootstrap, tmp_path):
    exp = new_experiment(variants=(("a", 50), ("b", 50)), partitions=2)
    exp = exp.model_copy(
        update={
            "variants": [
                exp.variants[0].model_copy(
                    update={
                        "scaling": exp.variants[0].scaling.model_copy(update={"lag_threshold": 5, "max_replicas": 2})
                    }
                ),
                exp.variants[1],
            ]
        }
    )
    ensure_topics(settings, exp)
    topic = exp.request_topic("a")
    producer = KafkaProducer(bootstrap_servers=kafka_bootstrap)
    for p, n in ((0, 12), (1, 9)):
        for _ in range(n):
            producer.send(topic, value=b"x", partition=p)
    producer.flush()
    producer.close()
    # Retention (here: deleteRecords) dropped partition 1's first 2 records: KEDA 2.21 does not count them.
    from abqueue.kafka import admin_client

    admin = admin_client(settings)
    admin.delete_records({TopicPartition(topic, 1): 2})
    admin.close()
    # A real group commits: partition 0 at 4 (lag 8), partition 1 nothing (earliest: 9 less 2 deleted).
    c = consumer(settings, group_id=exp.consumer_group("a"))
    c.assign([TopicPartition(topic, 0)])
    c.commit({TopicPartition(topic, 0): OffsetAndMetadata(4, "", -1)})
    c.close()
    situation = read_situation(settings, exp)
    plan = plan_situation(situation)["variants"]
    normal = next(t for t in plan["a"]["triggers"] if t["topic"] == topic)
    assert [p["lag"] for p in normal["partitions"]] == [8, 7]
    assert normal["lag_metric"] == 10  # 15 over lagThreshold 5 would want 3 > 2 partitions: capped at 2 x 5
    assert plan["a"]["active"] and plan["a"]["desired_replicas"] == 2
    assert not plan["b"]["active"] and plan["b"]["desired_replicas"] == 0
    # The same through the command, against the same broker.
    from conftest import write_config

    out = subprocess.run(
        abq_cmd(
            "keda",
            "plan",
            "--config",
            str(write_config(exp, tmp_path)),
            "--bootstrap-servers",
            kafka_bootstrap,
            "--format",
            "table",
        ),
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    assert out.returncode == 0, out.stderr
    assert f"{topic}: lag 15 [0:8 1:7?] -> metric 10, cap 2" in out.stdout


def test_a_trap_on_every_priority_topic_is_one_warning_naming_them_all():
    """keda plan printed each warning once per priority topic: three lines saying the same thing."""
    spec = {
        "minReplicas": 0,
        "maxReplicas": 8,
        "triggers": [
            {"metadata": {"topic": t, "lagThreshold": "10"}, "partitions": [P(5, 0), P(5, 0)]}
            for t in ("abq.chat.a.requests.high", "abq.chat.a.requests", "abq.chat.a.requests.batch")
        ],
    }
    warnings = plan_situation({"variants": {"a": spec}})["variants"]["a"]["warnings"]
    assert warnings == [
        "topics abq.chat.a.requests.high, abq.chat.a.requests, abq.chat.a.requests.batch: maxReplicas 8 is above the "
        "2 partitions; KEDA caps the lag metric at 2 replicas, so the rest never start; add partitions or lower "
        "maxReplicas"
    ]
