"""VllmEngine: a thin adapter over vLLM's offline `LLM.generate`, one call per batch."""

from __future__ import annotations

import logging
import os

from schemas import ConfigError, InferenceRequest
from workers.engine import Completion, EngineError, Rejection, TransientEngineError

log = logging.getLogger(__name__)


def _looks_like_path(model: str) -> bool:
    # "org/name" is a hub id (an image with network may download it); these are local paths.
    return model.startswith((".", "/", "~"))


class VllmEngine:
    def __init__(self, model: str, engine_args: dict | None = None):
        path = os.path.expanduser(model)
        if _looks_like_path(model) and not os.path.isdir(path):
            raise ConfigError(f"model directory {model} does not exist; pass a local model directory with --model")
        try:
            from vllm import LLM
        except ImportError:
            raise ConfigError("vLLM is not installed; `pip install 'abqueue[vllm]'` (GPU) or see the README for the CPU build") from None
        args = {"model": path, **(engine_args or {})}
        try:
            self.llm = LLM(**args)
        except Exception as e:  # vLLM raises many types for a model that will not load or fit
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ConfigError(f"vLLM could not load model {model}: {first}; check the path and engine_args (max_model_len, memory)") from None
        self.model = model
        self.tokenizer = self.llm.get_tokenizer()
        self.max_model_len = self.llm.llm_engine.model_config.max_model_len
        # Token ids computed by check(), reused by generate() so each prompt is tokenised once.
        self._token_ids: dict[str, list[int]] = {}

    def _render(self, request: InferenceRequest) -> list[int]:
        if request.messages is not None:
            if not getattr(self.tokenizer, "chat_template", None):
                raise EngineError(f"model {self.model} has no chat template; send 'prompt' instead of 'messages'")
            text = self.tokenizer.apply_chat_template(
                [m.model_dump() for m in request.messages], tokenize=False, add_generation_prompt=True
            )
            return self.tokenizer.encode(text, add_special_tokens=False)
        return self.tokenizer.encode(request.prompt)

    def check(self, request: InferenceRequest) -> Rejection | None:
        try:
            ids = self._render(request)
        except EngineError as e:
            return Rejection("unsupported", str(e))
        if len(ids) + request.max_tokens > self.max_model_len:
            return Rejection(
                "oversized_prompt",
                f"prompt of {len(ids)} tokens plus max_tokens {request.max_tokens} exceeds the model's "
                f"context of {self.max_model_len} tokens; shorten the prompt or lower max_tokens",
            )
        self._token_ids[request.id] = ids
        return None

    def generate(self, requests: list[InferenceRequest]) -> list[Completion]:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        prompts, params = [], []
        for r in requests:
            ids = self._token_ids.pop(r.id, None) or self._render(r)
            prompts.append(TokensPrompt(prompt_token_ids=ids))
            params.append(
                SamplingParams(
                    n=r.n, temperature=r.temperature, top_p=r.top_p, max_tokens=r.max_tokens,
                    stop=r.stop or None, seed=r.seed,
                )
            )
        # Whatever check() prepared and did not reach this call (expired, dead-lettered) goes too.
        self._token_ids.clear()
        try:
            outs = self.llm.generate(prompts, params, use_tqdm=False)
        except Exception as e:
            if type(e).__name__ in ("OutOfMemoryError", "EngineDeadError"):
                raise TransientEngineError(f"vLLM: {e}") from e
            raise EngineError(f"vLLM: {type(e).__name__}: {e}") from e
        results = []
        for out in outs:
            samples = sorted(out.outputs, key=lambda o: o.index)
            results.append(
                Completion(
                    outputs=[o.text for o in samples],
                    finish_reason=samples[0].finish_reason or "stop",
                    prompt_tokens=len(out.prompt_token_ids or ()),
                    completion_tokens=sum(len(o.token_ids) for o in samples),
                )
            )
        return results

    def close(self) -> None:
        self._token_ids.clear()
        shutdown = getattr(self.llm.llm_engine, "shutdown", None)
        if callable(shutdown):
            shutdown()
