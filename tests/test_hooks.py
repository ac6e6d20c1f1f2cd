"""Request and response hooks: what they change reaches the engine and the caller; one that raises,
hangs or returns the wrong thing fails only its own request (an error answer and a dead letter),
and the worker serves on. On the stub transport, then once end to end on the real broker."""

from __future__ import annotations

import time

import pytest
from conftest import ThreadWorker, metric_values, new_experiment
from kafka_helpers import dead_letters, wait_until

from abqueue.hooks import extract_json, redact_pii
from abqueue.kafka import ensure_topics
from producers import AbqClient
from schemas import ConfigError, ExperimentConfig, InferenceRequest
from schemas.experiment import HookConfig
from workers.middleware.hooks import Hooks


def shout(request, outputs):
    return [o.upper() for o in outputs]


def picky(request):
    """Fails as its prompt says."""
    if request.prompt == "raise":
        raise ValueError("no thanks")
    if request.prompt == "hang":
        time.sleep(5)
    if request.prompt == "wrong":
        return "not a request"
    if request.prompt == "moved":  # to another variant: in a pool that would run another adapter
        return request.model_copy(update={"variant": "elsewhere"})
    return request


def _with_hooks(**hooks) -> ExperimentConfig:
    data = new_experiment(variants=(("a", 100),)).model_dump()
    data["variants"][0]["hooks"] = {"timeout_s": 0.3, **hooks}
    return ExperimentConfig.model_validate(data)


def test_hooks_change_what_the_engine_sees_and_what_the_caller_gets(stub_worker):
    exp = _with_hooks(request="abqueue.hooks:redact_pii", response="test_hooks:shout")
    with stub_worker(exp) as w:
        w.send(prompt="mail ada@example.com or call +44 20 7946 0958 now")
        (r,) = w.wait_responses(1)
        text = metric_values(_metrics(w.worker), hook="request")
    assert r.ok and r.outputs == ["MAIL [EMAIL] OR CALL [PHONE] NOW"]  # the echo engine saw the redacted prompt
    assert text["abq_hook_seconds_count"] == 1


def _metrics(worker) -> str:
    from prometheus_client import generate_latest

    return generate_latest(worker.registry).decode()


def test_a_hook_that_raises_hangs_or_returns_the_wrong_thing_fails_only_its_request(stub_worker):
    exp = _with_hooks(request="test_hooks:picky", response="abqueue.hooks:extract_json")
    with stub_worker(exp) as w:
        sent = {
            p: w.send(prompt=p, routing_key=p)
            for p in ("raise", "hang", "wrong", "moved", "no json here", '{"ok": 1} thanks')
        }
        responses = {r.request_id: r for r in w.wait_responses(6, timeout=10)}
        w.broker.wait_for(lambda: len(w.dead_letters()) >= 5, 5, "five dead letters")
        letters = {d.request_id: d for d in w.dead_letters()}
        later = w.send(prompt='["served", "after"]')  # the worker serves on, a hook thread stuck or not
        w.broker.wait_for(lambda: len(w.broker.records(exp.response_topic)) >= 7, 5, "the request after")
        assert w.error is None and not w.worker.stopping
        failures = metric_values(_metrics(w.worker), hook="request")["abq_hook_failures_total"]
    by = {p: responses[r.id] for p, r in sent.items()}
    assert by['{"ok": 1} thanks'].ok and by['{"ok": 1} thanks'].outputs == ['{"ok":1}']
    expected = {
        "raise": "request hook test_hooks:picky raised ValueError: no thanks",
        "hang": "request hook test_hooks:picky took longer than 0.3s",
        "wrong": "request hook test_hooks:picky returned str, not an InferenceRequest, same id",
        "moved": "request hook test_hooks:picky returned InferenceRequest, not an InferenceRequest, same id and variant",
        "no json here": "response hook abqueue.hooks:extract_json raised ValueError: no JSON object or array",
    }
    for prompt, why in expected.items():
        r, letter = by[prompt], letters[sent[prompt].id]
        assert r.error is not None and r.error.code == "invalid_request" and why in r.error.message, (prompt, r.error)
        assert letter.reason == "hook_failed" and why in letter.detail
    assert len(letters) == 5 and failures == 4
    (after,) = [r for r in w.responses() if r.request_id == later.id]
    assert after.ok and after.outputs == ['["served","after"]']


def slow_for_some(request):
    if request.prompt == "hang":
        time.sleep(3)
    return request.model_copy(update={"prompt": request.prompt.upper()})


