"""Progressive rollout against real workers: a failing candidate is rolled back at its first stage,
a healthy one reaches 100%, and the controller picks up where it was after a restart."""

import functools
import random
import statistics
import subprocess
import threading
import time

import pytest
from conftest import REPO, abq_cmd, new_experiment, write_config

from abqueue.control import live_config
from abqueue.control.rollout import (
    Guardrails,
    RolloutController,
    RolloutState,
    breach,
    heartbeat,
    load_state,
    request,
)
from producers import AbqClient
from schemas import ExperimentConfig, InferenceRequest


class Traffic:
    """Requests from many users at a steady rate, through a producer that follows the live config."""

    def __init__(self, settings, exp, rate=120):
        self.client = AbqClient(settings, exp, follow=True)
        self.exp, self.rate, self.stop = exp, rate, threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        i = 0
        while not self.stop.is_set():
            self.client.publish(
                InferenceRequest(experiment=self.exp.name, routing_key=f"user-{i}", prompt="hello there")
            )
            i += 1
            time.sleep(1 / self.rate)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join()
        self.client.close()


def _experiment(candidate_error_rate: float, candidate_latency_ms: float = 5) -> ExperimentConfig:
    base = new_experiment(variants=(("control", 100), ("candidate", 0)), latency_ms=5)
    candidate = {"latency_ms": candidate_latency_ms, "error_rate": candidate_error_rate}
    return ExperimentConfig.model_validate(
        {
            **base.model_dump(),
            "variants": [base.variants[0].model_dump(), {**base.variants[1].model_dump(), "engine_args": candidate}],
        }
    )


# A healthy candidate here still fails 1% of requests, as real ones do. The guardrails' always-valid
# tests roll back a candidate at its limits with a chance of at most alpha however long it is
# watched, and one this far inside them almost never (0 of 200 simulated stages with no difference:
# test_sequential_guardrails_...); 150 responses a stage keep the test quick.
HEALTHY_SAMPLES = 150


def _state(exp, stages, duration=1.5, min_samples=25, max_p95_ratio=3.0):
    return RolloutState(
        experiment=exp.name,
        candidate="candidate",
        control="control",
        stages=stages,
        stage_duration_s=duration,
        guardrails=Guardrails(max_error_rate=0.05, max_p95_ratio=max_p95_ratio, min_samples=min_samples),
    )


def _weight(settings, exp):
    return live_config.current(settings, exp.name).experiment.variant("candidate").weight


def test_a_candidate_failing_20_percent_is_rolled_back_at_its_first_stage(settings, thread_worker):
    exp = _experiment(0.2)
    live_config.apply(settings, exp)
    with thread_worker(exp, "control"), thread_worker(exp, "candidate"), Traffic(settings, exp):
        final = RolloutController(settings, _state(exp, [10, 50, 100]), exp, tick_s=0.3).run(until=_timeout(60))
    assert final.status == "rolled_back" and final.stage == 0
    assert final.reason.startswith("candidate: error rate") and final.reason.endswith("at stage 10%")
    assert _weight(settings, exp) == 0
    assert load_state(settings, exp.name).status == "rolled_back"


def test_a_healthy_candidate_reaches_100_percent(settings, thread_worker):
    exp = _experiment(0.01)
    live_config.apply(settings, exp)
    state = _state(exp, [20, 50, 100], min_samples=HEALTHY_SAMPLES)
    with thread_worker(exp, "control"), thread_worker(exp, "candidate"), Traffic(settings, exp, rate=200):
        final = RolloutController(settings, state, exp, tick_s=0.3).run(until=_timeout(120))
    assert final.status == "completed", final.history
    assert _weight(settings, exp) == 100
    assert [h.split(" ", 1)[1] for h in final.history if " stage " in h] == ["stage 20%", "stage 50%", "stage 100%"]


def _run_until(controller, condition, seconds, what):
    """Runs the controller until `condition` holds; fails if `seconds` pass first."""
    deadline = time.monotonic() + seconds
    controller.run(until=lambda: condition() or time.monotonic() > deadline)
    assert condition(), f"{what} within {seconds}s; history: {controller.state.history}"


