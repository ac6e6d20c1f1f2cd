"""`abq keda plan`: per variant, what KEDA would do with the lag there is now (live) or in a
situation described in JSON (offline). The JSON format is documented in docs/concepts/scaling.md."""

from __future__ import annotations

import logging

from kafka import TopicPartition
from kafka.errors import CoordinatorLoadInProgressError, CoordinatorNotAvailableError, NotCoordinatorError

from abqueue.kafka import KafkaSettings, admin_client, consumer
from abqueue.scaling.kafka_scaler import (
    Partition,
    TriggerError,
    desired_replicas,
    keda_version,
    plan_trigger,
    warnings,
)
from schemas import ExperimentConfig
from workers.backoff import retrying

log = logging.getLogger(__name__)


def _partitions(raw: list[dict], topic: str | None = None) -> list[Partition]:
    out = []
    for i, p in enumerate(raw):
        try:
            out.append(
                Partition(
                    partition=int(p.get("partition", i)),
                    latest=int(p["latest"]),
                    committed=int(p.get("committed", -1)),
                    previous_committed=None if p.get("previous_committed") is None else int(p["previous_committed"]),
                    topic=p.get("topic", topic),
                    log_start=int(p.get("log_start", 0)),
                )
            )
        except (KeyError, TypeError, ValueError) as e:
            raise TriggerError(
                f"partition entry {i} ({p}) needs integer 'latest' and 'committed' (-1 when nothing is committed): {e}"
            ) from None
    return out


def plan_variant(name: str, spec: dict, version: tuple[int, int] | None = None) -> dict:
    """spec: {trigger: {KEDA metadata}, minReplicas, maxReplicas, partitions: [...], currentReplicas?,
    maxInflight?, cooldownPeriod?, drainSeconds?}, or `triggers: [{metadata, partitions}]` for several."""
    triggers_in = spec.get("triggers") or [
        {"metadata": spec.get("trigger", {}), "partitions": spec.get("partitions", [])}
    ]
    lo, hi = int(spec.get("minReplicas", 0)), int(spec.get("maxReplicas", 1))
    if lo > hi:
        raise TriggerError(f"variant {name}: minReplicas {lo} is above maxReplicas {hi}")
    plans = []
    for t in triggers_in:
        meta = t.get("metadata", {})
        plans.append(plan_trigger(meta, _partitions(t.get("partitions", []), meta.get("topic")), version))
    current = spec.get("currentReplicas")
    desired = desired_replicas(plans, lo, hi, current)
    return {
        "lag_metric": max(p.lag_metric for p in plans),
        "active": any(p.active for p in plans),
        "desired_replicas": desired,
        "current_replicas": current,
        "min_replicas": lo,
        "max_replicas": hi,
        "triggers": [
            {
                "topic": p.settings.get("topic"),
                "total_lag": p.total_lag,
                "lag_metric": p.lag_metric,
                "cap": p.cap,
                "active": p.active,
                "replicas_wanted": p.replicas_wanted,
                "partitions": [
                    {
                        "partition": pl.partition,
                        "lag": pl.lag,
                        "persistent": pl.persistent,
                        "invalid_offset": pl.invalid_offset,
                    }
                    for pl in p.partitions
                ],
            }
            for p in plans
        ],
        "warnings": warnings(
            plans,
            lo,
            hi,
            max_inflight=spec.get("maxInflight"),
            cooldown_period=spec.get("cooldownPeriod"),
            drain_seconds=spec.get("drainSeconds"),
        ),
    }


def plan_situation(situation: dict) -> dict:
    variants = situation.get("variants")
    if not isinstance(variants, dict) or not variants:
        raise TriggerError(
            'the situation needs a \'variants\' object: {"variants": {"NAME": {"trigger": {...}, "partitions": [...]}}}'
        )
    version = keda_version(situation.get("kedaVersion"))
    return {"variants": {name: plan_variant(name, spec, version) for name, spec in variants.items()}}


