"""A three-node KRaft cluster (`abq kafka up --brokers 3`): replicated topics, and every request
answered through a broker's kill -9, a rolling restart and a minority partition."""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
import time
from collections import Counter

import pytest
from conftest import REPO, ThreadWorker, abq_cmd, new_experiment
from kafka.admin import ConfigResource, ConfigResourceType
from kafka_helpers import read_all, wait_until

from abqueue.kafka import KafkaSettings, admin_client, ensure_topics
from abqueue.localkafka import LocalCluster
from abqueue.localkafka.broker import free_port
from producers import AbqClient
from schemas import InferenceRequest, InferenceResponse

MAX_INFLIGHT, MAX_BATCH = 8, 8
# The documented window (README, "Guarantees"): per fault, a worker may answer again what it had
# answered but not yet committed: at most two rounds of --max-inflight.
DUPLICATES_PER_FAULT = 2 * MAX_INFLIGHT


def abq(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(abq_cmd(*args), capture_output=True, text=True, cwd=REPO, timeout=180)
    if check and proc.returncode != 0:
        raise AssertionError(f"abq {' '.join(args)} exited {proc.returncode}: {proc.stderr[-2000:]}")
    return proc


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    port, data = free_port(consecutive=3), tmp_path_factory.mktemp("cluster")
    where = ("--port", str(port), "--data-dir", str(data))
    up = abq("kafka", "up", "--brokers", "3", *where)
    try:
        assert up.stdout.strip() == f"127.0.0.1:{port},127.0.0.1:{port + 1},127.0.0.1:{port + 2}"
        yield LocalCluster.kept(port, data)
    finally:
        abq("kafka", "down", *where, check=False)


@pytest.fixture(scope="module")
def kafka_bootstrap(cluster):
    return cluster.bootstrap


@pytest.fixture(scope="module")
def settings(kafka_bootstrap):
    return KafkaSettings(bootstrap_servers=kafka_bootstrap)


def _leader(settings, topic: str, partition: int = 0) -> int:
    admin = admin_client(settings)
    try:
        (t,) = admin.describe_topics([topic])
    finally:
        admin.close()
    return next(p["leader_id"] for p in t["partitions"] if p["partition_index"] == partition)


def _in_sync(cluster: LocalCluster) -> bool:
    st = cluster.status()
    return all(n.running for n in st.nodes) and st.controller is not None and not st.under_replicated


def test_status_shows_each_node_the_controller_and_weak_topics(cluster, settings):
    admin = admin_client(settings)
    try:
        admin.create_topics({"one-copy": {"num_partitions": 1, "replication_factor": 1}}, wait_for_metadata=True)
    finally:
        admin.close()
    out = abq("kafka", "status", "--port", str(cluster.port), "--data-dir", str(cluster.data_dir)).stdout
    for n in cluster.nodes:
        assert f"node {n.node_id}  127.0.0.1:{n.port}  running" in out
    assert "controller: " in out and "none elected" not in out
    assert "under-replicated partitions: 0" in out
    assert "one-copy: 1 replicas" in out  # fewer than the cluster's 3, said, not silently accepted


def test_topics_get_three_replicas_two_in_sync_and_a_weaker_one_is_reported(cluster, settings, caplog):
    exp = new_experiment(variants=(("a", 100),))
    weak = exp.request_topics("a")["normal"]
    admin = admin_client(settings)
    try:
        admin.create_topics({weak: {"num_partitions": 2, "replication_factor": 1}}, wait_for_metadata=True)
        with caplog.at_level("WARNING"):
            ensure_topics(settings, exp)

        seen = {}

        def replicas():
            # Asked of any broker: one that has not yet applied the new topic's metadata lists no partitions
            # (even after another has answered: the answer is kept, not asked for twice).
            (resp,) = admin.describe_topics([exp.response_topic])
            seen["replicas"] = {len(p["replica_nodes"]) for p in resp["partitions"]}
            return seen["replicas"] != set()

        wait_until(replicas, 10, "the new topic's partitions described")
        assert seen["replicas"] == {3}

        def min_insync():
            # Asked of any broker: one that has not yet applied the new topic's metadata knows no config.
            cfg = admin.describe_configs([ConfigResource(ConfigResourceType.TOPIC, exp.response_topic)])
            seen["min_insync"] = cfg["topic"][exp.response_topic].get("min.insync.replicas", {}).get("value")
            return seen["min_insync"] is not None

        wait_until(min_insync, 10, "the new topic's configs readable")
        assert seen["min_insync"] == "2"
    finally:
        admin.close()
    assert f"{weak} has 1 replicas and min.insync.replicas 2, configured 3 and 2" in caplog.text


# -- failover: a fault in the middle of a steady stream; every request answered ----------------------


def _kill_leader(topic_of):
    def fault(cluster, settings, exp):
        node = cluster.node(_leader(settings, topic_of(exp)))
        node.send_signal(signal.SIGKILL)
        time.sleep(3)
        cluster.start()  # brings back the node that is down
        return f"kill -9 of node {node.node_id}, leader of {topic_of(exp)}/0"

    return fault


def _rolling_restart(cluster, settings, exp):
    for node in cluster.nodes:
        node.stop()
        cluster.start()
        # As an operator's restart does: the next node only once every partition is in sync again.
        wait_until(lambda: _in_sync(cluster), 90, f"partitions in sync after restarting node {node.node_id}", every=1)
    return "rolling restart of 3 nodes"


def _minority_partition(cluster, settings, exp):
    node = cluster.node(_leader(settings, exp.request_topics("a")["normal"]))
    node.send_signal(signal.SIGSTOP)
    try:
        time.sleep(12)  # longer than the worker's 10 s session timeout and the broker's 9 s one
    finally:
        node.send_signal(signal.SIGCONT)
    return f"SIGSTOP of node {node.node_id} for 12 s"


FAULTS = {
    "request-leader-kill9": _kill_leader(lambda exp: exp.request_topics("a")["normal"]),
    "response-leader-kill9": _kill_leader(lambda exp: exp.response_topic),
    "rolling-restart": _rolling_restart,
    "minority-sigstop": _minority_partition,
}


@pytest.mark.parametrize("fault", list(FAULTS))
def test_every_request_is_answered_through(fault, cluster, settings):
    wait_until(lambda: _in_sync(cluster), 90, "the cluster in sync before the run", every=1)
    exp = new_experiment(variants=(("a", 100),), partitions=3, latency_ms=20)
    ensure_topics(settings, exp)
    ids: list[str] = []
    sent = threading.Event()
    with (
        ThreadWorker(settings, exp, "a", max_batch=MAX_BATCH, max_inflight=MAX_INFLIGHT),
        AbqClient(settings, exp) as client,
    ):

        def publish_steadily():
            # 40 requests a second while the fault happens, so some are sent during it.
            for i in range(600):
                req, _ = client.publish(InferenceRequest(experiment=exp.name, routing_key=f"u{i}", prompt=f"p {i}"))
                ids.append(req.id)
                time.sleep(0.025)
            client.publisher.flush()
            sent.set()

        publisher = threading.Thread(target=publish_steadily, daemon=True)
        publisher.start()
        time.sleep(3)
        assert 0 < len(ids) < 600, "the fault must land mid-stream"
        what = FAULTS[fault](cluster, settings, exp)
        assert sent.wait(180), f"publishing did not finish after the {what}"
        got = client.wait(set(ids), timeout=180)
        assert set(got) == set(ids), f"{len(set(ids) - set(got))} of {len(ids)} unanswered after the {what}"
    answers = Counter(
        InferenceResponse.model_validate_json(r.value).request_id
        for r in read_all(settings, exp.response_topic, expect=len(ids), timeout=60)
    )
    assert set(answers) == set(ids)
    duplicates = sum(n - 1 for n in answers.values())
    print(f"{what}: {len(ids)} requests, all answered, {duplicates} duplicate responses")
    faults = 3 if fault == "rolling-restart" else 1
    assert duplicates <= DUPLICATES_PER_FAULT * faults, f"{duplicates} duplicate responses after the {what}"


def test_a_producer_started_right_after_a_broker_dies_rides_it_out(cluster, settings):
    """`abq submit` and AbqClient(follow=True) exited with a 58-line KafkaConnectionError traceback
    (from topic_max_message_bytes / describe_topics) for seconds after one broker of three died,
    until metadata moved on; running workers rode it out. Now the client does too."""
    wait_until(lambda: _in_sync(cluster), 90, "the cluster in sync before the run", every=1)
    exp = new_experiment(variants=(("a", 100),), partitions=3)
    ensure_topics(settings, exp)
    with ThreadWorker(settings, exp, "a"):
        node = cluster.node(_leader(settings, exp.request_topics("a")["normal"]))
        node.send_signal(signal.SIGKILL)
        sent: list[tuple[AbqClient, str]] = []
        try:
            for attempt in range(3):  # at once, and while metadata still names the dead broker
                client = AbqClient(settings, exp, follow=True)
                req, _ = client.publish(
                    InferenceRequest(experiment=exp.name, routing_key=f"u{attempt}", prompt="still here")
                )
                sent.append((client, req.id))
                time.sleep(0.5)
            time.sleep(2)
            cluster.start()  # brings back the node that is down, as the fault tests above do
            for client, rid in sent:  # each client takes its own answer
                got = client.wait({rid}, timeout=120)
                assert rid in got and got[rid].response.outputs == ["still here"]
        finally:
            for client, _ in sent:
                client.close()
            cluster.start()
    wait_until(lambda: _in_sync(cluster), 90, "the cluster in sync after the run", every=1)


def test_a_stopped_broker_left_a_zombie_by_a_parent_that_never_reaps_counts_as_gone():
    # In a container whose PID 1 does not reap, a broker started by `abq kafka up` (which has exited)
    # stays a zombie after it stops: `down` waited its full timeout for it, then SIGKILLed a corpse.
    from abqueue.localkafka.broker import _wait_gone

    parent = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import subprocess, sys, time; c = subprocess.Popen(['true']); print(c.pid, flush=True); time.sleep(30)",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        child = int(parent.stdout.readline())
        start = time.monotonic()
        assert _wait_gone(child, 5.0)
        assert time.monotonic() - start < 2
    finally:
        parent.kill()
        parent.wait()