@pytest.mark.parametrize("batching", ["continuous", "static"])
def test_a_slow_hook_costs_its_own_requests_and_no_one_else_s(stub_worker, batching):
    """Hooks ran one request at a time on the worker's loop, each waiting out its time limit: twelve
    hanging requests held another variant's request 6 s, and 512 in flight could block the loop past
    max.poll.interval.ms. Each call now runs on its own; a request with a quick hook is answered
    while the others hang."""
    data = new_experiment(variants=(("slow", 50), ("fast", 50))).model_dump()
    for v in data["variants"]:
        v["pool"], v["model"], v["engine_args"] = "p", "echo", {"batching": batching}
    data["variants"][0]["hooks"] = {"timeout_s": 1.0, "request": "test_hooks:slow_for_some"}
    exp = ExperimentConfig.model_validate(data)
    with stub_worker(exp, "p", max_batch=32) as w:
        for i in range(12):
            w.send(variant="slow", prompt="hang", routing_key=f"h{i}")
        t0 = time.monotonic()
        other = w.send(variant="fast", prompt="quick one")
        mine = w.send(variant="slow", prompt="quick too")
        w.broker.wait_for(lambda: {r.request_id for r in w.responses()} >= {other.id, mine.id}, 5, "the quick answers")
        took = time.monotonic() - t0
        answers = w.wait_responses(14, timeout=10)
    assert took < 0.9, f"the quick requests waited {took:.2f}s behind hanging hooks"  # one limit is 1 s, twelve 12 s
    by = {r.request_id: r for r in answers}
    assert by[other.id].outputs == ["quick one"] and by[mine.id].outputs == ["QUICK TOO"]
    hung = [r for r in answers if r.request_id not in (other.id, mine.id)]
    assert len(hung) == 12 and all(r.error.code == "invalid_request" and "took longer than 1s" in r.error.message for r in hung)  # fmt: skip


def test_a_vllm_worker_keeps_no_prepared_prompt_for_a_request_a_hook_replaced(monkeypatch):
    """5,000 requests through redact_pii left 5,000 token-id cache entries: the engine prepared the
    request before the hook replaced it, and the replaced one was never run. The hooked request is
    what the engine checks and prepares now, and the cache is bounded whatever happens."""
    from workers.engines import vllm_common

    class Words:
        chat_template = None

        def encode(self, text, add_special_tokens=True):
            return [len(w) for w in text.split()]

    monkeypatch.setattr(vllm_common, "sampling_params", lambda request, final_only=False: None)
    prep = vllm_common.PromptPrep()
    prep.tokenizer, prep.max_model_len, prep.batching = Words(), 1000, "continuous"
    prep._init_prep()
    ran = []
    prep.submit = lambda request, done: (ran.append(prep.token_ids(request)), done(None))
    hooks = Hooks({"a": HookConfig(request="abqueue.hooks:redact_pii", timeout_s=5)})
    hooks._experiment = "e"
    from prometheus_client import CollectorRegistry

    worker = type(
        "W", (), {"engine": prep, "experiment": type("E", (), {"name": "e"}), "registry": CollectorRegistry()}
    )
    hooks.before_start(worker)
    from workers.runners import engine_call

    call = hooks.wrap_engine(worker, engine_call(prep))
    finished = []
    for i in range(500):
        req = InferenceRequest(experiment="e", routing_key="k", variant="a", prompt=f"write to ada{i}@example.com now")
        assert prep.check(req) is None  # EngineCheck, before the hook
        call([req], lambda j, result: finished.append(result))
    wait_until(lambda: len(finished) == 500, 10, "500 requests through the hook")
    assert ran[0] == [5, 2, 7, 3] and len(prep._token_ids) == 0  # "[EMAIL]": the hooked prompt ran
    for _ in range(vllm_common.PREPARED_MAX + 10):  # checked, never run: the oldest are let go
        prep.check(InferenceRequest(experiment="e", routing_key="k", prompt="x"))
    assert len(prep._token_ids) == vllm_common.PREPARED_MAX


def test_a_hook_that_cannot_be_loaded_stops_the_worker_in_one_line(stub_worker):
    with pytest.raises(ConfigError, match=r"hook nowhere\.to\.be:found: cannot import nowhere"):
        stub_worker(_with_hooks(request="nowhere.to.be:found"))
    with pytest.raises(ConfigError, match="module abqueue.hooks has no missing"):
        stub_worker(_with_hooks(response="abqueue.hooks:missing"))
    with pytest.raises(ValueError, match="String should match pattern"):
        _with_hooks(request="not a path")


def test_the_example_hooks():
    req = InferenceRequest(
        experiment="e", routing_key="k",
        messages=[{"role": "user", "content": "card 4111 1111 1111 1111, ip 10.0.0.12, bob@corp.io"}],
    )  # fmt: skip
    assert redact_pii(req).messages[0].content == "card [CARD], ip [IP], [EMAIL]"
    assert redact_pii(req).id == req.id
    assert extract_json(req, ['Sure! ```json\n{"a": [1, 2], "b": "é"}\n``` hope it helps', "[] and {}"]) == [
        '{"a":[1,2],"b":"é"}',
        "[]",
    ]
    with pytest.raises(ValueError, match="no JSON"):
        extract_json(req, ["{not json"])


def test_hooks_end_to_end_on_the_real_broker(settings):
    exp = _with_hooks(request="abqueue.hooks:redact_pii", response="abqueue.hooks:extract_json")
    ensure_topics(settings, exp)
    with ThreadWorker(settings, exp, "a"), AbqClient(settings, exp) as client:
        good = client.submit(
            InferenceRequest(experiment=exp.name, routing_key="u1", prompt='{"from": "ada@example.com"}'), timeout=30
        )
        bad = client.submit(InferenceRequest(experiment=exp.name, routing_key="u2", prompt="plain"), timeout=30)
    assert good.response.ok and good.response.outputs == ['{"from":"[EMAIL]"}']
    assert bad.response.error is not None and "hook_failed" in bad.response.error.message
    (letter,) = dead_letters(settings, exp.deadletter_topic, expect=1, timeout=30)
    assert letter.reason == "hook_failed" and letter.request_id == bad.response.request_id
