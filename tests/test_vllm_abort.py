"""vLLM's abort of a streamed request, in-process on vLLM's CPU build: the chunks stop, the engine's
running count drops to 0 (its slot is free), and nothing is answered (the worker's cancel answers it).
The path to it (a cancel from a caller, or a gateway caller that went away) is tested on the echo
engine in tests/test_streaming.py, where timing is the test's to choose: on the tiny model a whole
answer can be made before a loaded machine delivers its first chunk to a caller."""

import importlib.util
import os
import threading
import time

import pytest
from kafka_helpers import wait_until
from tiny_model import ENGINE_ARGS, make_tiny_model

from schemas import InferenceRequest

pytestmark = pytest.mark.vllm

if importlib.util.find_spec("vllm") is None:
    if os.environ.get("ABQ_REQUIRE_VLLM") == "1":
        raise RuntimeError("ABQ_REQUIRE_VLLM=1 but vLLM is not installed; build the env with `scripts/env.sh vllm`")
    pytest.skip("vLLM is not installed (scripts/env.sh vllm builds an environment with it)", allow_module_level=True)


class Sink:
    def __init__(self) -> None:
        self.chunks: list[dict] = []
        self.first = threading.Event()

    def restart(self) -> None:
        pass

    def put(self, chunk: dict) -> None:
        self.chunks.append(chunk)
        self.first.set()


def test_an_aborted_stream_stops_in_vllm_and_frees_its_slot(tmp_path, monkeypatch):
    from workers.engines.vllm_async import AsyncVllmEngine

    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "1")
    engine = AsyncVllmEngine(str(make_tiny_model(tmp_path / "tiny")), {**ENGINE_ARGS, "max_model_len": 2048})
    try:
        sink, answered = Sink(), []
        request = InferenceRequest(
            experiment="e", routing_key="k", endpoint="/v1/chat/completions",
            body={"messages": [{"role": "user", "content": "tell me a story"}], "max_tokens": 2000,
                  "temperature": 0, "ignore_eos": True, "stream": True},
        )  # fmt: skip
        request.stream_to(sink)
        engine.submit(request, answered.append)
        assert sink.first.wait(60), "no chunk came"
        wait_until(lambda: engine.stats().get("running") == 1, 10, "the engine running it")
        engine.abort(request)
        wait_until(lambda: engine.stats().get("running") == 0, 10, "the engine's slot freed")
        made = len(sink.chunks)
        time.sleep(0.5)
        assert len(sink.chunks) == made and made < 1000, made  # stopped early: 2,000 tokens were asked for
        assert answered == []  # an abort answers nothing; the worker's cancel answers the caller
    finally:
        engine.close()
