"""vLLM's own OpenAI serving layer, in-process over the worker's AsyncLLM, as `vllm run-batch` runs it
(vllm/entrypoints/launchers/run_batch.py): `init_app_state` builds the serving objects (chat and
completions with their chat templates, tool-call and reasoning parsers and structured outputs;
embeddings, score and rerank on a pooling model; LoRA adapters as served model names), and a request's
body goes to the handler of its endpoint as `vllm serve` would hand it over. This module is the thin
adapter between abqueue's requests and those handlers: the body in, vLLM's response body (or vLLM's
refusal) out."""

from __future__ import annotations

import itertools
import json
import time
from typing import Any

from schemas import PRIORITIES, ConfigError, InferenceRequest, chunks
from schemas.body import CHAT, COMPLETIONS, EMBEDDINGS, RERANK, SCORE
from workers.engines.base import Completion, Refused, Rejection
from workers.engines.vllm_common import TRANSIENT_ERRORS, engine_failure

# vLLM ends a choice it gave up on with these: a failure to answer, never a short success.
FAILED_REASONS = ("abort", "error")


def check_parsers(frontend: dict[str, Any], engine_args: dict[str, Any]) -> None:
    """A tool-call or reasoning parser vLLM does not know is one line at start, before the model loads."""
    from vllm.reasoning import ReasoningParserManager
    from vllm.tool_parsers import ToolParserManager

    for what, name, known in (
        ("tool_call_parser", frontend.get("tool_call_parser"), ToolParserManager.list_registered()),
        ("reasoning_parser", engine_args.get("reasoning_parser"), ReasoningParserManager.list_registered()),
    ):
        if name and name not in known:
            raise ConfigError(f"vllm.{what} {name!r} is not one vLLM knows; use one of {', '.join(sorted(known))}")


def _request_types() -> dict[str, Any]:
    from pydantic import TypeAdapter
    from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest
    from vllm.entrypoints.openai.completion.protocol import CompletionRequest
    from vllm.entrypoints.pooling.embed.protocol import EmbeddingRequest
    from vllm.entrypoints.pooling.scoring.protocol import RerankRequest, ScoreRequest

    return {
        CHAT: TypeAdapter(ChatCompletionRequest),
        COMPLETIONS: TypeAdapter(CompletionRequest),
        EMBEDDINGS: TypeAdapter(EmbeddingRequest),
        SCORE: TypeAdapter(ScoreRequest),
        RERANK: TypeAdapter(RerankRequest),
    }


