"""`abq keda simulate`: replay arrivals against a model of a variant's fleet under KEDA and the HPA.

One-second steps. Each second the arrivals join a FIFO backlog and the ready replicas (at most one
per partition: a consumer beyond the partition count has nothing to read) serve up to
`per_replica_rps` each. The lag is the backlog, plus the requests workers are still on (throughput x
`request_seconds`, uncommitted until answered). As on a cluster, two loops act on it, with the same
arithmetic as `keda plan` (scaling/kafka_scaler.py): every `pollingInterval` KEDA wakes a variant at
zero when the lag is above the activation threshold, and takes it back to zero after
`cooldownPeriod` without activity; every `hpaSyncPeriod` (15 s, kube-controller-manager's default)
the HPA, while the variant runs, asks for ceil(metric / lagThreshold) within its tolerance,
scale-up limit (double or +4 pods per step, the HPA default) and scale-down stabilization window. New pods serve after `cold_start_s`. Requests are conserved:
arrived = served + backlog, at every step.
"""

from __future__ import annotations

import csv
import math
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import orjson

from abqueue.analysis.stats import weighted_percentile
from abqueue.errors import UsageError
from abqueue.scaling.kafka_scaler import HPA_TOLERANCE


@dataclass(frozen=True)
class Settings:
    lagThreshold: int = 32
    activationLagThreshold: int = 0
    minReplicas: int = 0
    maxReplicas: int = 4
    pollingInterval: int = 15
    cooldownPeriod: int = 300
    stabilizationWindowSeconds: int = 300
    partitions: int = 6
    per_replica_rps: float = 1.0
    cold_start_s: int = 120
    request_seconds: float = 0.0  # time a request spends in a worker; its offset stays uncommitted meanwhile
    gpus_per_replica: int = 1
    hpaSyncPeriod: int = 15  # kube-controller-manager's --horizontal-pod-autoscaler-sync-period

    SWEEPABLE = (
        "lagThreshold",
        "activationLagThreshold",
        "minReplicas",
        "maxReplicas",
        "pollingInterval",
        "cooldownPeriod",
        "stabilizationWindowSeconds",
        "partitions",
        "per_replica_rps",
        "cold_start_s",
        "request_seconds",
        "hpaSyncPeriod",
    )


@dataclass
class Result:
    settings: Settings
    arrived: int = 0
    served: int = 0
    backlog: int = 0
    waits: list[tuple[int, int, int]] = field(default_factory=list)  # (served at, wait seconds, requests)
    timeline: list[dict] = field(default_factory=list)
    gpu_seconds: float = 0.0
    stopped: bool = False

    def wait_percentile(self, q: float) -> float:
        return weighted_percentile([(w, n) for _, w, n in self.waits], q)

    def summary(self) -> dict:
        return {
            "arrived": self.arrived,
            "served": self.served,
            "backlog_at_end": self.backlog,
            "wait_s_p50": self.wait_percentile(50),
            "wait_s_p95": self.wait_percentile(95),
            "wait_s_p99": self.wait_percentile(99),
            "max_backlog": max((r["backlog"] for r in self.timeline), default=0),
            "max_replicas": max((r["replicas"] for r in self.timeline), default=0),
            "gpu_hours": self.gpu_seconds / 3600,
        }


def simulate(
    arrivals_per_second: list[int],
    s: Settings,
    initial_replicas: int | None = None,
    stop: Callable[[Result], bool] | None = None,
) -> Result:
    """stop: asked after each second; a run it stops is left unfinished with `stopped` set (a search
    stops runs that can no longer be chosen)."""
    res = Result(settings=s)
    queue: deque[list[int]] = deque()  # [arrival second, requests]
    pods: list[int] = [0] * (s.minReplicas if initial_replicas is None else initial_replicas)  # ready-at seconds
    credit = 0.0
    last_active = -(10**9)
    recommendations: deque[tuple[int, int]] = deque()  # (second, desired) for the stabilization window
    for t, arriving in enumerate(arrivals_per_second):
        if arriving:
            queue.append([t, arriving])
            res.arrived += arriving
            res.backlog += arriving
        ready = sum(1 for r in pods if r <= t)
        serving = min(ready, s.partitions)
        served_before = res.served
        credit = credit + serving * s.per_replica_rps if serving else 0.0
        while queue and credit >= 1:
            take = min(queue[0][1], int(credit))
            res.waits.append((t, t - queue[0][0], take))
            res.served += take
            res.backlog -= take
            credit -= take
            queue[0][1] -= take
            if not queue[0][1]:
                queue.popleft()
        if not queue:
            credit = min(credit, serving * s.per_replica_rps)  # idle capacity is not banked
        keda_polls, hpa_syncs = t % s.pollingInterval == 0, t % s.hpaSyncPeriod == 0
        if keda_polls or hpa_syncs:
            # Kafka lag is what is not committed: the backlog, and (Little's law) the requests the
            # workers are still on, which commit only once answered.
            lag = res.backlog + round((res.served - served_before) * s.request_seconds)
            if keda_polls:
                pods = _keda_poll(t, pods, lag, s, recommendations, last_active)
                if lag > s.activationLagThreshold:
                    last_active = t
            if hpa_syncs and pods:
                pods = _hpa_sync(t, pods, lag, s, recommendations)
        res.gpu_seconds += len(pods) * s.gpus_per_replica
        res.timeline.append(
            {
                "t": t,
                "arrived": arriving,
                "served": res.served - served_before,
                "backlog": res.backlog,
                "replicas": len(pods),
                "ready": ready,
            }
        )
        assert res.arrived == res.served + res.backlog  # conservation, every step
        if stop is not None and stop(res):
            res.stopped = True
            break
    return res


