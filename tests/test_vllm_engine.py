"""The vLLM engine, for real: vLLM's CPU build runs a tiny random model behind a worker process."""

import importlib.util
import os
import signal
import threading
import time
import urllib.error
import urllib.request

import pytest
from conftest import metric_values as _values
from kafka_helpers import committed, dead_letters, end_offsets, wait_until
from test_gateway import _client, serving
from tiny_model import ENGINE_ARGS, make_lora_adapter, make_tiny_model
from transformers import AutoTokenizer

from abqueue.kafka import ensure_topics
from abqueue.localkafka.broker import free_port
from producers import AbqClient
from schemas import ExperimentConfig, InferenceRequest

pytestmark = pytest.mark.vllm

if importlib.util.find_spec("vllm") is None:
    if os.environ.get("ABQ_REQUIRE_VLLM") == "1":
        raise RuntimeError("ABQ_REQUIRE_VLLM=1 but vLLM is not installed; build the env with `scripts/env.sh vllm`")
    pytest.skip(
        "vLLM is not installed (scripts/env.sh vllm builds an environment with its CPU build)", allow_module_level=True
    )


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("tiny-llama"))


def _get(port, path):
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()
    except OSError:
        return None, ""


@pytest.mark.parametrize("engine", ["vllm", "vllm-batch"])
def test_vllm_worker_serves_dead_letters_and_survives_a_kill_9_or_drains_on_sigterm(
    settings, spawn_worker, tiny_model, monkeypatch, engine, tmp_path
):
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "1")
    typed = {k: ENGINE_ARGS[k] for k in ("dtype", "max_model_len", "max_num_seqs")}
    tiny = {"name": "tiny", "weight": 100, "engine": engine, "model": str(tiny_model), "vllm": typed,
            "engine_args": {k: v for k, v in ENGINE_ARGS.items() if k not in typed}}  # fmt: skip
    pool = []
    if engine == "vllm":
        # The continuous engine's run serves a pool: tiny and two LoRA adapters of it, at weight 0 (pinned
        # requests reach them), so that CI starts vLLM only twice. Adapters need real random weights:
        # vLLM's dummy ones are so flat that no adapter changes a greedy token.
        tiny_model = make_tiny_model(tmp_path / "weighted", weights=True)
        tiny.update(model=str(tiny_model), pool="tiny-pool", engine_args={**tiny["engine_args"], "load_format": "auto"})
        pool = [
            {"name": f"lora-{name}", "weight": 0, "pool": "tiny-pool",
             "lora": {"path": str(make_lora_adapter(tmp_path / f"lora-{name}", tiny_model, seed))}}
            for name, seed in (("a", 1), ("b", 2))
        ]  # fmt: skip
    exp = ExperimentConfig.model_validate(
        {"name": f"v{os.urandom(4).hex()}", "partitions": 1, "variants": [tiny, *pool]}
    )
    ensure_topics(settings, exp)
    port = free_port()
    # Eight records a poll as well: the faults below need the engine's work to arrive in waves.
    proc = spawn_worker(exp, "tiny", "--max-batch", "8", "--poll-records", "8", "--metrics-port", str(port))
    # Not ready while the engine loads and warms up; alive all along.
    states = set()
    deadline = time.monotonic() + 400
    while time.monotonic() < deadline and proc.poll() is None:
        ready, _ = _get(port, "/readyz")
        states.add(ready)
        if ready == 200:
            break
        time.sleep(0.5)
    assert 503 in states and ready == 200, proc.log_path.read_text()[-3000:]
    reqs = [
        InferenceRequest(
            experiment=exp.name, routing_key="u1", prompt="the quick brown fox", max_tokens=12, temperature=0, seed=1
        ),
        InferenceRequest(
            experiment=exp.name,
            routing_key="u2",
            messages=[{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello world"}],
            max_tokens=6,
            n=3,
            temperature=0.9,
            seed=7,
        ),
        InferenceRequest(
            experiment=exp.name, routing_key="u3", prompt="queues keep gpus busy", max_tokens=200, stop=["\n"]
        ),
        InferenceRequest(experiment=exp.name, routing_key="u4", prompt="hello " * 100, max_tokens=200),  # > 256 tokens
        InferenceRequest(experiment=exp.name, routing_key="u5", prompt="hi", n=2, temperature=0),  # greedy with n > 1
    ]
    gauges, sampling = {}, threading.Event()

    def sample():  # the engine's gauges while it works: registered at 0, they must move under load
        while not sampling.is_set():
            for name, value in _values(_get(port, "/metrics")[1]).items():
                gauges[name] = max(gauges.get(name, 0.0), value)
            time.sleep(0.05)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    with AbqClient(settings, exp) as client:
        for r in reqs:
            client.publish(r)
        client.publisher.flush()
        got = client.wait({r.id for r in reqs[:3]}, timeout=300)
        # A tiny model can finish between two samples (a busy machine delays the sampler): while the
        # engine gauges have not been seen to move, give it more of the same work, a round at a time.
        for _ in range(10 if engine == "vllm" else 0):
            if gauges.get("abq_engine_running_requests", 0) > 0 and gauges.get("abq_kv_cache_usage_ratio", 0) > 0:
                break
            more = [
                InferenceRequest(
                    experiment=exp.name, routing_key=f"m{i}", prompt="queues keep gpus busy", max_tokens=200
                )
                for i in range(8)
            ]
            for r in more:
                client.publish(r)
            client.wait({r.id for r in more}, timeout=120)
    sampling.set()
    sampler.join()
    assert len(got) == 3, proc.log_path.read_text()[-3000:]
    greedy, chat, long = (got[r.id].response for r in reqs[:3])
    assert greedy.ok and greedy.model == str(tiny_model) and greedy.variant == "tiny"
    assert greedy.usage.prompt_tokens > 0 and greedy.usage.completion_tokens <= 12
    assert greedy.finish_reason in ("length", "stop") and len(greedy.outputs) == 1
    # n=3 gives three samples; the chat template wraps the messages, so the prompt is longer than the text.
    assert len(chat.outputs) == 3 and chat.usage.completion_tokens <= 18
    tok = AutoTokenizer.from_pretrained(tiny_model)
    text = tok.apply_chat_template(
        [m.model_dump() for m in reqs[1].messages], tokenize=False, add_generation_prompt=True
    )
    assert text.endswith("<|assistant|>")  # the model's own template was applied
    assert chat.usage.prompt_tokens == len(tok.encode(text, add_special_tokens=False))
    assert long.ok and long.usage.completion_tokens <= 200
    # Token timings per request: time to first token, and per output token where there were several.
    assert greedy.timings.ttft_s is not None and greedy.timings.ttft_s >= 0
    assert greedy.usage.completion_tokens < 2 or greedy.timings.tpot_s is not None
    letters = {dl.request_id: dl for dl in dead_letters(settings, exp.deadletter_topic, expect=2, timeout=30)}
    assert letters[reqs[3].id].reason == "oversized_prompt" and "context of 256 tokens" in letters[reqs[3].id].detail
    assert letters[reqs[4].id].reason == "invalid_params" and "greedy" in letters[reqs[4].id].detail
    _, metrics = _get(port, "/metrics")
    for name in (
        "abq_time_to_first_token_seconds_count",
        "abq_prompt_tokens_count",
        "abq_completion_tokens_count",
        "abq_startup_seconds",
        "abq_engine_running_requests" if engine == "vllm" else "abq_batch_size_count",
    ):
        assert f"{name}{{" in metrics, name
    assert _values(metrics)["abq_startup_seconds"] > 0
    if engine == "vllm":
        assert gauges["abq_engine_running_requests"] > 0 and gauges["abq_kv_cache_usage_ratio"] > 0, gauges
    else:
        assert _values(metrics)["abq_batch_size_count"] >= 1
    assert proc.poll() is None  # the worker is still serving
    # An OpenAI body: vLLM's serving layer on the continuous engine; lowered to a prompt on the static
    # one, which refuses what it cannot lower (tools) in one line.
    with AbqClient(settings, exp) as client:
        chat_body = {"messages": [{"role": "user", "content": "hello world"}], "max_tokens": 4, "temperature": 0}
        reply = client.call("/v1/chat/completions", chat_body, routing_key="u9", timeout=120, variant="tiny")
        assert reply.response.ok and reply.response.body["object"] == "chat.completion", reply.response
        assert reply.response.body["usage"]["completion_tokens"] == reply.response.usage.completion_tokens <= 4
        if engine == "vllm-batch":
            tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]
            refused = client.call("/v1/chat/completions", {**chat_body, "tools": tools}, routing_key="u9", timeout=120,
                                  variant="tiny").response  # fmt: skip
            assert (
                refused.error is not None and "tools needs an engine with vLLM's serving layer" in refused.error.message
            )
    if engine == "vllm":
        _pool_serves_each_variant_with_its_adapter_and_logprobs(settings, exp, port, tiny_model)
    if engine == "vllm":  # the gateway in front of the real engine, through the official SDK
        with serving(settings, [exp]) as url:
            raw = _client(url).chat.completions.with_raw_response.create(
                model=exp.name, messages=[{"role": "user", "content": "hello world"}], max_tokens=5, temperature=0
            )
        answer = raw.parse()
        assert raw.headers["x-abq-variant"] == "tiny" and answer.model == str(tiny_model)
        assert answer.choices[0].message.role == "assistant" and 0 < answer.usage.completion_tokens <= 5
    # Then the faults, one per engine so CI starts vLLM only twice: static batching drains on
    # SIGTERM; continuous batching is killed mid-stream and loses nothing.
    with AbqClient(settings, exp) as client:
        more, offset_of = set(), {}
        # Far more than the engine can finish before the fault lands, on a fast machine too: the tiny
        # model answered 200 requests of up to 200 tokens in about 2 s, and a CI runner busy enough to
        # starve the test for that long saw them all answered before it looked. These take 10 s or so.
        for i in range(1000):
            req, sent = client.publish(
                InferenceRequest(experiment=exp.name, routing_key=f"d{i}", prompt=f"request {i}", max_tokens=200)
            )
            more.add(req.id)
            offset_of[req.id] = sent
        client.publisher.flush()
        offset_of = {rid: sent.get(timeout=10).offset for rid, sent in offset_of.items()}
        seen: dict[str, float] = {}

        def inflight() -> bool:  # one read, kept: a second could already see the batch finished
            seen["n"] = _values(_get(port, "/metrics")[1]).get("abq_inflight_requests", 0)
            return seen["n"] > 0

        # The fault lands while the worker itself says requests are with its engine, after it committed
        # some of these.
        if engine == "vllm":
            topic = exp.request_topic("tiny")
            first = min(offset_of.values())
            wait_until(lambda: committed(settings, exp.consumer_group("tiny"), topic).get(0, 0) > first, 60,
                       "a first commit of these")  # fmt: skip
        wait_until(inflight, 60, "requests with the engine")
        if engine == "vllm-batch":
            with_engine = seen["n"]
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=120) == 0, proc.log_path.read_text()[-3000:]
            answered = client.wait(more, timeout=10)
            # What the engine had is answered and committed; what it never took stays in Kafka for the
            # next worker: exactly the requests below the commit point are answered.
            point = committed(settings, exp.consumer_group("tiny"), exp.request_topic("tiny"))[0]
            assert len(answered) >= with_engine > 0
            assert set(answered) == {rid for rid, off in offset_of.items() if off < point}
        else:
            os.killpg(proc.pid, signal.SIGKILL)  # the worker and vLLM's engine processes with it
            proc.wait()
            # What it had not committed is still in Kafka; a replacement (echo, to spare CI another
            # two-minute vLLM start) answers all of it.
            spawn_worker(exp, "tiny", "--engine", "echo", "--model", "replacement")
            got = client.wait(more, timeout=120)
            assert set(got) == more, f"{len(more - set(got))} requests lost"
            redone = sum(r.response.model == "replacement" for r in got.values())
            assert 0 < redone < len(more), f"the kill must land mid-stream: {redone} answered by the replacement"
            wait_until(lambda: committed(settings, exp.consumer_group("tiny"), topic) == end_offsets(settings, topic),
                       30, "commits to the end")  # fmt: skip


