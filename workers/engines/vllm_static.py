"""VllmEngine: static batching, a thin adapter over vLLM's offline `LLM.generate`, one call per batch.

`LLM.generate` has no OpenAI serving layer: a request with a body is served where it can be lowered
to a prompt or messages and the common sampling fields (schemas/legacy.py), and refused with the field
at fault otherwise; the worker answers it with an OpenAI body made from the texts."""

from __future__ import annotations

from schemas import InferenceRequest
from schemas.body import BodyError
from schemas.legacy import lowered
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


class VllmEngine(PromptPrep):
    batching = "static"

    def __init__(
        self, model: str, engine_args: dict | None = None, adapters: dict | None = None, templates: dict | None = None
    ):
        vllm = import_vllm()
        from vllm.engine.arg_utils import EngineArgs

        # With stats on, vLLM records each request's first-token time (TTFT in the response).
        args = {"disable_log_stats": False, **engine_kwargs(model, engine_args, EngineArgs)}
        try:
            self.llm = vllm.LLM(**args)
        except Exception as e:  # vLLM raises many types for a model that will not load or fit
            raise load_error(model, e) from None
        self.model = model
        self.tokenizer = self.llm.get_tokenizer()
        self.max_model_len = self.llm.llm_engine.model_config.max_model_len
        self._init_prep(adapters, templates)

    def warm_up(self) -> None:
        self.llm.generate(
            [self.prompt(InferenceRequest(experiment="warm-up", routing_key="-", prompt="warm up", max_tokens=1))],
            use_tqdm=False,
        )

    def check(self, request: InferenceRequest) -> Rejection | None:
        if request.body is None:
            return super().check(request)
        try:
            low = lowered(request)
        except BodyError as e:
            return Rejection("unsupported", f"the vllm-batch engine cannot serve this body: {e}")
        rejection = super().check(low)
        self.forget(low)  # generate() lowers the request again: what check() prepared for this copy is not used
        return rejection

    def generate(self, requests: list[InferenceRequest]) -> list[Completion]:
        requests = [lowered(r) for r in requests]
        prompts = [self.prompt(r) for r in requests]
        params = [sampling_params(r) for r in requests]
        try:
            loras = [self.lora(r) for r in requests]
            outs = self.llm.generate(prompts, params, use_tqdm=False, lora_request=loras if any(loras) else None)
        except Exception as e:
            raise engine_failure(e) from e
        return [completion(out, r) for out, r in zip(outs, requests, strict=True)]

    def close(self) -> None:
        self._token_ids.clear()
        shutdown = getattr(self.llm.llm_engine, "shutdown", None)
        if callable(shutdown):
            shutdown()
