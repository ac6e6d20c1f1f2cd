"""`abq keda simulate`: requests are conserved, a hand-computed case comes out as computed, and a
sweep compares settings side by side with a chart."""

import json
import subprocess

from conftest import REPO, abq_cmd

from abqueue.scaling.simulate import Settings, profile, simulate


def test_one_warm_replica_drains_a_burst_exactly_as_computed_by_hand():
    # 100 requests at second 0; one replica, always ready, serving 10/s: second s serves 10 requests
    # that waited s seconds, so the backlog is 90, 80, ..., 0 and the waits are 0..9 (10 each).
    s = Settings(minReplicas=1, maxReplicas=1, per_replica_rps=10, cold_start_s=0, partitions=1, pollingInterval=15)
    r = simulate(profile("burst:100@0", 20), s, initial_replicas=1)
    assert [row["backlog"] for row in r.timeline[:11]] == [90, 80, 70, 60, 50, 40, 30, 20, 10, 0, 0]
    assert sorted(r.waits) == [(t, t, 10) for t in range(10)]
    assert (r.wait_percentile(50), r.wait_percentile(95)) == (4.0, 9.0)
    assert r.summary()["gpu_hours"] == 20 / 3600


def test_scale_from_zero_waits_for_the_poll_and_the_cold_start():
    # Zero replicas; KEDA polls every 15 s, so the burst at second 1 is seen at 15, the pod serves
    # from 15 + 30 = 45: the first requests waited 44 s.
    s = Settings(minReplicas=0, maxReplicas=1, per_replica_rps=100, cold_start_s=30, partitions=1, pollingInterval=15)
    r = simulate(profile("burst:50@1", 120), s)
    assert r.timeline[14]["replicas"] == 0 and r.timeline[15]["replicas"] == 1
    assert r.timeline[44]["backlog"] == 50 and r.timeline[45]["backlog"] == 0
    assert r.wait_percentile(100) == 44.0


def test_requests_are_conserved_at_every_step_under_a_diurnal_load_with_scale_to_zero():
    s = Settings(
        lagThreshold=10,
        minReplicas=0,
        maxReplicas=6,
        partitions=4,  # fewer than the replicas KEDA may start: two of them get no partition
        per_replica_rps=2,
        cold_start_s=60,
        cooldownPeriod=120,
        stabilizationWindowSeconds=60,
    )
    r = simulate(profile("diurnal:6,7200", 7200) + [0] * 3600, s)
    arrived = served = 0
    for row in r.timeline:  # conservation at every step, not only at the end
        arrived, served = arrived + row["arrived"], served + row["served"]
        assert arrived == served + row["backlog"], row
    assert r.arrived == arrived and r.served == served and r.arrived > 15_000
    assert r.backlog == 0 and r.timeline[-1]["replicas"] == 0  # drained, then scaled to zero after the cooldown
    assert max(row["replicas"] for row in r.timeline) <= 6
    assert max(row["ready"] for row in r.timeline) > 4, "the case must have more ready replicas than partitions"
    # Never more serving than partitions, whatever the replica count: 4 partitions x 2 requests/s.
    assert max(row["served"] for row in r.timeline) <= 4 * 2


def test_simulate_command_sweeps_a_setting_and_writes_a_chart(tmp_path):
    trace = tmp_path / "arrivals.csv"
    trace.write_text("timestamp\n" + "\n".join(str(1_700_000_000 + i * 0.25) for i in range(2000)) + "\n")
    png = tmp_path / "sim.png"
    out = subprocess.run(
        abq_cmd(
            "keda",
            "simulate",
            "--trace",
            str(trace),
            "--per-replica-rps",
            "1.5",
            "--max-replicas",
            "8",
            "--partitions",
            "8",
            "--cold-start",
            "60",
            "--sweep",
            "lagThreshold=5,20,80",
            "--png",
            str(png),
            "--format",
            "json",
        ),
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout[: out.stdout.rindex("}") + 1])
    rows = {s["setting"]: s for s in data["summaries"]}
    assert set(rows) == {"lagThreshold=5", "lagThreshold=20", "lagThreshold=80"}
    assert all(s["arrived"] == 2000 == s["served"] + s["backlog_at_end"] for s in rows.values())
    # A lower threshold scales out further and waits less, at more GPU-hours.
    low, high = rows["lagThreshold=5"], rows["lagThreshold=80"]
    assert low["max_replicas"] > high["max_replicas"]
    assert low["wait_s_p95"] < high["wait_s_p95"]
    assert low["gpu_hours"] > high["gpu_hours"]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    bad = subprocess.run(
        abq_cmd("keda", "simulate", "--profile", "wave:3", "--per-replica-rps", "1"),
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    assert bad.returncode == 2 and "is not burst:N@T" in bad.stderr and bad.stderr.count("\n") == 1


def test_a_zero_scale_down_window_follows_the_lag_down_at_once():
    """`--stabilization-window 0` (the HPA's own default for scale-up, and a valid scale-down setting)
    crashed the simulator: the window emptied before the highest recommendation in it was taken."""
    s = Settings(
        lagThreshold=10,
        maxReplicas=4,
        partitions=4,
        per_replica_rps=5,
        cold_start_s=0,
        pollingInterval=5,
        stabilizationWindowSeconds=0,
        cooldownPeriod=600,
    )
    r = simulate(profile("step:20,5@60", 120) + [0] * 60, s)
    assert r.backlog == 0
    replicas = [row["replicas"] for row in r.timeline]
    assert max(replicas[:60]) == 4 and replicas[-1] == 1  # down at the first poll, with no window to wait out


def test_from_one_replica_the_hpa_scales_on_its_own_sync_period_not_kedas_polling_interval():
    """KEDA's pollingInterval decides 0 -> 1 and 1 -> 0; from 1 to N it is the HPA, which reads KEDA's
    metric every --horizontal-pod-autoscaler-sync-period (15 s by default). The simulator scaled 1 -> N
    at every KEDA poll, so it (and `keda tune`) credited a short pollingInterval with faster scale-ups
    than a cluster gives."""
    s = Settings(
        lagThreshold=10, minReplicas=0, maxReplicas=4, partitions=4, per_replica_rps=1, cold_start_s=0,
        pollingInterval=5, cooldownPeriod=600,
    )  # fmt: skip
    assert s.hpaSyncPeriod == 15
    r = simulate(profile("burst:40@1", 40), s)
    replicas = [row["replicas"] for row in r.timeline]
    assert replicas[4] == 0 and replicas[5] == 1  # KEDA's poll at 5 s wakes the variant
    assert replicas[14] == 1 and replicas[15] > 1  # the HPA's sync at 15 s scales it out, not KEDA's polls at 10
