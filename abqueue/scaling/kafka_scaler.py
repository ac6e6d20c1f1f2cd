"""What KEDA's Kafka scaler and the HPA make of a consumer group's offsets, rule for rule.

Rules as in KEDA's pkg/scalers/kafka_scaler.go (kedacore/keda v2.20.x, and v2.21's change for
uncommitted partitions, kedacore/keda#7937) and the HPA's replica calculator (kubernetes
pkg/controller/podautoscaler): per-partition lag with invalid (uncommitted) offsets under each
offsetResetPolicy, persistent lag, the cap from the partition count, activation, then the HPA's
ceil(metric / lagThreshold) within its tolerance and min/max. Where KEDA's versions differ, the plan
follows the version the user runs (`kedaVersion`, by default the current release).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from abqueue.errors import AbqError

INVALID_OFFSET = -1
HPA_TOLERANCE = 0.1
DEFAULT_KEDA_VERSION = "2.21"  # the current KEDA release


def keda_version(text: str | None) -> tuple[int, int]:
    raw = (text or DEFAULT_KEDA_VERSION).strip().removeprefix("v")
    try:
        major, minor = (int(x) for x in raw.split(".")[:2])
    except ValueError:
        raise TriggerError(f"KEDA version {text!r} is not MAJOR.MINOR, e.g. {DEFAULT_KEDA_VERSION}") from None
    return major, minor


# KEDA's metadata names and defaults for the Kafka trigger.
TRIGGER_DEFAULTS = {
    "lagThreshold": 10,
    "activationLagThreshold": 0,
    "offsetResetPolicy": "latest",
    "allowIdleConsumers": False,
    "limitToPartitionsWithLag": False,
    "excludePersistentLag": False,
    "scaleToZeroOnInvalidOffset": False,
    "ensureEvenDistributionOfPartitions": False,
}


class TriggerError(AbqError, ValueError):
    """Trigger settings KEDA itself would refuse."""


@dataclass
class Partition:
    partition: int
    latest: int
    committed: int = INVALID_OFFSET
    previous_committed: int | None = None  # at KEDA's previous poll; None on the first
    topic: str | None = None
    log_start: int = 0  # the earliest offset retention kept


@dataclass
class PartitionLag:
    partition: int
    lag: int  # what counts for the metric
    lag_for_activation: int  # persistent lag still counts here
    persistent: bool
    invalid_offset: bool
    topic: str | None = None


@dataclass
class TriggerPlan:
    partitions: list[PartitionLag]
    total_lag: int  # before the cap
    lag_metric: int  # what KEDA reports to the HPA
    cap: int | None  # the replica ceiling the scaler applies, if any
    active: bool
    replicas_wanted: int  # ceil(lag_metric / lagThreshold), before min/max
    settings: dict = field(default_factory=dict)


def trigger_settings(metadata: dict) -> dict:
    """KEDA's defaults filled in, values typed (KEDA's metadata are strings), combinations checked."""
    unknown = set(metadata) - set(TRIGGER_DEFAULTS) - {"topic", "consumerGroup", "bootstrapServers"}
    if unknown:
        raise TriggerError(
            f"unknown Kafka trigger setting(s) {', '.join(sorted(unknown))}; known: {', '.join(TRIGGER_DEFAULTS)}"
        )
    out: dict[str, Any] = dict(TRIGGER_DEFAULTS)
    for key, value in metadata.items():
        if key in ("topic", "consumerGroup", "bootstrapServers"):
            out[key] = value
            continue
        default = TRIGGER_DEFAULTS[key]
        if isinstance(default, bool):
            out[key] = value if isinstance(value, bool) else str(value).strip().lower() == "true"
        elif isinstance(default, int):
            out[key] = int(value)
        else:
            out[key] = str(value)
    if out["lagThreshold"] <= 0:
        raise TriggerError(f"lagThreshold must be > 0, got {out['lagThreshold']}")
    if out["activationLagThreshold"] < 0:
        raise TriggerError(f"activationLagThreshold must be >= 0, got {out['activationLagThreshold']}")
    if out["offsetResetPolicy"] not in ("earliest", "latest"):
        raise TriggerError(f"offsetResetPolicy must be earliest or latest, got {out['offsetResetPolicy']!r}")
    if out["limitToPartitionsWithLag"] and (out["allowIdleConsumers"] or out["ensureEvenDistributionOfPartitions"]):
        raise TriggerError(
            "limitToPartitionsWithLag cannot be combined with allowIdleConsumers or ensureEvenDistributionOfPartitions"
        )
    return out


def partition_lag(p: Partition, s: dict, version: tuple[int, int]) -> PartitionLag:
    if p.committed == INVALID_OFFSET:
        # Nothing committed yet: "latest" would start at the end (lag 1 keeps the group awake),
        # "earliest" at the beginning: the whole log before KEDA 2.21, what retention kept since
        # (#7937); scaleToZeroOnInvalidOffset makes both 0.
        whole = p.latest - p.log_start if version >= (2, 21) else p.latest
        lag = 0 if s["scaleToZeroOnInvalidOffset"] else (1 if s["offsetResetPolicy"] == "latest" else whole)
        return PartitionLag(p.partition, lag, lag, False, True, p.topic)
    lag = p.latest - p.committed  # not clamped per partition, as KEDA does
    persistent = (
        s["excludePersistentLag"]
        and p.previous_committed is not None
        and p.previous_committed == p.committed
        and lag > 0
    )
    return PartitionLag(p.partition, 0 if persistent else lag, lag, persistent, False, p.topic)


def _even_distribution(total: int, partitions: int, threshold: int) -> int:
    # The smallest divisor f of the partition count with f * lagThreshold >= lag, so replicas
    # always split the partitions evenly.
    for f in range(1, partitions + 1):
        if partitions % f == 0 and f * threshold >= total:
            return f * threshold
    return partitions * threshold


def plan_trigger(metadata: dict, partitions: list[Partition], version: tuple[int, int] | None = None) -> TriggerPlan:
    s = trigger_settings(metadata)
    lags = [partition_lag(p, s, version or keda_version(None)) for p in partitions]
    total = sum(pl.lag for pl in lags)
    threshold = s["lagThreshold"]
    metric, cap = total, None
    if not s["allowIdleConsumers"] or s["limitToPartitionsWithLag"] or s["ensureEvenDistributionOfPartitions"]:
        n = len(partitions)
        cap = sum(1 for pl in lags if pl.lag > 0) if s["limitToPartitionsWithLag"] else n
        if s["ensureEvenDistributionOfPartitions"] and n:
            metric = _even_distribution(metric, n, threshold)
        if metric // threshold > cap:  # Go's integer division: lag 39, threshold 10, 3 partitions is not capped
            metric = cap * threshold
    metric = max(0, metric)
    active = sum(pl.lag_for_activation for pl in lags) > s["activationLagThreshold"]
    return TriggerPlan(lags, total, metric, cap, active, math.ceil(metric / threshold), s)


def hpa_replicas(metric: int, threshold: int, current: int | None) -> int:
    """The HPA's desired count for an AverageValue external metric, before min/max."""
    if current:
        ratio = metric / (threshold * current)
        if abs(ratio - 1.0) <= HPA_TOLERANCE:
            return current
    return math.ceil(metric / threshold)