def _pool_serves_each_variant_with_its_adapter_and_logprobs(settings, exp, port, model):
    """tiny and its two LoRA variants on the one engine: each answer from its own variant, three
    different greedy continuations of one prompt, OpenAI's logprobs semantics, per-variant metrics."""
    prompt = "the lazy dog"  # whose greedy continuations decode to visible text for all three (seeded weights)
    greedy = {
        v: InferenceRequest(experiment=exp.name, routing_key="u", variant=v, prompt=prompt, max_tokens=8,
                            temperature=0, logprobs=True, top_logprobs=2)
        for v in ("tiny", "lora-a", "lora-b")
    }  # fmt: skip
    sampled = InferenceRequest(experiment=exp.name, routing_key="s", variant="lora-a", prompt=prompt, max_tokens=6,
                               n=3, temperature=0.9, seed=3, logprobs=True)  # fmt: skip
    # The same prompts as OpenAI bodies, served by vLLM's serving layer with the adapters as served models.
    bodies = {
        v: InferenceRequest(experiment=exp.name, routing_key="u", variant=v, endpoint="/v1/completions",
                            body={"model": exp.name, "prompt": prompt, "max_tokens": 8, "temperature": 0})
        for v in greedy
    }  # fmt: skip
    with AbqClient(settings, exp) as client:
        for r in [*greedy.values(), sampled, *bodies.values()]:
            client.publish(r)
        client.publisher.flush()
        got = client.wait({r.id for r in [*greedy.values(), sampled, *bodies.values()]}, timeout=400)
    assert len(got) == 7
    answers = {v: got[r.id].response for v, r in greedy.items()}
    assert all(a.ok and a.variant == v and a.model == str(model) for v, a in answers.items()), answers
    # Each adapter really runs: greedy decoding of one prompt gives three different continuations.
    runs = {v: tuple(round(t.logprob, 4) for t in a.logprobs[0]) for v, a in answers.items()}
    assert len(set(runs.values())) == 3, runs
    assert len({a.outputs[0] for a in answers.values()}) == 3, {v: a.outputs for v, a in answers.items()}
    for v, r in bodies.items():  # each adapter's own continuation, whichever path served it
        body = got[r.id].response.body
        assert body is not None and body["choices"][0]["text"] == answers[v].outputs[0], (v, body, answers[v].outputs)
    for a in answers.values():  # OpenAI's semantics: the chosen token, and the top 2 at each position
        (tokens,) = a.logprobs
        assert len(tokens) == a.usage.completion_tokens
        for t in tokens:
            assert len(t.top_logprobs) == 2 and t.top_logprobs[0].logprob >= t.top_logprobs[1].logprob
            assert t.logprob <= 0 and t.logprob == t.top_logprobs[0].logprob  # greedy takes the likeliest
    s = got[sampled.id].response
    assert s.ok and len(s.outputs) == len(s.logprobs) == 3  # one list per sample (n)
    assert sum(len(x) for x in s.logprobs) == s.usage.completion_tokens
    assert all(t.top_logprobs == [] for x in s.logprobs for t in x)  # logprobs without top_logprobs

    def counted():  # the worker counts a request once Kafka has acknowledged its answer: a moment after the caller
        metrics = _get(port, "/metrics")[1]
        return {v: _values(metrics, variant=v).get("abq_requests_total") for v in greedy}

    wait_until(lambda: counted()["lora-a"] == 3 and counted()["lora-b"] == 2, 10, f"per-variant counts ({counted()})")
    assert counted()["tiny"] > 1  # the base variant's requests are counted under their own label
