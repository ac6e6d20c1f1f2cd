"""The engines' adapters on their own: what vLLM's outputs become, without starting vLLM."""

from types import SimpleNamespace

import pytest

from workers.engines.vllm_common import completion


def _output(*reasons: str):
    samples = [SimpleNamespace(index=i, text=f"s{i}", token_ids=[1, 2], finish_reason=r) for i, r in enumerate(reasons)]
    return SimpleNamespace(outputs=samples, prompt_token_ids=[5, 6, 7], metrics=None)


def test_a_finished_vllm_output_becomes_a_completion():
    c = completion(_output("stop", "length"))
    assert c.error is None and c.outputs == ["s0", "s1"] and c.finish_reason == "stop"
    assert (c.prompt_tokens, c.completion_tokens) == (3, 4)


@pytest.mark.parametrize("reasons", [("abort",), ("error",), ("stop", "abort"), ("length", "error")])
def test_an_aborted_or_failed_vllm_output_is_an_engine_error_not_a_success(reasons):
    c = completion(_output(*reasons))
    assert c.error is not None and c.error.code == "engine_error"
    assert c.finish_reason == "error" and c.outputs == []
    assert reasons[-1] in c.error.message


def test_the_continuous_vllm_adapter_answers_even_when_reading_vllm_s_output_fails(monkeypatch):
    import asyncio
    import itertools

    from schemas import InferenceRequest
    from workers.engines import vllm_async
    from workers.engines.vllm_async import AsyncVllmEngine

    class Broken:
        async def generate(self, prompt, params, request_id, **kw):
            yield SimpleNamespace(outputs=None, prompt_token_ids=[1])  # an output the adapter cannot read

    monkeypatch.setattr(vllm_async, "sampling_params", lambda request, final_only=False: None)
    engine = AsyncVllmEngine.__new__(AsyncVllmEngine)  # the adapter alone, no engine behind it
    engine.llm, engine._use_priority, engine._ids = Broken(), False, itertools.count()
    results = []
    request = InferenceRequest(experiment="e", routing_key="k", prompt="p")
    asyncio.run(engine._run(request, None, results.append))
    assert len(results) == 1, "the request was never answered: it would hold its partition's commit point"
    assert isinstance(results[0], Exception)


def test_requests_sharing_a_caller_chosen_id_keep_their_own_prompts(monkeypatch):
    from schemas import InferenceRequest
    from workers.engines import vllm_common

    class Words:  # a tokenizer: one id per word
        chat_template = None

        def encode(self, text, add_special_tokens=True):
            return [len(w) for w in text.split()]

    monkeypatch.setattr(vllm_common, "sampling_params", lambda request, final_only=False: None)
    prep = vllm_common.PromptPrep()
    prep.tokenizer, prep.max_model_len = Words(), 1000
    prep._init_prep()
    # Two callers both chose id "request-1" (OpenAI batch files do); admitted together.
    first = InferenceRequest(id="request-1", experiment="e", routing_key="a", prompt="one two three")
    second = InferenceRequest(id="request-1", experiment="e", routing_key="b", prompt="seventeen")
    assert prep.check(first) is None and prep.check(second) is None
    assert prep.token_ids(first) == [3, 3, 5] and prep.token_ids(second) == [9]


def test_aborting_a_request_cancels_its_vllm_generate_and_never_answers_it(monkeypatch):
    """AsyncLLM.generate aborts the request in the engine (and frees its KV cache) when cancelled."""
    import asyncio
    import itertools
    import threading

    from schemas import InferenceRequest
    from workers.engines import vllm_async
    from workers.engines.vllm_async import AsyncVllmEngine

    started, cancelled = threading.Event(), threading.Event()

    class Stuck:
        async def generate(self, prompt, params, request_id, **kw):
            started.set()
            try:
                await asyncio.sleep(3600)
            except asyncio.CancelledError:
                cancelled.set()
                raise
            yield  # an async generator that never yields an output

    monkeypatch.setattr(vllm_async, "sampling_params", lambda request, final_only=False: None)
    engine = AsyncVllmEngine.__new__(AsyncVllmEngine)
    engine.llm, engine._use_priority, engine._ids, engine._running = Stuck(), False, itertools.count(), {}
    engine._loras = {}
    engine.prompt = lambda request: None
    engine._loop = asyncio.new_event_loop()
    threading.Thread(target=engine._loop.run_forever, daemon=True).start()
    try:
        results = []
        request = InferenceRequest(experiment="e", routing_key="k", prompt="p")
        engine.submit(request, results.append)
        assert started.wait(5)
        engine.abort(request)
        assert cancelled.wait(5), "generate() was not cancelled"
        assert results == [] and engine._running == {}
    finally:
        engine._loop.call_soon_threadsafe(engine._loop.stop)