def test_the_controller_resumes_after_a_restart_and_obeys_pause_resume_and_abort(settings, thread_worker):
    exp = _experiment(0.0)
    live_config.apply(settings, exp)
    with thread_worker(exp, "control"), thread_worker(exp, "candidate"), Traffic(settings, exp):
        # The subject is control flow, not guardrails: a p95 ratio over 5 ms latencies, with 25
        # samples, is scheduling noise on a loaded machine (it rolled this test back once in CI).
        state = _state(exp, [10, 30, 60, 80, 100], duration=1.0, max_p95_ratio=100.0)
        first = RolloutController(settings, state, exp, tick_s=0.3)
        _run_until(first, lambda: first.state.stage >= 1, 60, "the second stage")  # then the process "dies"
        stored = load_state(settings, exp.name)
        assert stored.status == "running" and stored.stage == 1 and _weight(settings, exp) == 30
        # A new controller continues at the stored stage: its next stage is the third, not the first again.
        second = RolloutController(settings, stored, exp, tick_s=0.3)
        _run_until(second, lambda: second.state.stage >= 2, 60, "the third stage after the restart")
        assert _weight(settings, exp) == 60
        assert [h.split(" ", 1)[1] for h in second.state.history if " stage " in h][-2:] == ["stage 30%", "stage 60%"]
        request(settings, exp.name, "pause")
        _run_until(second, lambda: second.state.status == "paused", 10, "the pause")
        assert load_state(settings, exp.name).status == "paused" and _weight(settings, exp) == 60
        request(settings, exp.name, "resume")
        _run_until(second, lambda: second.state.status == "running", 10, "the resume")
        _run_until(second, lambda: second.state.stage >= 3, 60, "the next stage after the resume")
        assert _weight(settings, exp) == 80
        request(settings, exp.name, "abort")
        final = RolloutController(settings, load_state(settings, exp.name), exp, tick_s=0.3)
        _run_until(final, lambda: final.state.status == "aborted", 30, "the abort")
    assert _weight(settings, exp) == 0
    with pytest.raises(ValueError, match="no rollout of"):
        request(settings, exp.name, "resume")


def _timeout(seconds):
    deadline = time.monotonic() + seconds
    return lambda: time.monotonic() > deadline


def test_abq_rollout_rolls_back_a_slow_candidate_on_the_p95_guardrail_and_exits_1(
    settings, kafka_bootstrap, thread_worker, tmp_path
):
    exp = _experiment(0.0, candidate_latency_ms=400)  # 80x the control's 5 ms: beyond any queueing noise
    live_config.apply(settings, exp)
    cmd = abq_cmd(
        "rollout", "start", "--config", str(write_config(exp, tmp_path)), "--candidate", "candidate",
        "--stages", "20,100", "--stage-duration", "10m", "--min-samples", "40", "--max-p95-ratio", "3",
        "--bootstrap-servers", kafka_bootstrap,
    )  # fmt: skip
    with thread_worker(exp, "control"), thread_worker(exp, "candidate"), Traffic(settings, exp, rate=200):
        out = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=120)
    assert out.returncode == 1, out.stderr
    assert "rollout rolled back: candidate: p95 latency of" in out.stdout, out.stdout
    assert "stage 1/2 (20%): candidate " in out.stdout, out.stdout  # a progress line per check, not silence
    assert "is above 3x the control's" in out.stdout
    assert _weight(settings, exp) == 0 and load_state(settings, exp.name).status == "rolled_back"
    status = subprocess.run(
        abq_cmd("rollout", "status", "--experiment", exp.name, "--bootstrap-servers", kafka_bootstrap),
        capture_output=True, text=True, cwd=REPO, timeout=60,
    )  # fmt: skip
    assert status.returncode == 0 and "rolled back" in status.stdout and "rolled_back" not in status.stdout, (
        status.stdout
    )


