"""Progressive rollout against real workers: a failing candidate is rolled back at its first stage,
a healthy one reaches 100%, and the controller picks up where it was after a restart."""

import threading
import time

import pytest
from conftest import new_experiment

from abqueue.control import live_config
from abqueue.control.rollout import Guardrails, RolloutController, RolloutState, load_state, request
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
            self.client.publisher.publish(
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


def _experiment(candidate_error_rate: float) -> ExperimentConfig:
    base = new_experiment(variants=(("control", 100), ("candidate", 0)), latency_ms=5)
    return ExperimentConfig.model_validate(
        {
            **base.model_dump(),
            "variants": [
                base.variants[0].model_dump(),
                {**base.variants[1].model_dump(), "engine_args": {"latency_ms": 5, "error_rate": candidate_error_rate}},
            ],
        }
    )


def _state(exp, stages, duration=1.5):
    return RolloutState(
        experiment=exp.name,
        candidate="candidate",
        control="control",
        stages=stages,
        stage_duration_s=duration,
        guardrails=Guardrails(max_error_rate=0.05, max_p95_ratio=3.0, min_samples=25),
    )


def _weight(settings, exp):
    return live_config.current(settings, exp.name).experiment.variant("candidate").weight


def test_a_candidate_failing_20_percent_is_rolled_back_at_its_first_stage(settings, thread_worker):
    exp = _experiment(0.2)
    live_config.apply(settings, exp)
    with thread_worker(exp, "control"), thread_worker(exp, "candidate"), Traffic(settings, exp):
        final = RolloutController(settings, _state(exp, [10, 50, 100]), exp, tick_s=0.3).run(until=_timeout(60))
    assert final.status == "rolled_back" and final.stage == 0
    assert "error rate" in final.reason and "exceeds the guardrail 5.0% at stage 10%" in final.reason
    assert _weight(settings, exp) == 0
    assert load_state(settings, exp.name).status == "rolled_back"


def test_a_healthy_candidate_reaches_100_percent(settings, thread_worker):
    exp = _experiment(0.0)
    live_config.apply(settings, exp)
    with thread_worker(exp, "control"), thread_worker(exp, "candidate"), Traffic(settings, exp):
        final = RolloutController(settings, _state(exp, [20, 50, 100]), exp, tick_s=0.3).run(until=_timeout(90))
    assert final.status == "completed", final.history
    assert _weight(settings, exp) == 100
    assert [h.split(" ", 1)[1] for h in final.history if " stage " in h] == ["stage 20%", "stage 50%", "stage 100%"]


def test_the_controller_resumes_after_a_restart_and_obeys_pause_and_abort(settings, thread_worker):
    exp = _experiment(0.0)
    live_config.apply(settings, exp)
    with thread_worker(exp, "control"), thread_worker(exp, "candidate"), Traffic(settings, exp):
        first = RolloutController(settings, _state(exp, [10, 30, 60, 100], duration=1.0), exp, tick_s=0.3)
        first.run(until=lambda: first.state.stage >= 1)  # the process "dies" at its second stage
        stored = load_state(settings, exp.name)
        assert stored.status == "running" and stored.stage == 1 and _weight(settings, exp) == 30
        request(settings, exp.name, "pause")
        second = RolloutController(settings, stored, exp, tick_s=0.3)
        second.run(until=lambda: second.state.status == "paused")
        assert _weight(settings, exp) == 30  # paused: the weights stay
        request(settings, exp.name, "abort")
        final = RolloutController(settings, load_state(settings, exp.name), exp, tick_s=0.3).run(until=_timeout(30))
    assert final.status == "aborted" and _weight(settings, exp) == 0
    with pytest.raises(ValueError, match="no rollout of"):
        request(settings, exp.name, "resume")


def _timeout(seconds):
    deadline = time.monotonic() + seconds
    return lambda: time.monotonic() > deadline