class ServingLayer:
    """The serving objects of one engine, and `serve(request)`: a coroutine on the engine's loop."""

    def __init__(
        self, state, tasks, served_name: str, loras: dict[str, str], templates: dict[str, str], priority: bool
    ):
        """loras: variant -> its adapter's served name; templates: variant -> its chat template."""
        self._state, self.tasks = state, tuple(tasks)
        self._served_name, self._loras, self._templates = served_name, loras, templates
        self._priority = priority
        self._types = _request_types()
        self._ids = itertools.count()
        self._handlers: dict[str, Any] = {
            CHAT: getattr(state, "openai_serving_chat", None),
            COMPLETIONS: getattr(state, "openai_serving_completion", None),
            EMBEDDINGS: getattr(state, "serving_embedding", None),
            SCORE: getattr(state, "serving_scores", None),
            RERANK: getattr(state, "serving_scores", None),
        }

    @classmethod
    async def start(
        cls,
        llm,
        model_path: str,
        served_name: str,
        adapters: dict,
        templates: dict[str, str],
        frontend: dict[str, Any],
        priority: bool,
    ) -> ServingLayer:
        """Builds the serving objects over `llm` with vLLM's own frontend defaults (`vllm serve`'s
        parser), our model's names, the pool's LoRA adapters and the variant's frontend settings."""
        from starlette.datastructures import State
        from vllm.entrypoints.launchers.api_server.app_state import init_app_state
        from vllm.entrypoints.launchers.cli_args import make_arg_parser
        from vllm.entrypoints.openai.models.protocol import LoRAModulePath
        from vllm.utils.argparse_utils import FlexibleArgumentParser

        args = make_arg_parser(FlexibleArgumentParser()).parse_args([])
        args.model = model_path
        args.served_model_name = [served_name]
        args.lora_modules = [LoRAModulePath(name=a.name, path=a.path) for a in adapters.values()] or None
        # A variant's chat template travels in the body (a pool's variants may each have one); the
        # validation middleware refuses a caller's own, so only the variant's is ever trusted.
        args.trust_request_chat_template = True
        args.enable_per_request_metrics = True  # TTFT and time per output token, per request
        args.disable_log_stats = False
        args.structured_outputs_config = llm.vllm_config.structured_outputs_config
        for key, value in frontend.items():
            setattr(args, key, value)
        state = State()
        tasks = await llm.get_supported_tasks()
        await init_app_state(llm, state, args, tasks)
        loras = {v: a.name for v, a in adapters.items()}
        return cls(state, tasks, served_name, loras, templates, priority)

    def lora_requests(self) -> dict[str, Any]:
        """The LoRARequests the serving layer loaded, by adapter name (the prompt path uses the same)."""
        return dict(self._state.openai_serving_models.lora_requests)

    def refusal(self, request: InferenceRequest) -> Rejection | None:
        """What this engine cannot serve, known before it runs."""
        assert request.body is not None and request.endpoint is not None
        if self._handlers.get(request.endpoint) is None:
            return Rejection(
                "unsupported",
                f"this variant's model does not serve {request.endpoint}; an embedding or scoring variant runs "
                "a pooling model (vllm.runner: pooling)",
            )
        return None

    def _body(self, request: InferenceRequest) -> dict[str, Any]:
        body = dict(request.body or {})
        variant = request.variant or ""
        body["model"] = self._loras.get(variant, self._served_name)
        if request.endpoint in (CHAT, COMPLETIONS):
            # Unique per submission: a redelivered request must not collide with itself in the engine.
            body["request_id"] = f"{request.id}-{next(self._ids)}"
            if self._priority:
                body["priority"] = PRIORITIES.index(request.priority)
        if request.endpoint == CHAT and variant in self._templates:
            body["chat_template"] = self._templates[variant]
        if body.get("stream") is True:
            # The usage always: the whole answer recorded on the responses topic needs it. The caller
            # is sent the usage chunk only where it asked for it.
            body["stream_options"] = {**(body.get("stream_options") or {}), "include_usage": True}
        return body

    async def serve(self, request: InferenceRequest) -> Completion | BaseException:
        """The request served by its endpoint's handler: a Completion carrying vLLM's response body,
        vLLM's refusal of the body (Refused: a dead letter and an invalid_request answer), or the
        engine's failure."""
        assert request.endpoint is not None
        handler = self._handlers[request.endpoint]
        endpoint = request.endpoint
        try:
            parsed = self._types[endpoint].validate_python(self._body(request))
        except Exception as e:  # pydantic's ValidationError, or vLLM's own checks in its validators
            return refused(_validation_message(e))
        try:
            started = time.monotonic()
            if endpoint == CHAT:
                response = await handler.create_chat_completion(parsed, None)
            elif endpoint == COMPLETIONS:
                response = await handler.create_completion(parsed, None)
            else:
                response = await handler(parsed, None)
            if hasattr(response, "__aiter__"):  # stream: true
                return await _streamed(request, response, started)
        except Exception as e:
            if type(e).__name__ == "EngineDeadError" or type(e).__name__ in TRANSIENT_ERRORS:
                return engine_failure(e)
            from vllm.entrypoints.serve import create_error_response

            response = create_error_response(e)
        return answer(endpoint, response)