def test_stage_statistics_keep_up_with_more_than_one_poll_of_responses_a_tick():
    from types import SimpleNamespace

    from test_report import _responses

    from abqueue.control.rollout import StageStats
    from schemas import encode

    exp = _experiment(0.0)
    responses = [encode(r) for r in _responses(exp, "candidate", 1500, lambda i: 1.0, errors=15)]

    class Busy:  # 1,500 responses waiting: three polls' worth
        def __init__(self):
            self.left = [SimpleNamespace(value=v) for v in responses]

        def poll(self, timeout_ms):
            batch, self.left = self.left[:500], self.left[500:]
            return {"tp": batch} if batch else {}

    stats = StageStats.__new__(StageStats)  # the counting alone, no consumer behind it
    stats._counting(since=0.0, version=None)
    stats._c = Busy()
    stats.poll()
    assert stats.count("candidate") == 1500 and stats.errors["candidate"] == 15


def test_an_abort_is_not_lost_when_the_controller_saves_its_state_after_it(settings):
    from abqueue.control.rollout import save_state

    exp = _experiment(0.0)
    live_config.apply(settings, exp)
    controller = RolloutController(settings, _state(exp, [10, 100], duration=600), exp, tick_s=0.1)
    _run_until(controller, lambda: controller.state.stage_started_at > 0, 10, "the first stage")
    request(settings, exp.name, "abort")
    save_state(settings, controller.state)  # the controller's own save, a moment after the operator's abort
    _run_until(controller, lambda: controller.state.status == "aborted", 10, "the abort")
    assert _weight(settings, exp) == 0 and load_state(settings, exp.name).status == "aborted"


def _abq(*args, bootstrap):
    return subprocess.run(
        abq_cmd(*args, "--bootstrap-servers", bootstrap), capture_output=True, text=True, cwd=REPO, timeout=60
    )


def test_commands_know_whether_a_controller_is_alive(settings, kafka_bootstrap):
    """Issue 12: `abort` said "the controller acts within a second" with none running, and `status`
    kept saying "running". With no controller alive, an abort acts at once by itself; pause and
    resume are recorded and say that nothing acts on them yet; status says who is (not) running."""
    from abqueue.control.rollout import save_state

    exp = _experiment(0.0)
    live_config.apply(settings, exp)
    live_config.apply(settings, live_config.current(settings, exp.name).experiment.model_copy(update={
        "variants": [exp.variants[0].model_copy(update={"weight": 80}), exp.variants[1].model_copy(update={"weight": 20})]
    }))  # fmt: skip
    save_state(settings, _state(exp, [20, 100]).model_copy(update={"stage_started_at": time.time()}))
    status = _abq("rollout", "status", "--experiment", exp.name, bootstrap=kafka_bootstrap)
    assert status.returncode == 0 and "no controller is running" in status.stdout, status.stdout
    paused = _abq("rollout", "pause", "--experiment", exp.name, bootstrap=kafka_bootstrap)
    assert paused.returncode == 3 and "no controller is running" in paused.stdout and "rollout start" in paused.stdout
    aborted = _abq("rollout", "abort", "--experiment", exp.name, bootstrap=kafka_bootstrap)
    assert aborted.returncode == 0 and "aborted here" in aborted.stdout, aborted.stdout + aborted.stderr
    assert _weight(settings, exp) == 0 and load_state(settings, exp.name).status == "aborted"


def test_status_shows_the_controller_the_samples_and_the_time_left(settings, kafka_bootstrap):
    exp = _experiment(0.0)
    live_config.apply(settings, exp)
    controller = RolloutController(settings, _state(exp, [10, 100], duration=600), exp, tick_s=0.1)
    # Until its first heartbeat, not a second of the stage: entering the stage alone can take longer
    # than that on a loaded machine, and the controller then stopped before its first tick (flaky in CI).
    _run_until(controller, lambda: heartbeat(settings, exp.name) is not None, 20, "the first heartbeat")
    status = _abq("rollout", "status", "--experiment", exp.name, bootstrap=kafka_bootstrap)
    out = status.stdout
    assert "controller alive" in out and "candidate 0/25 samples" in out and "left in the stage" in out, out
    assert "error rate" in out and "max 5.0%" in out and "p95" in out, out


