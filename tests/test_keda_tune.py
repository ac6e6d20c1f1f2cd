"""`abq keda tune`: on synthetic traces whose best setting is known it finds that setting, its cuts never
change the answer an exhaustive replay of the grid gives, and what it prints can be pasted."""

import itertools
import json
import random
import subprocess
from dataclasses import replace

import yaml
from conftest import abq_cmd

from abqueue.scaling.simulate import Settings, profile, simulate
from abqueue.scaling.tune import GRID, Target, parse_grid, tune
from schemas.experiment import ScalingConfig


def test_a_steady_load_that_no_cold_pod_can_help_keeps_exactly_the_replicas_it_needs_warm():
    # 3 requests/s, a replica serves 1/s, and a new pod takes longer to start than the whole run: only
    # the warm ones (minReplicas) ever serve. Fewer than 3 never catch up; a 4th costs and never helps.
    base = Settings(per_replica_rps=1, partitions=8, cold_start_s=10_000)
    arrivals = profile("step:3,3@0", 1200)
    grid = parse_grid(["minReplicas=0,1,2,3,4,5", "lagThreshold=5,50", "pollingInterval=5,15"], base.partitions)
    tuned = tune(arrivals, base, Target(wait_s=5), grid, drain_s=300)
    best = tuned.best
    assert best is not None
    assert best.settings.minReplicas == 3
    assert best.gpu_seconds == 3 * (1200 + 300)  # three replicas through the run and the drain, nothing more
    assert best.wait_percentile(95) == 0


def test_bursts_far_apart_scale_to_zero_between_them_with_the_shortest_cooldown():
    # 300 requests every half hour; 4 replicas drain a burst in under 10 s once started. Keeping any pod
    # warm costs 30 minutes per cycle; waiting out a 60 s poll-and-start costs nothing.
    base = Settings(per_replica_rps=10, partitions=4, cold_start_s=30)
    arrivals = [0] * 5400
    for t in (0, 1800, 3600):
        arrivals[t] = 300
    grid = parse_grid(["pollingInterval=5,15", "stabilizationWindowSeconds=0,300"], base.partitions)
    tuned = tune(arrivals, base, Target(wait_s=120), grid, drain_s=600)
    best = tuned.best
    assert best is not None
    assert best.settings.minReplicas == 0
    assert best.settings.cooldownPeriod == min(GRID["cooldownPeriod"])
    assert best.wait_percentile(95) <= 120


def test_the_cuts_never_change_the_answer_of_an_exhaustive_replay():
    rnd = random.Random(7)
    arrivals = [rnd.choice([0, 0, 0, 1, 2, 6]) if (t // 300) % 2 == 0 else 0 for t in range(1500)]
    base = Settings(per_replica_rps=1.5, partitions=4, cold_start_s=45)
    grid = parse_grid(
        [
            "minReplicas=0,1",
            "lagThreshold=2,5,20",
            "activationLagThreshold=0,10",
            "pollingInterval=5,30",
            "cooldownPeriod=60,600",
            "stabilizationWindowSeconds=0,300",
        ],
        base.partitions,
    )
    # Every combination, replayed in full once (a run does not depend on the target).
    names = list(grid)
    replays = []
    for combo in itertools.product(*(grid[n] for n in names)):
        s = replace(base, **dict(zip(names, combo, strict=True)))
        if s.minReplicas <= s.maxReplicas:
            replays.append(simulate(arrivals + [0] * 600, s))
    for target in (Target(wait_s=40), Target(wait_s=90, quantile=99), Target(wait_s=60, max_replica_hours=0.9)):
        tuned = tune(arrivals, base, target, grid, drain_s=600)
        # The cheapest that meets the target, then the shortest wait.
        every = [
            (r.gpu_seconds, r.wait_percentile(target.quantile))
            for r in replays
            if r.backlog == 0
            and r.wait_percentile(target.quantile) <= target.wait_s
            and (target.max_replica_hours is None or r.gpu_seconds <= target.max_replica_hours * 3600)
        ]
        assert tuned.feasible <= len(every)  # the cuts stop some runs that would have met it, never add one
        assert every and tuned.best is not None, f"the case must have an answer for {target}"
        assert (tuned.best.gpu_seconds, tuned.best.wait_percentile(target.quantile)) == min(every), target
        assert tuned.stopped > tuned.runs / 2  # and the cuts did stop most runs early


def test_the_command_prints_settings_that_load_as_config_and_says_when_none_meets_the_target(tmp_path):
    trace = tmp_path / "arrivals.csv"
    trace.write_text("timestamp\n" + "\n".join(str(1_700_000_000 + i * 0.5) for i in range(1200)) + "\n")
    flags = ["--trace", str(trace), "--per-replica-rps", "1", "--partitions", "4", "--cold-start", "30"]
    small = ["--grid", "lagThreshold=2,10", "--grid", "pollingInterval=5,15", "--grid", "cooldownPeriod=60"]
    ok = subprocess.run(abq_cmd("keda", "tune", *flags, *small, "--p95-wait", "90s"), capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    assert "cheapest:" in ok.stdout and "replica-hours" in ok.stdout
    block = ok.stdout.split("experiment config (abq deploy render writes the ScaledObject from it):\n")[1]
    block = block.split("or, in a ScaledObject")[0]
    ScalingConfig(**yaml.safe_load(block)["scaling"])  # pastes into an experiment config as it is
    so = yaml.safe_load(ok.stdout.split("in a ScaledObject written by hand:\n")[1])
    assert so["spec"]["triggers"][0]["metadata"]["lagThreshold"] in ("2", "10")

    js = subprocess.run(
        abq_cmd("keda", "tune", *flags, *small, "--p95-wait", "90s", "--format", "json"), capture_output=True, text=True
    )
    out = json.loads(js.stdout)
    assert out["met"] and out["chosen"]["wait_s_p95"] <= 90 and out["chosen"]["settings"]["lagThreshold"] in (2, 10)

    # 2 requests/s, at most one warm replica serving 1/s, and a 30 s cold start: none serves all at once.
    none = subprocess.run(
        abq_cmd("keda", "tune", *flags, *small, "--grid", "minReplicas=0,1", "--p95-wait", "0s"),
        capture_output=True,
        text=True,
    )
    assert none.returncode == 1, none.stderr
    assert "none meets the target" in none.stdout and "shortest wait:" in none.stdout

    bad = subprocess.run(
        abq_cmd("keda", "tune", *flags, "--grid", "lagThresold=5", "--p95-wait", "30s"), capture_output=True, text=True
    )
    assert bad.returncode == 2 and bad.stderr.strip().splitlines()[-1].startswith("abq: error: --grid 'lagThresold=5'")