def trigger_metadata(experiment: ExperimentConfig, variant: str, topic: str | None) -> dict:
    """The Kafka trigger of a variant's (or pool's) ScaledObject for one of its topics, or for all
    its group's topics (topic None: a pool's total), as `deploy render` writes it."""
    sc = experiment.serving(variant)[0].scaling
    return {
        **({"topic": topic} if topic is not None else {}),
        "consumerGroup": experiment.consumer_group(variant),
        "lagThreshold": sc.lag_threshold,
        "activationLagThreshold": sc.activation_lag_threshold,
        "offsetResetPolicy": sc.offset_reset_policy,
        "allowIdleConsumers": sc.allow_idle_consumers,
        "limitToPartitionsWithLag": sc.limit_to_partitions_with_lag,
        "excludePersistentLag": sc.exclude_persistent_lag,
        "scaleToZeroOnInvalidOffset": sc.scale_to_zero_on_invalid_offset,
        "ensureEvenDistributionOfPartitions": sc.ensure_even_distribution_of_partitions,
    }


# A group no worker has joined yet may have no coordinator for a moment (on a fresh cluster Kafka is
# still creating __consumer_offsets): worth a few short retries, never a traceback.
COORDINATOR_ERRORS = (CoordinatorNotAvailableError, CoordinatorLoadInProgressError, NotCoordinatorError)


def group_offsets(admin, group: str) -> dict[TopicPartition, int]:
    """The group's committed offsets (none for a group that never committed)."""
    for attempt in retrying(f"reading group {group}'s offsets", COORDINATOR_ERRORS, attempts=8, max_wait_s=2.0):
        with attempt:
            return {tp: om.offset for tp, om in admin.list_group_offsets(group).get(group, {}).items()}
    raise AssertionError("unreachable: retrying re-raises the last error")


def read_situation(settings: KafkaSettings, experiment: ExperimentConfig, previous: dict | None = None) -> dict:
    """Live offsets of every variant's (or pool's) topics and group, in the offline format. `previous`
    is an earlier situation, whose committed offsets become previous_committed (persistent lag)."""
    admin = admin_client(settings)
    reader = consumer(settings, group_id=None)
    try:
        existing = set(admin.list_topics())
        units = experiment.serving_units()
        groups = {experiment.consumer_group(u) for u in units}
        members = {}
        try:
            for gid, info in admin.describe_groups(sorted(groups)).items():
                members[gid] = len(info.get("members") or [])
        except Exception as e:  # a broker that will not describe groups still gives offsets
            log.warning("could not describe consumer groups (%s); current replicas unknown", e)
        out = {}
        for unit in units:
            served = experiment.serving(unit)
            group = experiment.consumer_group(unit)
            committed = group_offsets(admin, group)
            prev = {
                (p.get("topic", t["metadata"].get("topic")), p["partition"]): p["committed"]
                for t in (previous or {}).get("variants", {}).get(unit, {}).get("triggers", [])
                for p in t["partitions"]
            }
            triggers, seen = [], []
            for topic in (t for v in served for t in experiment.request_topics(v.name).values()):
                if topic not in existing:
                    continue
                tps = [TopicPartition(topic, p) for p in sorted(reader.partitions_for_topic(topic) or ())]
                ends = reader.end_offsets(tps)
                starts = reader.beginning_offsets(tps)  # KEDA 2.21 counts an uncommitted partition from here
                parts = [
                    {
                        "topic": topic,
                        "partition": tp.partition,
                        "latest": ends[tp],
                        "log_start": starts[tp],
                        "committed": committed.get(tp, -1),
                        "previous_committed": prev.get((topic, tp.partition)),
                    }
                    for tp in tps
                ]
                seen += parts
                triggers.append({"metadata": trigger_metadata(experiment, unit, topic), "partitions": parts})
            if len(served) > 1 or served[0].pool is not None:
                # A trigger without a topic sees only the partitions the group has committed in.
                total = [p for p in seen if p["committed"] >= 0]
                triggers.append({"metadata": trigger_metadata(experiment, unit, None), "partitions": total})
            v = served[0]
            sc = v.scaling
            out[unit] = {
                "triggers": triggers,
                "minReplicas": sc.min_replicas,
                "maxReplicas": sc.max_replicas,
                "currentReplicas": members.get(group),
                "maxInflight": v.deploy.max_inflight,
                "cooldownPeriod": sc.cooldown_period,
                "drainSeconds": sc.drain_seconds,
            }
        return {"experiment": experiment.name, "variants": out}
    finally:
        reader.close()
        admin.close()
