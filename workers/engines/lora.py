"""LoRA adapters for a pool's variants: checked before vLLM starts, so a wrong adapter is one line at
start-up, and the engine settings that make room for all of them (enable_lora, max_loras,
max_lora_rank) filled in where the config leaves them out."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from schemas import ConfigError, VariantConfig

# The ranks vLLM's max_lora_rank accepts (vllm/config/lora.py, MaxLoRARanks).
VLLM_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
VLLM_DEFAULT_RANK = 16


@dataclass(frozen=True)
class Adapter:
    variant: str
    name: str
    path: str
    rank: int


def adapters(variants: list[VariantConfig]) -> dict[str, Adapter]:
    """Variant name -> its adapter, for the variants that have one; a missing directory or an
    unreadable adapter_config.json is a ConfigError naming the variant."""
    out: dict[str, Adapter] = {}
    for v in variants:
        if v.lora is None:
            continue
        path = os.path.expanduser(v.lora.path)
        where = f"variant {v.name}'s LoRA adapter {v.lora.path}"
        if not os.path.isdir(path):
            raise ConfigError(f"{where} does not exist; point lora.path at a directory with adapter_config.json")
        try:
            rank = int(json.loads(Path(path, "adapter_config.json").read_text())["r"])
        except FileNotFoundError:
            raise ConfigError(f"{where} has no adapter_config.json; save the adapter with PEFT") from None
        except (ValueError, KeyError, TypeError) as e:
            raise ConfigError(
                f"{where}: adapter_config.json has no rank 'r' ({type(e).__name__}); save it with PEFT"
            ) from None
        out[v.name] = Adapter(v.name, v.lora.name or v.name, path, rank)
    return out


def engine_args(found: dict[str, Adapter], args: dict) -> dict:
    """vLLM arguments with room for every adapter: LoRA on, a slot per adapter and one spare, the
    smallest rank bound that fits the largest. A max_lora_rank the config sets below an adapter's
    rank is refused.

    The spare slot: vLLM's CPU LoRA ops (vllm/lora/ops/torch_ops) pick each row's adapter with
    `weights[index]`, and a request without an adapter has index -1, which torch reads as the last
    slot: with every slot full, base-model requests batched with adapter requests ran with the last
    adapter (seen in tests/test_vllm_engine.py's pool test). The spare slot is never filled, so it
    stays zero. GPU kernels skip -1; there the spare costs one adapter's memory."""
    if not found:
        return args
    top = max(a.rank for a in found.values())
    if "max_lora_rank" in args and args["max_lora_rank"] < top:
        worst = max(found.values(), key=lambda a: a.rank)
        raise ConfigError(
            f"variant {worst.variant}'s LoRA adapter has rank {top}, above the engine's max_lora_rank "
            f"{args['max_lora_rank']}; raise max_lora_rank in engine_args (or leave it out: it is set from the adapters)"
        )
    rank = args.get("max_lora_rank") or next((r for r in VLLM_RANKS if r >= max(top, VLLM_DEFAULT_RANK)), None)
    if rank is None:
        raise ConfigError(f"a LoRA adapter has rank {top}, above the largest vLLM serves ({VLLM_RANKS[-1]})")
    return {**args, "enable_lora": True, "max_loras": args.get("max_loras", len(found) + 1), "max_lora_rank": rank}