async def _streamed(request: InferenceRequest, events, started: float) -> Completion | BaseException:
    """Reads the server-sent events vLLM's handler yields: each chunk goes to the request's stream as
    it comes, and the whole answer is what they add up to (or the error vLLM ended the stream with)."""
    asks, sink = request.asks(), request.chunk_sink()
    if sink is not None:
        sink.restart()
    got: list[dict] = []
    metrics: dict = {}
    first_at = last_at = None
    async for event in events:
        for line in event.splitlines():
            data = line.removeprefix("data: ")
            if data == line or data == "[DONE]":
                continue
            chunk = json.loads(data)
            if isinstance(chunk.get("error"), dict):
                return answer(asks.endpoint, chunk)
            metrics.update(chunk.pop("metrics", None) or {})  # abqueue asked for them, not the caller
            got.append(chunk)
            if chunk.get("choices"):
                last_at = time.monotonic()
                first_at = first_at or last_at
            elif not asks.include_usage:
                continue  # the usage chunk abqueue asked for, which the caller did not
            if sink is not None:
                sink.put(chunk)
    done = answer(asks.endpoint, {**chunks.join(asks.endpoint, got), "metrics": metrics})
    if isinstance(done, Completion) and done.ttft_s is None and first_at is not None:
        # vLLM's own figures where it gave them (the usage chunk); else as the chunks came.
        done.ttft_s = first_at - started
        if done.completion_tokens > asks.n and last_at is not None:
            done.tpot_s = (last_at - first_at) / (done.completion_tokens / asks.n - 1)
    return done


def _validation_message(e: Exception) -> str:
    errors = getattr(e, "errors", None)
    if callable(errors):
        first = errors()[0]
        loc = ".".join(str(p) for p in first.get("loc", ()) if not str(p).startswith(("function-", "Embedding")))
        return f"{loc}: {first.get('msg', '')}".removeprefix(": ") if loc else str(first.get("msg", ""))
    return str(e)


def refused(message: str) -> Refused:
    """vLLM's refusal of a body: the caller's invalid_request answer and a dead letter, with vLLM's words."""
    return Refused(Rejection("invalid_params", f"vLLM refused the body: {message}"[:1000]))


def answer(endpoint: str, response: Any) -> Completion | BaseException:
    """A Completion from what a handler returned: a pydantic response, a JSON response (the pooling
    handlers), an ErrorResponse, or a body (a stream's chunks joined, or its error)."""
    if isinstance(response, dict):  # a stream's chunks joined, or the error that ended it
        body = response
    elif hasattr(response, "body") and hasattr(response, "status_code"):  # a Starlette JSON response
        body = json.loads(response.body)
    elif hasattr(response, "model_dump"):
        body = response.model_dump(mode="json")
    else:
        return Completion.failed(f"vLLM answered with {type(response).__name__}, which abqueue does not read")
    error = body.get("error") if isinstance(body.get("error"), dict) else None
    if error is not None:
        code = int(error.get("code") or 500)
        if code >= 500:
            return Completion.failed(f"vLLM: {error.get('message')}")
        param = f" ({error['param']})" if error.get("param") else ""
        return refused(f"{error.get('message')}{param}")
    metrics = body.pop("metrics", None) or {}
    usage = body.get("usage") or {}
    choices = body.get("choices") or []
    reasons = [c.get("finish_reason") for c in choices]
    if failed := [r for r in reasons if r in FAILED_REASONS]:
        return Completion.failed(f"vLLM ended {len(failed)} of {len(reasons)} choices with finish_reason {failed[0]!r}")
    ttft = metrics.get("time_to_first_token_ms")
    itl = metrics.get("mean_itl_ms")
    return Completion(
        body=body,
        finish_reason="length" if "length" in reasons else "stop",
        prompt_tokens=int(usage.get("prompt_tokens") or 0),
        completion_tokens=int(usage.get("completion_tokens") or 0),
        ttft_s=ttft / 1000 if ttft is not None else None,
        tpot_s=itl / 1000 if itl is not None else None,
    )
