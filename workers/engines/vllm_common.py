"""What both vLLM engines share: loading arguments with one-line errors, rendering prompts through the
chat template, the admission check, SamplingParams, and turning vLLM's outputs into Completions."""

from __future__ import annotations

import dataclasses
import difflib
import os
from typing import Any

from schemas import ConfigError, InferenceRequest
from schemas.response import TokenLogprob, TopLogprob
from workers.engines.base import Completion, EngineDead, EngineError, Rejection, TransientEngineError

# Exceptions that say the engine (not the request) is in trouble: worth a retry, or a restart.
# Exceptions that say the engine (not the request) is in trouble and may recover: worth a retry.
TRANSIENT_ERRORS = ("OutOfMemoryError", "EngineGenerateError")


def _looks_like_path(model: str) -> bool:
    # "org/name" is a hub id (an image with network may download it); these are local paths.
    return model.startswith((".", "/", "~"))


def check_model_dir(model: str) -> str:
    """The model's local path, refusing a missing directory (before vLLM's ~20 s import)."""
    path = os.path.expanduser(model)
    if _looks_like_path(model) and not os.path.isdir(path):
        raise ConfigError(f"model directory {model} does not exist; pass a local model directory with --model")
    return path


def engine_kwargs(model: str, engine_args: dict | None, args_class) -> dict:
    """vLLM keyword arguments for `model`, refusing a missing directory or an unknown argument."""
    path = check_model_dir(model)
    known = {f.name for f in dataclasses.fields(args_class)}
    for key in engine_args or {}:
        if key not in known:
            close = difflib.get_close_matches(key, known, n=1)
            hint = f"did you mean {close[0]!r}?" if close else "see vLLM's engine arguments"
            raise ConfigError(f"unknown vLLM engine argument {key!r}; {hint}")
    return {"model": path, **(engine_args or {})}


def load_error(model: str, e: BaseException) -> ConfigError:
    text = str(e).strip()
    first = text.splitlines()[0] if text else type(e).__name__
    return ConfigError(
        f"vLLM could not load model {model}: {first}; check the path and engine settings "
        "(max_model_len, gpu_memory_utilization, dtype, quantization)"
    )


def import_vllm():
    try:
        import vllm
    except ImportError:
        raise ConfigError(
            "vLLM is not installed; `pip install 'abqueue[vllm]'` (GPU) or see docs/guides/gpu-workers.md for the CPU build"
        ) from None
    return vllm


# Requests prepared and not yet run, at most: far above what a worker holds in flight, so only one that
# was checked and then never ran (rejected later, replaced by a hook) is ever dropped; run later, it
# would only be tokenised again.
PREPARED_MAX = 8192


class PromptPrep:
    """Tokenises once in check() and reuses the ids when the request runs. The cache is keyed by the
    request object the worker holds for one delivery, never by the caller-chosen id: two requests
    with the same id admitted together must each run their own prompt. A pool's variants may each
    have a chat template and a LoRA adapter: the request's variant (checked against its topic by
    the worker) picks them."""

    tokenizer: Any = None
    max_model_len = 0
    model = ""

    def _init_prep(self, adapters: dict | None = None, templates: dict[str, str] | None = None) -> None:
        self._token_ids: dict[int, tuple[InferenceRequest, list[int]]] = {}
        self._templates = templates or {}
        self._loras: dict[str, Any] = {}
        if adapters:
            from vllm.lora.request import LoRARequest

            self._loras = {
                v: LoRARequest(lora_name=a.name, lora_int_id=i, lora_path=a.path)
                for i, (v, a) in enumerate(sorted(adapters.items()), start=1)
            }

    def lora(self, request: InferenceRequest):
        """The LoRARequest of the request's variant, or None for the base model."""
        return self._loras.get(request.variant or "")

    def _render(self, request: InferenceRequest) -> list[int]:
        if request.messages is not None:
            template = self._templates.get(request.variant or "")
            if not template and not getattr(self.tokenizer, "chat_template", None):
                raise EngineError(f"model {self.model} has no chat template; send 'prompt' instead of 'messages'")
            text = self.tokenizer.apply_chat_template(
                [m.model_dump() for m in request.messages],
                tokenize=False,
                add_generation_prompt=True,
                chat_template=template,
            )
            return self.tokenizer.encode(text, add_special_tokens=False)
        return self.tokenizer.encode(request.prompt)

    def check(self, request: InferenceRequest) -> Rejection | None:
        try:
            ids = self._render(request)
        except EngineError as e:
            return Rejection("unsupported", str(e)[:1000])
        try:
            sampling_params(request)  # vLLM's own checks, so a bad combination never reaches the engine
        except Exception as e:  # vLLM's validation error types vary by version
            return Rejection("invalid_params", f"vLLM refuses these sampling parameters: {e}"[:1000])
        if len(ids) + request.max_tokens > self.max_model_len:
            return Rejection(
                "oversized_prompt",
                f"prompt of {len(ids)} tokens plus max_tokens {request.max_tokens} exceeds the model's "
                f"context of {self.max_model_len} tokens; shorten the prompt or lower max_tokens",
            )
        self._token_ids[id(request)] = (request, ids)
        while len(self._token_ids) > PREPARED_MAX:  # a request checked and never run: the oldest go
            del self._token_ids[next(iter(self._token_ids))]
        return None

    def forget(self, request: InferenceRequest) -> None:
        """Drop what check() prepared for a request that will not run as it was (a hook replaced it)."""
        cached = self._token_ids.get(id(request))
        if cached is not None and cached[0] is request:
            del self._token_ids[id(request)]

    def token_ids(self, request: InferenceRequest) -> list[int]:
        """The ids check() made for this very request object (rendered again if it made none)."""
        cached = self._token_ids.pop(id(request), None)
        # The object must be the same one: an id() can be reused once a request is gone.
        return cached[1] if cached is not None and cached[0] is request else self._render(request)

    def prompt(self, request: InferenceRequest):
        from vllm.inputs import TokensPrompt

        return TokensPrompt(prompt_token_ids=self.token_ids(request))


