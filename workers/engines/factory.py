"""The engine a variant's config names, with command-line overrides applied."""

from __future__ import annotations

from typing import Any

from schemas import ConfigError, VariantConfig
from schemas.experiment import ENGINES
from workers.engines import lora
from workers.engines.base import Engine


def make_engine(
    variant: VariantConfig,
    kind: str | None = None,
    model: str | None = None,
    extra_args: dict | None = None,
    pool: list[VariantConfig] | None = None,
) -> Engine:
    """The engine a variant's config names, with --engine/--model/--engine-arg overrides applied.
    pool: the variants the engine serves (default just `variant`), for their adapters and templates."""
    kind = kind or variant.engine
    same = kind == variant.engine
    # The config's engine settings belong to the config's engine; another engine starts from none.
    args = {**(variant.engine_args if same else {}), **(extra_args or {})}
    if kind == "echo":
        from workers.engines.echo import EchoEngine

        return EchoEngine(model=model or variant.model, **args)
    if kind == "sim":
        from workers.engines.sim import SimEngine

        return SimEngine(model=model or variant.model, **args)
    if kind in ("vllm", "vllm-batch"):
        from workers.engines.vllm_common import check_model_dir

        check_model_dir(model or variant.model)
        # vLLM is imported only when asked for: the echo engine and the CLI run without it.
        from workers.engines.vllm_async import AsyncVllmEngine
        from workers.engines.vllm_static import VllmEngine

        args = {**(variant.vllm.args() if variant.engine.startswith("vllm") else {}), **args}
        served = pool or [variant]
        adapters = lora.adapters(served)
        templates = {v.name: v.chat_template for v in served if v.chat_template is not None}
        common: dict[str, Any] = {
            "model": model or variant.model,
            "engine_args": lora.engine_args(adapters, args),
            "adapters": adapters,
            "templates": templates,
        }
        if kind == "vllm":
            frontend = variant.vllm.frontend() if variant.engine.startswith("vllm") else {}
            return AsyncVllmEngine(**common, frontend=frontend)
        return VllmEngine(**common)
    raise ConfigError(f"unknown engine {kind!r}; use {', '.join(repr(e) for e in ENGINES)}")
