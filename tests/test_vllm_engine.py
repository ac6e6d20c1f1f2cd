"""The vLLM engine, for real: vLLM's CPU build runs a tiny random model behind a worker process."""

import importlib.util
import os
import time

import pytest

from kafkaio import ensure_topics
from producers import AbqClient
from schemas import ExperimentConfig, InferenceRequest

from kafka_helpers import dead_letters
from tiny_model import ENGINE_ARGS, make_tiny_model

pytestmark = pytest.mark.vllm

if importlib.util.find_spec("vllm") is None:
    if os.environ.get("ABQ_REQUIRE_VLLM") == "1":
        raise RuntimeError("ABQ_REQUIRE_VLLM=1 but vLLM is not installed; build the env with `scripts/env.sh vllm`")
    pytest.skip("vLLM is not installed (scripts/env.sh vllm builds an environment with its CPU build)", allow_module_level=True)


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("tiny-llama"))


def test_vllm_worker_serves_prompts_chat_and_n_samples_and_dead_letters_oversized(settings, spawn_worker, tiny_model, monkeypatch):
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "1")
    exp = ExperimentConfig(name=f"v{os.urandom(4).hex()}", partitions=1, variants=[
        {"name": "tiny", "weight": 100, "engine": "vllm", "model": str(tiny_model), "engine_args": ENGINE_ARGS},
    ])
    ensure_topics(settings, exp)
    proc = spawn_worker(exp, "tiny", "--max-batch", "8")
    reqs = [
        InferenceRequest(experiment=exp.name, routing_key="u1", prompt="the quick brown fox", max_tokens=12, temperature=0, seed=1),
        InferenceRequest(experiment=exp.name, routing_key="u2", messages=[{"role": "system", "content": "be brief"},
                         {"role": "user", "content": "hello world"}], max_tokens=6, n=3, temperature=0.9, seed=7),
        InferenceRequest(experiment=exp.name, routing_key="u3", prompt="queues keep gpus busy", max_tokens=200, stop=["\n"]),
        InferenceRequest(experiment=exp.name, routing_key="u4", prompt="hello " * 100, max_tokens=200),  # > 256 tokens
    ]
    with AbqClient(settings, exp) as client:
        for r in reqs:
            client.publisher.publish(r)
        client.publisher.flush()
        got = client.wait({r.id for r in reqs[:3]}, timeout=400)
    assert len(got) == 3, proc.log_path.read_text()[-3000:]
    greedy, chat, long = (got[r.id].response for r in reqs[:3])
    assert greedy.ok and greedy.model == str(tiny_model) and greedy.variant == "tiny"
    assert greedy.usage.prompt_tokens > 0 and greedy.usage.completion_tokens <= 12
    assert greedy.finish_reason in ("length", "stop") and len(greedy.outputs) == 1
    # n=3 gives three samples; the chat template wraps the messages, so the prompt is longer than the text.
    assert len(chat.outputs) == 3 and chat.usage.completion_tokens <= 18
    assert chat.usage.prompt_tokens > len("be brief hello world".split())
    assert long.ok and long.usage.completion_tokens <= 200
    letters = dead_letters(settings, exp.deadletter_topic, expect=1, timeout=30)
    assert [dl.reason for dl in letters] == ["oversized_prompt"] and "context of 256 tokens" in letters[0].detail
    assert letters[0].request_id == reqs[3].id
    time.sleep(0.1)
    assert proc.poll() is None  # the worker is still serving