def sampling_params(r: InferenceRequest, final_only: bool = False):
    from vllm import SamplingParams
    from vllm.sampling_params import RequestOutputKind

    extra: dict[str, Any] = {"output_kind": RequestOutputKind.FINAL_ONLY} if final_only else {}
    if r.logprobs:  # vLLM returns this many top tokens per position, plus the chosen one
        extra["logprobs"] = r.top_logprobs or 0
    return SamplingParams(
        n=r.n,
        temperature=r.temperature,
        top_p=r.top_p,
        max_tokens=r.max_tokens,
        stop=r.stop or None,
        seed=r.seed,
        **extra,
    )


def token_logprobs(sample, top: int) -> list[TokenLogprob]:
    """OpenAI's per-token shape from vLLM's: one dict per position, token id -> Logprob (rank 1 the
    likeliest); the chosen token is always in it, whatever its rank."""
    out = []
    for token_id, position in zip(sample.token_ids, sample.logprobs or (), strict=False):
        chosen = position[token_id]
        ranked = sorted(position.values(), key=lambda lp: lp.rank)[:top]
        out.append(
            TokenLogprob(
                token=chosen.decoded_token or "",
                logprob=chosen.logprob,
                top_logprobs=[TopLogprob(token=lp.decoded_token or "", logprob=lp.logprob) for lp in ranked],
            )
        )
    return out


def completion(out, request: InferenceRequest | None = None) -> Completion:
    samples = sorted(out.outputs, key=lambda o: o.index)
    # vLLM ends a sequence it gave up on with "abort" or "error": that is a failure to answer, never
    # a short success, whichever sample it hit.
    failed = [o.finish_reason for o in samples if o.finish_reason in ("abort", "error")]
    if failed:
        return Completion.failed(f"vLLM ended {len(failed)} of {len(samples)} samples with finish_reason {failed[0]!r}")
    stats = getattr(out, "metrics", None)
    first = None
    if stats is not None and getattr(stats, "first_token_latency", None) and getattr(stats, "arrival_time", None):
        first = stats.arrival_time + stats.first_token_latency
    return Completion(
        outputs=[o.text for o in samples],
        finish_reason=samples[0].finish_reason or "stop",
        prompt_tokens=len(out.prompt_token_ids or ()),
        completion_tokens=sum(len(o.token_ids) for o in samples),
        first_token_at=first,
        logprobs=[token_logprobs(o, request.top_logprobs or 0) for o in samples]
        if request is not None and request.logprobs
        else None,
    )


def engine_failure(e: BaseException) -> EngineError:
    if type(e).__name__ == "EngineDeadError":  # the engine core process is gone: it will not come back
        return EngineDead(f"vLLM: {type(e).__name__}: {e}")
    if type(e).__name__ in TRANSIENT_ERRORS:
        return TransientEngineError(f"vLLM: {type(e).__name__}: {e}")
    return EngineError(f"vLLM: {type(e).__name__}: {e}")
