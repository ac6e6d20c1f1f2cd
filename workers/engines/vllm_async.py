"""AsyncVllmEngine: continuous batching, a thin adapter over vLLM's AsyncLLM.

vLLM schedules every submitted request into its running batch as KV-cache space frees up; this
adapter runs AsyncLLM's event loop in a thread of its own and calls `done` as each request finishes,
so the worker loop keeps polling and publishing while the engine generates.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import itertools
import logging
import threading

from schemas import PRIORITIES, InferenceRequest
from schemas.body import EMBEDDINGS
from workers.engines.base import Completion, Rejection
from workers.engines.vllm_common import (
    PromptPrep,
    completion,
    engine_failure,
    engine_kwargs,
    import_vllm,
    load_error,
    sampling_params,
)
from workers.engines.vllm_serving import ServingLayer, check_parsers

log = logging.getLogger(__name__)


class EngineStats:
    """Latest scheduler gauges (running, waiting, KV-cache usage), fed by vLLM's stat-logger hook."""

    def __init__(self) -> None:
        self.values: dict[str, float] = {}
        self.capacity: int | None = None  # the scheduler's max_num_seqs: it never runs more at once

    def factory(self):
        from vllm.v1.metrics.loggers import StatLoggerBase

        stats = self

        class Logger(StatLoggerBase):
            def __init__(self, vllm_config, engine_index: int = 0):
                stats.capacity = getattr(getattr(vllm_config, "scheduler_config", None), "max_num_seqs", None)

            def record(self, scheduler_stats, iteration_stats, mm_cache_stats=None, engine_idx: int = 0):
                if scheduler_stats is not None:
                    stats.values = {
                        "running": scheduler_stats.num_running_reqs,
                        "waiting": scheduler_stats.num_waiting_reqs,
                        "kv_cache_usage": scheduler_stats.kv_cache_usage,
                        **({"capacity": stats.capacity} if stats.capacity else {}),
                    }

            def log_engine_initialized(self):
                pass

        return Logger


class AsyncVllmEngine(PromptPrep):
    batching = "continuous"

    def __init__(
        self,
        model: str,
        engine_args: dict | None = None,
        adapters: dict | None = None,
        templates: dict | None = None,
        frontend: dict | None = None,
    ):
        """frontend: settings of vLLM's OpenAI serving layer (tool_call_parser, enable_auto_tool_choice)."""
        import_vllm()
        from vllm.config import StructuredOutputsConfig
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        args = engine_kwargs(model, engine_args, AsyncEngineArgs)
        check_parsers(frontend or {}, args)
        if isinstance(args.get("structured_outputs_config"), dict):
            args["structured_outputs_config"] = StructuredOutputsConfig(**args["structured_outputs_config"])
        # Request priorities reach vLLM's scheduler only under its priority policy.
        self._use_priority = args.get("scheduling_policy") == "priority"
        self._stats = EngineStats()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="abq-vllm", daemon=True)
        self._thread.start()

        async def create():
            return AsyncLLM.from_engine_args(
                AsyncEngineArgs(**args, disable_log_stats=False), stat_loggers=[self._stats.factory()]
            )

        try:
            self.llm = asyncio.run_coroutine_threadsafe(create(), self._loop).result()
        except Exception as e:  # vLLM raises many types for a model that will not load or fit
            self._loop.call_soon_threadsafe(self._loop.stop)
            raise load_error(model, e) from None
        self.model = model
        self.tokenizer = self.llm.get_tokenizer()
        self.max_model_len = self.llm.model_config.max_model_len
        self._ids = itertools.count()
        self._running: dict[int, concurrent.futures.Future] = {}  # by request object: ids are the caller's
        self._init_prep(None, templates)  # the LoRARequests are the serving layer's, below
        try:
            self.serving = asyncio.run_coroutine_threadsafe(
                ServingLayer.start(
                    self.llm, args["model"], model, adapters or {}, templates or {}, frontend or {}, self._use_priority
                ),
                self._loop,
            ).result()
        except Exception as e:
            self.close()
            raise load_error(model, e) from None
        # Requests without a body run with the LoRARequests the serving layer loaded: one id per adapter.
        loaded = self.serving.lora_requests()
        self._loras = {v: loaded[a.name] for v, a in (adapters or {}).items() if a.name in loaded}
        self.generates = "generate" in self.serving.tasks

    def check(self, request: InferenceRequest):
        if request.body is not None:
            return self.serving.refusal(request)
        if not self.generates:
            return Rejection("unsupported", f"model {self.model} is a pooling model: send an embeddings body")
        return super().check(request)

    def submit(self, request: InferenceRequest, done) -> None:
        if request.body is not None:
            work = self._serve(request, done)
        else:
            work = self._run(request, self.prompt(request), done)
        running = asyncio.run_coroutine_threadsafe(work, self._loop)
        self._running[id(request)] = running
        running.add_done_callback(lambda _: self._running.pop(id(request), None))

    def abort(self, request: InferenceRequest) -> None:
        """Cancel the request's generate() (or its serving handler): AsyncLLM aborts it and frees its
        KV cache; `done` is not called."""
        running = self._running.get(id(request))
        if running is not None:
            running.cancel()

    async def _serve(self, request: InferenceRequest, done) -> None:
        try:
            result = await self.serving.serve(request)
        except Exception as e:  # answered once whatever fails, as in _run
            result = engine_failure(e)
        done(result)

    async def _run(self, request: InferenceRequest, prompt, done) -> None:
        final = None
        try:
            extra = {"priority": PRIORITIES.index(request.priority)} if self._use_priority else {}
            # A request id unique per submission: a retried request must not collide with itself.
            async for out in self.llm.generate(
                prompt,
                sampling_params(request, final_only=True),
                request_id=f"{request.id}-{next(self._ids)}",
                lora_request=self.lora(request),
                **extra,
            ):
                final = out
            # Reading the output is inside the try too: whatever fails, the request is answered once,
            # or it would stay in flight for ever and hold its partition's commit point.
            result: Completion | Exception = (
                completion(final, request) if final is not None else Completion.failed("vLLM returned no output")
            )
        except Exception as e:
            result = engine_failure(e)
        done(result)

    def warm_up(self) -> None:
        finished = threading.Event()
        result: list = []

        def done(outcome):
            result.append(outcome)
            finished.set()

        if self.generates:
            warm = InferenceRequest(experiment="warm-up", routing_key="-", prompt="warm up", max_tokens=1)
        else:
            warm = InferenceRequest(
                experiment="warm-up", routing_key="-", endpoint=EMBEDDINGS, body={"input": "warm up"}
            )
        self.submit(warm, done)
        finished.wait()
        if isinstance(result[0], BaseException):
            raise result[0]

    def stats(self) -> dict[str, float]:
        return dict(self._stats.values)

    def close(self) -> None:
        self._token_ids.clear()
        if not hasattr(self, "llm"):
            return
        try:
            self.llm.shutdown()
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=10)