def _keda_poll(t: int, pods: list[int], lag: int, s: Settings, recommendations: deque, last_active: int) -> list[int]:
    """KEDA's own decisions, every pollingInterval: wake a variant at zero when its lag is above the
    activation threshold, and take it back to zero once it has been below it for cooldownPeriod."""
    if lag > s.activationLagThreshold:
        if not pods:
            return [t + s.cold_start_s] * max(s.minReplicas, 1)  # the HPA takes over from there
    elif pods and s.minReplicas == 0 and t - last_active >= s.cooldownPeriod:
        recommendations.clear()
        return []
    return pods


def _hpa_sync(t: int, pods: list[int], lag: int, s: Settings, recommendations: deque) -> list[int]:
    """The HPA, every hpaSyncPeriod while the variant runs: ceil(metric / lagThreshold) on KEDA's
    metric, within its tolerance, its scale-down stabilization window and scale-up limit, and within
    [max(minReplicas, 1), maxReplicas]."""
    current = len(pods)
    metric = min(lag, s.partitions * s.lagThreshold) if lag // s.lagThreshold > s.partitions else lag
    ratio = metric / (s.lagThreshold * current)
    desired = current if abs(ratio - 1) <= HPA_TOLERANCE else math.ceil(metric / s.lagThreshold)
    desired = min(s.maxReplicas, max(desired, s.minReplicas, 1))
    recommendations.append((t, desired))
    while recommendations and recommendations[0][0] <= t - s.stabilizationWindowSeconds:
        recommendations.popleft()
    if desired < current:  # scale down only as far as the window's highest recommendation (this one
        # included: a window of 0 has nothing else in it)
        desired = min(current, max([desired, *(d for _, d in recommendations)]))
    desired = min(desired, max(2 * current, current + 4))  # the HPA's default scale-up limit per step
    if desired > current:
        return pods + [t + s.cold_start_s] * (desired - current)
    if desired < current:
        return sorted(pods)[:desired]
    return pods


# -- arrivals ----------------------------------------------------------------------------------
def profile(spec: str, duration: int) -> list[int]:
    """burst:N@T (N requests at second T), step:R1,R2@T (R1 req/s, R2 from second T),
    diurnal:PEAK[,PERIOD] (0 to PEAK req/s and back over PERIOD seconds, default 86400)."""
    kind, _, arg = spec.partition(":")
    out = [0] * duration
    try:
        if kind == "burst":
            n, _, at = arg.partition("@")
            out[int(at or 0)] = int(n)
            return out
        if kind == "step":
            rates, _, at = arg.partition("@")
            r1, r2 = (float(x) for x in rates.split(","))
            return _from_rates([r1 if t < int(at) else r2 for t in range(duration)])
        if kind == "diurnal":
            peak, _, period = arg.partition(",")
            p = float(period or 86400)
            return _from_rates([float(peak) * (1 - math.cos(2 * math.pi * t / p)) / 2 for t in range(duration)])
    except (ValueError, IndexError):
        pass
    raise UsageError(
        f"profile {spec!r} is not burst:N@T, step:R1,R2@T or diurnal:PEAK[,PERIOD]; e.g. --profile step:0.5,4@600"
    )


def _from_rates(rates: list[float]) -> list[int]:
    # Deterministic: whole requests as the running sum of the rate crosses each integer.
    out, acc, sent = [], 0.0, 0
    for r in rates:
        acc += r
        n = int(acc) - sent
        out.append(n)
        sent += n
    return out


# Where JSONL lines keep their time, tried in order: plain traces, then abqueue responses (abq batch
# output, abq report input), then OpenAI Batch output lines.
TIME_FIELDS = ("timestamp", "ts", "enqueued", "timings.enqueued", "abq.timings.enqueued")


def _field(obj, path: str):
    for part in path.split("."):
        if not isinstance(obj, dict) or part not in obj:
            return None
        obj = obj[part]
    return obj


def read_trace(path: Path, time_field: str | None = None) -> list[int]:
    """Arrival timestamps (seconds; Unix or relative) from CSV (first column, or a `timestamp`
    column) or JSONL (`time_field`, a dotted path, or the first of TIME_FIELDS a line has), binned
    per second from the first one."""
    stamps: list[float] = []
    fields = (time_field,) if time_field else TIME_FIELDS
    if path.suffix == ".jsonl":
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if line.strip():
                obj = orjson.loads(line)
                value = next((v for f in fields if (v := _field(obj, f)) is not None), None)
                if value is None:
                    raise UsageError(
                        f"{path}:{n} has no {' or '.join(fields)} field; name the field with --time-field PATH"
                    )
                stamps.append(float(value))
    else:
        with path.open() as f:
            rows = list(csv.reader(f))
        col = rows[0].index("timestamp") if rows and "timestamp" in rows[0] else 0
        for row in rows:
            try:
                stamps.append(float(row[col]))
            except (ValueError, IndexError):
                continue  # a header
    if not stamps:
        raise UsageError(f"{path} has no arrival timestamps")
    start = min(stamps)
    out = [0] * (int(max(stamps) - start) + 1)
    for ts in stamps:
        out[int(ts - start)] += 1
    return out


def sweep(arrivals: list[int], base: Settings, name: str | None, values: list[str], drain_s: int) -> list[Result]:
    if not name:
        return [simulate(arrivals + [0] * drain_s, base)]
    if name not in Settings.SWEEPABLE:
        raise UsageError(f"--sweep {name} is not one of {', '.join(Settings.SWEEPABLE)}")
    kind = type(getattr(base, name))
    return [simulate(arrivals + [0] * drain_s, replace(base, **{name: kind(v)})) for v in values]