def _simulate(judge, cand_error, cand_slower, rnd, n_max=4000, every=200, ctl_error=0.02):
    """One rollout stage watched after every `every` responses per variant: the samples at which
    the guardrails roll it back, or None. Latencies lognormal; the candidate's scaled by `cand_slower`
    (so its p95 is that many times the control's)."""
    cand_lat, ctl_lat, cand_err, ctl_err = [], [], 0, 0
    for n in range(every, n_max + 1, every):
        for _ in range(every):
            if rnd.random() < ctl_error:
                ctl_err += 1
            else:
                ctl_lat.append(rnd.lognormvariate(0, 0.5))
            if rnd.random() < cand_error:
                cand_err += 1
            else:
                cand_lat.append(cand_slower * rnd.lognormvariate(0, 0.5))
        if judge(cand_lat, cand_err, ctl_lat, ctl_err):
            return n
    return None


def test_sequential_guardrails_keep_false_rollbacks_under_alpha_and_catch_real_regressions():
    """Checked after every 200 responses up to 4,000 (20 looks), fixed thresholds on point estimates
    roll back healthy candidates on noise; the always-valid tests keep false rollbacks at most alpha
    even for a candidate exactly at its limits, and still catch real regressions."""
    from abqueue.analysis.stats import percentile

    g = Guardrails(min_samples=200)  # alpha 0.05; error rate <= 5%, <= control + 2 points; p95 <= 1.5x
    judge = functools.partial(breach, g)
    rnd = random.Random(7)
    runs = 200
    same = [_simulate(judge, 0.02, 1.0, rnd) for _ in range(runs)]
    at_limits = [_simulate(judge, 0.04, 1.0, rnd) for _ in range(runs)]
    at_limits += [_simulate(judge, 0.02, 1.5, rnd) for _ in range(runs)]
    false_same = sum(r is not None for r in same) / runs
    false_limits = sum(r is not None for r in at_limits) / len(at_limits)
    caught = {
        name: [r for _ in range(100) if (r := _simulate(judge, error, slower, rnd)) is not None]
        for name, error, slower in (("errors", 0.08, 1.0), ("slow", 0.02, 2.0))
    }

    def fixed(cand_lat, cand_err, ctl_lat, ctl_err):  # a threshold on the point estimates, as before
        too_slow = percentile(cand_lat, 95) > g.max_p95_ratio * percentile(ctl_lat, 95)
        return cand_err / (len(cand_lat) + cand_err) > g.max_error_rate or too_slow

    fixed_limits = sum(_simulate(fixed, 0.02, 1.5, rnd) is not None for _ in range(runs)) / runs
    print(
        f"\nfalse rollbacks over {runs} stages: {false_same:.1%} with no difference, {false_limits:.1%} at the "
        f"limits (fixed thresholds at the p95 limit: {fixed_limits:.1%}); caught: 8% errors against 2% in "
        f"{len(caught['errors'])}/100 (median {statistics.median(caught['errors']):.0f} responses), p95 2x in "
        f"{len(caught['slow'])}/100 (median {statistics.median(caught['slow']):.0f})"
    )
    assert false_same <= g.alpha and false_limits <= g.alpha
    assert fixed_limits > 2 * g.alpha  # the problem this solves
    assert len(caught["errors"]) >= 95 and len(caught["slow"]) >= 95


def test_a_slow_candidate_s_answers_still_on_their_way_are_no_sample_ratio_mismatch():
    """Users were counted from responses as they arrived: early in a stage a candidate answering in
    0.4 s had a second of its users still on their way, and the stage halted on a "mismatch" before
    its p95 guardrail could roll it back (seen in CI). Users are now counted once both variants have
    had time to answer them; a candidate that drops requests still halts the stage."""
    from abqueue.control.rollout import StageStats, sample_ratio_halt, with_weight

    exp = _experiment(0.0)
    state = _state(exp, [20, 100], min_samples=40)
    weights = with_weight(exp, "candidate", "control", 20)
    now = time.time()

    def stage(candidate_answers):
        # 200 users a second for 5 s, 20% of them the candidate's: the control's all answered, the
        # candidate's only those that came more than `candidate_answers` ago (the rest in flight).
        st = StageStats.__new__(StageStats)
        st.slowest_s = 0.4
        st.units = {"control": {}, "candidate": {}}
        for i in range(1000):
            at = now - 5 + i / 200
            if i % 5 == 0:
                if at <= now - candidate_answers:
                    st.units["candidate"][f"k{i}"] = at
            else:
                st.units["control"][f"c{i}"] = at
        return sample_ratio_halt(state, st, weights, now=now)

    assert stage(candidate_answers=1.5) is None  # slow, not short: its users arrive
    why = stage(candidate_answers=60)  # answers nobody: dropped
    assert why is not None and why.startswith("sample ratio mismatch at stage 20%")