def desired_replicas(
    triggers: list[TriggerPlan], min_replicas: int, max_replicas: int, current: int | None = None
) -> int:
    """With minReplicas 0, KEDA activates from zero and returns to zero, and in between the HPA takes
    the largest count any trigger asks for, within [1, max]. With minReplicas >= 1 activation plays
    no part (KEDA's docs: the activation value is ignored): the HPA scales on the metric, within
    [min, max], active or not."""
    if min_replicas == 0 and not any(t.active for t in triggers):
        return 0
    wanted = max(hpa_replicas(t.lag_metric, t.settings["lagThreshold"], current) for t in triggers)
    return min(max_replicas, max(wanted, min_replicas, 1))


def _on_topics(topics: list[str]) -> str:
    named = [t for t in topics if t]
    if not named:
        return ""
    return f"topic {named[0]}: " if len(named) == 1 else f"topics {', '.join(named)}: "


def warnings(
    triggers: list[TriggerPlan],
    min_replicas: int,
    max_replicas: int,
    *,
    max_inflight: int | None = None,
    cooldown_period: int | None = None,
    drain_seconds: int | None = None,
) -> list[str]:
    """Settings that are known traps, each as one line with what to change, once: the same trap on
    several topics (a variant's priority levels) is one line naming them all."""
    by_trap: dict[str, list[str]] = {}  # the trap's line -> the topics it is found on
    for t in triggers:
        s, n = t.settings, len(t.partitions)
        topic = s.get("topic") or ""
        out: list[str] = []
        if max_replicas > n and not s["allowIdleConsumers"] and n:
            out.append(
                f"maxReplicas {max_replicas} is above the {n} partitions; KEDA caps the lag metric at "
                f"{n} replicas, so the rest never start; add partitions or lower maxReplicas"
            )
        if max_inflight and s["lagThreshold"] > max_inflight:
            out.append(
                f"lagThreshold {s['lagThreshold']} is above a worker's --max-inflight {max_inflight}: a replica is "
                f"added only once lag exceeds what one worker can even hold; use a lagThreshold <= {max_inflight}"
            )
        uncommitted = [pl for pl in t.partitions if pl.invalid_offset]
        if min_replicas == 0 and uncommitted and s["scaleToZeroOnInvalidOffset"]:
            out.append(
                f"{len(uncommitted)} partitions have no committed offset and scaleToZeroOnInvalidOffset counts "
                "them as 0: requests there never wake a variant at zero replicas"
            )
        if (
            min_replicas == 0
            and s["offsetResetPolicy"] == "latest"
            and uncommitted
            and not s["scaleToZeroOnInvalidOffset"]
            and s["activationLagThreshold"] >= len(uncommitted)
            and all(pl.invalid_offset for pl in t.partitions)
        ):
            out.append(
                f"with no committed offsets and offsetResetPolicy latest each partition counts as lag 1, never "
                f"above activationLagThreshold {s['activationLagThreshold']}: activation never fires; use earliest"
            )
        if s["excludePersistentLag"] and any(pl.persistent for pl in t.partitions):
            out.append(
                "lag that has not moved since the last poll is excluded (excludePersistentLag); a stuck "
                "worker then looks idle to the autoscaler"
            )
        if t.cap is not None and t.total_lag // s["lagThreshold"] == t.cap and t.total_lag > t.cap * s["lagThreshold"]:
            out.append(
                f"KEDA's integer division leaves lag {t.total_lag} uncapped at {t.cap} partitions; the HPA asks "
                f"for {math.ceil(t.total_lag / s['lagThreshold'])} replicas, one more than can work"
            )
        for line in out:
            by_trap.setdefault(line, []).append(topic)
    out = [_on_topics(topics) + line for line, topics in by_trap.items()]
    if (
        cooldown_period is not None
        and drain_seconds is not None
        and min_replicas == 0
        and cooldown_period < drain_seconds
    ):
        out.append(
            f"cooldownPeriod {cooldown_period}s is shorter than a worker's drain ({drain_seconds}s): scaling to zero can "
            "cut in-flight work; raise cooldownPeriod or terminationGracePeriodSeconds"
        )
    return out
