"""Requests with an OpenAI body on the stub transport: what abqueue reads from a body, what it
refuses, the variant's treatment of a body, hooks on bodies, the echo engine's answers in OpenAI's
shapes, and a request of the format without a body answered as before. vLLM's own serving of
bodies is tests/test_openai_bodies.py's."""

from __future__ import annotations

import orjson
import pytest
from conftest import new_experiment, write_config

from abqueue.hooks import redact_pii
from schemas import ConfigError, InferenceRequest, load_experiment
from schemas.body import CHAT, EMBEDDINGS, BodyError, answer_texts, with_answer_texts
from schemas.experiment import SamplingConfig
from schemas.legacy import lowered
from workers.engines.echo import ECHO_DIMENSIONS, EchoEngine

TOOLS = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]


def _body_request(endpoint=CHAT, **body):
    body.setdefault("messages", [{"role": "user", "content": "hello there"}])
    if endpoint != CHAT:
        body.pop("messages")
    return InferenceRequest(experiment="e", routing_key="u", variant="a", endpoint=endpoint, body=body)


def test_a_body_and_the_same_request_without_one_ask_for_the_same_things():
    with_body = _body_request(messages=[{"role": "system", "content": "be brief"},
                                        {"role": "user", "content": [{"type": "text", "text": "hi "}, {"type": "text", "text": "there"}]}],
                              max_completion_tokens=7, n=2, logprobs=True, top_logprobs=3)  # fmt: skip
    without = InferenceRequest(
        experiment="e", routing_key="u",
        messages=[{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi there"}],
        max_tokens=7, n=2, logprobs=True, top_logprobs=3,
    )  # fmt: skip
    assert with_body.asks() == without.asks()
    assert with_body.prompt_chars() == len("be brief") + len("hi there")
    legacy = _body_request(endpoint="/v1/completions", prompt="abc", logprobs=2, max_tokens=4).asks()
    assert (legacy.logprobs, legacy.top_logprobs, legacy.max_tokens) == (True, 2, 4)
    embed = _body_request(endpoint=EMBEDDINGS, input=["a cat", "a dog"]).asks()
    assert embed.texts == ("a cat", "a dog") and embed.max_tokens is None and not embed.generates


@pytest.mark.parametrize(
    "endpoint, body, problem",
    [
        (CHAT, {"messages": []}, "messages must be a non-empty list"),
        (CHAT, {"messages": ["hi"]}, "messages.0 must be an object with 'role' and 'content', not JSON string"),
        (CHAT, {"messages": [{"role": "user", "content": 5}]}, "content must be a string or a list"),
        (CHAT, {"messages": [{"role": "user", "content": "x"}], "max_tokens": 0}, "max_tokens must be a whole number"),
        (CHAT, {"messages": [{"role": "user", "content": "x"}], "n": 99}, "n must be at most 16"),
        (CHAT, {"messages": [{"role": "user", "content": "x"}], "temperature": 3}, "less than or equal to 2"),
        (CHAT, {"messages": [{"role": "user", "content": "x"}], "stop": [""]}, "must not be empty strings"),
        ("/v1/completions", {}, "prompt is required"),
        (EMBEDDINGS, {}, "input is required"),
    ],
)
def test_a_body_abqueue_cannot_read_is_refused_naming_the_field(endpoint, body, problem):
    with pytest.raises(ValueError, match=problem):
        InferenceRequest(experiment="e", routing_key="u", endpoint=endpoint, body=body)
    with pytest.raises(ValueError, match="exactly one of 'body', 'prompt' or 'messages'"):
        InferenceRequest(experiment="e", routing_key="u", endpoint=CHAT, body={"messages": []}, prompt="x")
    with pytest.raises(ValueError, match="'endpoint' and 'body' go together"):
        InferenceRequest(experiment="e", routing_key="u", body={"messages": [{"role": "user", "content": "x"}]})


def test_bodies_through_the_worker_are_answered_in_openai_s_shapes(stub_worker):
    exp = new_experiment(variants=(("a", 100),))
    with stub_worker(exp) as w:
        chat = w.send(prompt=None, endpoint=CHAT, body={"model": "x", "messages": [{"role": "user", "content": "hello there"}],
                                                        "tools": TOOLS, "response_format": {"type": "json_object"},
                                                        "logit_bias": {"5": 10}, "max_tokens": 1})  # fmt: skip
        embed = w.send(prompt=None, endpoint=EMBEDDINGS, body={"input": ["a cat", "a dog", "a cat"]})
        old = w.send(prompt="the format without a body")
        got = {r.request_id: r for r in w.wait_responses(3)}
    c = got[chat.id]
    assert c.ok and c.endpoint == CHAT and c.outputs == [] and c.body is not None
    assert c.body["object"] == "chat.completion" and c.body["choices"][0]["message"]["content"] == "hello"
    assert c.body["choices"][0]["finish_reason"] == "length" and c.body["usage"]["completion_tokens"] == 1
    e = got[embed.id].body
    assert e is not None and e["object"] == "list" and [d["index"] for d in e["data"]] == [0, 1, 2]
    vectors = [d["embedding"] for d in e["data"]]
    assert len(vectors[0]) == ECHO_DIMENSIONS and vectors[0] == vectors[2] != vectors[1]
    assert abs(sum(x * x for x in vectors[1]) - 1) < 1e-4
    # The format without a body: answered with outputs, and no field an older client does not know.
    raw = orjson.loads(next(r.value for r in w.broker.records(exp.response_topic) if old.id.encode() in r.value))
    assert raw["outputs"] == ["the format without a body"] and "body" not in raw and "endpoint" not in raw


def test_what_a_worker_refuses_in_a_body_is_dead_lettered_and_answered(stub_worker):
    exp = new_experiment(variants=(("a", 100),))
    exp = exp.model_copy(
        update={"variants": [exp.variants[0].model_copy(update={"max_tokens_limit": 50, "max_top_logprobs": 2})]}
    )
    chat = [{"role": "user", "content": "hi"}]
    with stub_worker(exp) as w:
        sent = {
            "invalid_params: stream: true needs a reply_to topic": w.send(
                prompt=None, endpoint=CHAT, body={"messages": chat, "stream": True}
            ),
            "unsupported: chat_template": w.send(prompt=None, endpoint=CHAT, body={"messages": chat, "chat_template": "{{ x }}"}),
            "invalid_params: max_tokens 51": w.send(prompt=None, endpoint=CHAT, body={"messages": chat, "max_tokens": 51}),
            "invalid_params: top_logprobs 3": w.send(prompt=None, endpoint=CHAT, body={"messages": chat, "logprobs": True, "top_logprobs": 3}),
            "unsupported: the echo engine does not serve /v1/score": w.send(prompt=None, endpoint="/v1/score", body={"text_1": "a", "text_2": "b"}),
        }  # fmt: skip
        got = {r.request_id: r for r in w.wait_responses(len(sent))}
        dead = {d.request_id: d for d in w.dead_letters()}
    for why, req in sent.items():
        assert got[req.id].error is not None and got[req.id].error.code == "invalid_request"
        assert got[req.id].error.message.startswith(why.split(": ")[0]), got[req.id].error.message
        assert why.split(": ")[1] in dead[req.id].detail, dead[req.id].detail


class Recording(EchoEngine):
    def __init__(self):
        super().__init__()
        self.seen: list[InferenceRequest] = []

    def submit(self, request, done):
        self.seen.append(request)
        super().submit(request, done)


def test_the_variant_s_system_prompt_and_sampling_apply_to_a_body(stub_worker):
    exp = new_experiment(variants=(("a", 100),))
    variant = exp.variants[0].model_copy(
        update={"system_prompt": "You are terse.", "sampling": SamplingConfig(temperature=0.2, max_tokens=5)}
    )
    exp = exp.model_copy(update={"variants": [variant]})
    engine = Recording()
    with stub_worker(exp, engine=engine) as w:
        chat = w.send(prompt=None, endpoint=CHAT, body={
            "messages": [{"role": "developer", "content": "ignore"}, {"role": "user", "content": "hi"}],
            "max_completion_tokens": 50, "temperature": 1.5, "tools": TOOLS})  # fmt: skip
        plain = w.send(prompt=None, endpoint="/v1/completions", body={"prompt": "tell me", "max_tokens": 3})
        got = {r.request_id: r for r in w.wait_responses(2)}
    bodies = {r.id: r.body for r in engine.seen}
    assert bodies[chat.id]["messages"] == [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "hi"},
    ]
    assert bodies[chat.id]["temperature"] == 0.2 and bodies[chat.id]["max_completion_tokens"] == 5
    assert bodies[chat.id]["tools"] == TOOLS  # the rest of the body is the caller's
    assert bodies[plain.id]["prompt"] == "You are terse.\n\ntell me" and bodies[plain.id]["max_tokens"] == 3
    # The report's covariate is the caller's prompt, before the system prompt replaced a message.
    assert got[chat.id].usage.prompt_chars == len("ignore") + len("hi")


def test_hooks_see_and_change_a_body_s_texts():
    request = _body_request(messages=[
        {"role": "user", "content": "mail me at ann@example.com"},
        {"role": "user", "content": [{"type": "text", "text": "from 10.0.0.1"}, {"type": "image_url", "image_url": {"url": "x"}}]},
    ])  # fmt: skip
    redacted = redact_pii(request)
    assert redacted.body["messages"][0]["content"] == "mail me at [EMAIL]"
    assert redacted.body["messages"][1]["content"][0] == {"type": "text", "text": "from [IP]"}
    assert redacted.body["messages"][1]["content"][1]["image_url"] == {"url": "x"}
    assert request.body["messages"][0]["content"] == "mail me at ann@example.com"  # the original is untouched
    embed = redact_pii(_body_request(endpoint=EMBEDDINGS, input=["ann@example.com", "x"]))
    assert embed.body["input"] == ["[EMAIL]", "x"]
    answer = {"choices": [{"index": 0, "message": {"role": "assistant", "content": "a"}, "finish_reason": "stop"}]}
    assert answer_texts(CHAT, answer) == ["a"]
    assert with_answer_texts(CHAT, answer, ["b"])["choices"][0] == {
        "index": 0, "message": {"role": "assistant", "content": "b"}, "finish_reason": "stop"}  # fmt: skip


def test_a_body_that_says_no_more_than_a_prompt_is_lowered_for_the_static_engine():
    low = lowered(_body_request(max_completion_tokens=9, temperature=0, stop="x", seed=3, user="u"))
    assert low.body is None and low.messages[0].content == "hello there"
    assert (low.max_tokens, low.temperature, low.stop, low.seed) == (9, 0, ["x"], 3)
    with pytest.raises(BodyError, match="tools needs an engine with vLLM's serving layer"):
        lowered(_body_request(tools=TOOLS))
    with pytest.raises(BodyError, match="/v1/embeddings needs an engine with vLLM's serving layer"):
        lowered(_body_request(endpoint=EMBEDDINGS, input="x"))


@pytest.mark.parametrize(
    "vllm, problem",
    [
        ({"enable_auto_tool_choice": True}, "enable_auto_tool_choice needs tool_call_parser"),
        (
            {"disable_any_whitespace": True},
            "disable_any_whitespace needs structured_outputs_backend xgrammar or guidance",
        ),
        ({"runner": "embed"}, "runner"),
    ],
)
def test_a_variant_s_serving_settings_are_checked_when_the_config_loads(tmp_path, vllm, problem):
    exp = new_experiment(variants=(("a", 100),))
    raw = exp.model_dump(mode="json")
    raw["variants"][0].update(engine="vllm", vllm=vllm)
    path = write_config(exp, tmp_path)
    path.write_text(__import__("yaml").safe_dump(raw))
    with pytest.raises(ConfigError, match=problem) as e:
        load_experiment(path)
    assert "\n" not in str(e.value)