def test_a_stage_halts_when_its_users_do_not_split_as_its_weights_say():
    """A candidate whose worker drops requests loses them without a single error response: the
    guardrails see nothing wrong. The sample-ratio check on the stage's own config version does."""
    from abqueue.control.rollout import StageStats, sample_ratio_halt, with_weight

    exp = _experiment(0.0)
    state = _state(exp, [10, 100], min_samples=50)
    weights = with_weight(exp, "candidate", "control", 10)

    def stage(control_users, candidate_users):
        st = StageStats.__new__(StageStats)  # the counting alone, no consumer behind it
        st.slowest_s, long_ago = 0.1, time.time() - 60  # every answer long in
        st.units = {
            "control": dict.fromkeys((f"c{i}" for i in range(control_users)), long_ago),
            "candidate": dict.fromkeys((f"k{i}" for i in range(candidate_users)), long_ago),
        }
        return sample_ratio_halt(state, st, weights)

    assert stage(1800, 200) is None  # 10% as weighted
    assert stage(1820, 180) is None  # chance: p = 0.13
    why = stage(1900, 100)
    assert why is not None and why.startswith("sample ratio mismatch at stage 10%")
    from scipy.stats import chisquare

    assert f"(p={chisquare([1900, 100], [1800, 200]).pvalue:.2g})" in why
    assert stage(450, 10) is None  # too few users for the candidate's share to judge yet


def test_a_controller_reads_each_rollout_record_once_and_keeps_a_bounded_sample_of_a_stage(settings, monkeypatch):
    """Each tick read the whole abq.rollouts topic (a heartbeat every 5 s, never compacted in its
    active segment: 0.68 s a read after two days' worth), and a stage kept every id and latency."""
    from test_report import _responses

    from abqueue.control import rollout
    from abqueue.control.rollout import COMMANDS, HEARTBEATS, RolloutCommand, RolloutHeartbeat, StageStats
    from abqueue.kafka import producer
    from schemas import encode

    name = f"t{random.randrange(10**9)}"
    HEARTBEATS.ensure(settings)
    p = producer(settings)
    for i in range(100):
        beat = RolloutHeartbeat(at=i, controller="c", stage=0, stage_ends_at=0)
        p.send(HEARTBEATS.topic, key=f"{name}/heartbeat".encode(), value=encode(beat))
    p.flush()
    p.close()
    tail = COMMANDS.tail(settings, {f"{name}/command"})
    try:
        assert tail.latest(f"{name}/command") is None and tail.read >= 100
        before = tail.read
        COMMANDS.put(settings, f"{name}/command", RolloutCommand(what="pause", at=1.0))
        assert tail.latest(f"{name}/command").what == "pause"
        assert tail.read - before == 1  # what is new, not the topic again
    finally:
        tail.close()

    monkeypatch.setattr(rollout, "LATENCY_SAMPLE", 100)
    exp = _experiment(0.0)
    records = [type("R", (), {"value": r.model_dump_json().encode()}) for r in _responses(exp, "candidate", 1000, lambda i: i / 1000, errors=10)]  # fmt: skip
    st = StageStats.__new__(StageStats)
    st._counting(since=0.0, version=None)
    st._take(records)
    assert st.count("candidate") == 1000 and st.error_rate("candidate") == 0.01
    assert len(st.latency["candidate"]) == 100 and 0.85 < st.p95("candidate") <= 1.0  # a uniform sample
