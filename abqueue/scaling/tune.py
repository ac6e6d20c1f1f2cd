"""`abq keda tune`: the cheapest trigger settings that meet a wait target on a trace of past arrivals.

Every combination of the grid's values is replayed through the simulator of `abq keda simulate`, and
the one with the fewest replica-hours whose wait percentile meets the target (and that serves every
request) wins; ties go to the shorter wait, then to the later entry in each grid list (the gentler
setting: a longer poll, a higher threshold). The search is exhaustive over the grid; two cuts make it
quick without changing the answer, since a run is stopped only once it cannot win:
- cost: a run is stopped once what it has spent, and the least it must still spend (its minReplicas
  to the end, and a serving replica's time for each request not yet served), exceeds the cheapest run
  that met the target;
- wait: once more requests have waited beyond the target, or are still queued and already will have,
  than the percentile allows, it cannot meet it.
and a third skips whole runs: a maxReplicas that a run never reached was no limit, so every higher
value would replay the same run.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, fields, replace

from abqueue.errors import UsageError
from abqueue.scaling.simulate import Result, Settings, simulate

# The trigger's settings the search varies, and the values it tries by default: 4,896 combinations for
# 8 partitions (maxReplicas stops at the partitions).
GRID: dict[str, tuple[int, ...]] = {
    "minReplicas": (0, 1, 2),
    "maxReplicas": (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64),  # up to the partitions
    "lagThreshold": (1, 2, 5, 10, 20, 50, 100, 200),
    "activationLagThreshold": (0, 10),
    "pollingInterval": (5, 15, 30),
    "cooldownPeriod": (60, 300, 900),
    "stabilizationWindowSeconds": (0, 300),
}
# What each setting is called in the experiment config's `scaling:` block (what `abq deploy render`
# turns into the ScaledObject).
CONFIG_NAMES = {
    "minReplicas": "min_replicas",
    "maxReplicas": "max_replicas",
    "lagThreshold": "lag_threshold",
    "activationLagThreshold": "activation_lag_threshold",
    "pollingInterval": "polling_interval",
    "cooldownPeriod": "cooldown_period",
    "stabilizationWindowSeconds": "scale_down_stabilization_seconds",
}


@dataclass(frozen=True)
class Target:
    wait_s: float  # the wait percentile must be at most this
    quantile: float = 95.0
    max_replica_hours: float | None = None  # a cost ceiling

    def allowed_late(self, total: int) -> int:
        """How many of `total` requests may wait beyond wait_s with the percentile still within it
        (the nearest-rank percentile of Result.wait_percentile)."""
        return total - math.ceil(self.quantile / 100 * total)

    def describe(self) -> str:
        return f"p{self.quantile:g} wait <= {self.wait_s:g} s" + (
            f" and <= {self.max_replica_hours:g} replica-hours" if self.max_replica_hours is not None else ""
        )


@dataclass
class Tuned:
    best: Result | None  # the cheapest run that met the target; None if none did
    closest: Result | None  # when none met it: the run with the shortest wait (within the ceiling)
    runs: int  # combinations simulated
    stopped: int  # runs stopped once they could not win
    combinations: int  # with minReplicas <= maxReplicas; those not run would replay a run already made
    feasible: int


def parse_grid(overrides: Iterable[str], partitions: int) -> dict[str, tuple[int, ...]]:
    """The default grid with each NAME=V1,V2,... override; maxReplicas values above the partitions are
    dropped (a replica beyond them has nothing to read), the partition count itself kept."""
    grid = dict(GRID)
    for item in overrides:
        name, sep, values = item.partition("=")
        if name not in GRID:
            raise UsageError(f"--grid {item!r}: {name!r} is not one of {', '.join(GRID)}")
        try:
            parsed = tuple(sorted({int(v) for v in values.split(",") if v.strip()}))
        except ValueError:
            parsed = ()
        if not sep or not parsed or parsed[0] < 0:
            raise UsageError(f"--grid {item!r} is not NAME=V1,V2,... with whole numbers; e.g. lagThreshold=5,10,20")
        grid[name] = parsed
    if "maxReplicas" not in {i.partition("=")[0] for i in overrides}:
        grid["maxReplicas"] = tuple(sorted({v for v in GRID["maxReplicas"] if v < partitions} | {partitions}))
    return grid


def _late_counter(target: Target, arrivals: list[int]) -> Callable[[Result], int]:
    """Counts, as a run goes, the requests certainly late: those served after waiting beyond the target,
    and those still queued that will have by the time they are served (the queue is first in, first
    out: what has been served is what arrived first)."""
    arrived_by = list(itertools.accumulate(arrivals))
    seen, late = 0, 0

    def count(r: Result) -> int:
        nonlocal seen, late
        for _, wait, n in r.waits[seen:]:
            if wait > target.wait_s:
                late += n
        seen = len(r.waits)
        # Queued at the end of second t, a request that arrived at a is served at t + 1 or later: late
        # whatever happens next once t + 1 - a > wait_s.
        last = min(math.ceil(len(r.timeline) - target.wait_s) - 1, len(arrived_by) - 1)
        return late + (max(0, arrived_by[last] - r.served) if last >= 0 else 0)

    return count


def _meets(r: Result, target: Target) -> bool:
    return (
        not r.stopped
        and r.backlog == 0
        and r.wait_percentile(target.quantile) <= target.wait_s
        and (target.max_replica_hours is None or r.gpu_seconds <= target.max_replica_hours * 3600)
    )


def _search(
    trace: list[int],
    base: Settings,
    grid: dict[str, tuple[int, ...]],
    stop: Callable[[], Callable[[Result], bool]],
    consider: Callable[[Result], None],
    progress: Callable[[int, int], None] | None,
) -> tuple[int, int]:
    """Runs every combination of the grid with minReplicas <= maxReplicas (less those that replay a run
    already made), each with a fresh stop rule, and hands each run to consider. Returns (runs,
    combinations)."""
    names = [n for n in GRID if n != "maxReplicas"]
    combos = list(itertools.product(*(grid[n] for n in names)))
    maxes = grid["maxReplicas"]
    at = names.index("minReplicas")
    combinations = sum(1 for combo in combos for high in maxes if high >= combo[at])
    runs = done = 0
    for combo in combos:
        fixed = dict(zip(names, combo, strict=True))
        valid = [high for high in maxes if high >= fixed["minReplicas"]]
        for high in valid:
            r = simulate(trace, replace(base, **fixed, maxReplicas=high), stop=stop())
            runs += 1
            consider(r)
            if not r.stopped and max(row["replicas"] for row in r.timeline) < high:
                break  # never reached: each higher value replays this very run
        done += len(valid)
        if progress is not None:
            progress(done, combinations)
    return runs, combinations


def tune(
    arrivals: list[int],
    base: Settings,
    target: Target,
    grid: dict[str, tuple[int, ...]],
    drain_s: int,
    progress: Callable[[int, int], None] | None = None,
) -> Tuned:
    """Search the grid (see the module's docstring); `base` holds what is not searched (per-replica
    throughput, partitions, cold start, time per request)."""
    trace = arrivals + [0] * drain_s
    allowed = target.allowed_late(sum(arrivals))
    ceiling = math.inf if target.max_replica_hours is None else target.max_replica_hours * 3600
    best: Result | None = None
    feasible = stopped = 0

    total = sum(arrivals)
    # What serving can carry from the current second into the next ones (credit left unspent), so
    # that the bound below never exceeds what a run could still do.
    slack = base.partitions * base.per_replica_rps + 1

    def stop() -> Callable[[Result], bool]:
        late = _late_counter(target, arrivals)
        cheapest = ceiling if best is None else min(ceiling, best.gpu_seconds)

        def hopeless(r: Result) -> bool:
            if late(r) > allowed:
                return True
            # Replica-seconds still to come, at least: minReplicas never go, and every request not yet
            # served needs 1 / per_replica_rps of a serving replica's second.
            left = len(trace) - len(r.timeline)
            still = max(r.settings.minReplicas * left, (total - r.served - slack) / base.per_replica_rps, 0)
            return r.gpu_seconds + still * base.gpus_per_replica > cheapest

        return hopeless

    def consider(r: Result) -> None:
        nonlocal best, feasible, stopped
        stopped += r.stopped
        if _meets(r, target):
            feasible += 1
            # Fewer replica-hours, then a shorter wait; a tie goes to the later (gentler) grid entry.
            key = (r.gpu_seconds, r.wait_percentile(target.quantile))
            if best is None or key <= (best.gpu_seconds, best.wait_percentile(target.quantile)):
                best = r

    runs, combinations = _search(trace, base, grid, stop, consider, progress)
    closest: Result | None = None
    if best is None:
        # Nothing met the target: a second pass, with only the ceiling cut, for the shortest wait.
        def nearer(r: Result) -> None:
            nonlocal closest
            if not r.stopped and r.backlog == 0:
                key = (r.wait_percentile(target.quantile), r.gpu_seconds)
                if closest is None or key < (closest.wait_percentile(target.quantile), closest.gpu_seconds):
                    closest = r

        more, _ = _search(trace, base, grid, lambda: lambda r: r.gpu_seconds > ceiling, nearer, progress)
        runs += more
    return Tuned(best, closest, runs, stopped, combinations, feasible)


def searched(settings: Settings) -> dict[str, int]:
    return {f.name: getattr(settings, f.name) for f in fields(settings) if f.name in GRID}


def config_snippet(settings: Settings) -> str:
    """The experiment config's `scaling:` block (abq deploy render writes the ScaledObject from it)."""
    values = searched(settings)
    return "scaling:\n" + "".join(f"  {CONFIG_NAMES[n]}: {values[n]}\n" for n in GRID)


def scaledobject_snippet(settings: Settings) -> str:
    """The same settings as fields of a ScaledObject, for one written by hand."""
    v = searched(settings)
    return (
        "spec:\n"
        f"  pollingInterval: {v['pollingInterval']}\n"
        f"  cooldownPeriod: {v['cooldownPeriod']}\n"
        f"  minReplicaCount: {v['minReplicas']}\n"
        f"  maxReplicaCount: {v['maxReplicas']}\n"
        "  advanced:\n"
        "    horizontalPodAutoscalerConfig:\n"
        "      behavior:\n"
        "        scaleDown:\n"
        f"          stabilizationWindowSeconds: {v['stabilizationWindowSeconds']}\n"
        "  triggers:\n"
        "  - type: kafka\n"
        "    metadata:\n"
        f'      lagThreshold: "{v["lagThreshold"]}"\n'
        f'      activationLagThreshold: "{v["activationLagThreshold"]}"\n'
    )
