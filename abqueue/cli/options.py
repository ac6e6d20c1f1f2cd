"""Flags shared by every command: Kafka connection and the experiment config."""

from __future__ import annotations

import argparse
import re
from typing import Any, TypeVar

import yaml
from pydantic import ValidationError

from abqueue.errors import UsageError
from abqueue.kafka import KafkaSettings
from schemas import ConfigError, ExperimentConfig, load_experiment
from schemas.codec import describe
from schemas.experiment import ENGINES

M = TypeVar("M")

_KAFKA_FLAGS = [
    ("bootstrap_servers", "host:port list (env ABQ_BOOTSTRAP_SERVERS; default 127.0.0.1:9092)"),
    ("client_id", "client id prefix (env ABQ_CLIENT_ID)"),
    ("security_protocol", "PLAINTEXT, SSL, SASL_PLAINTEXT or SASL_SSL (env ABQ_SECURITY_PROTOCOL)"),
    ("sasl_mechanism", "PLAIN, SCRAM-SHA-256 or SCRAM-SHA-512 (env ABQ_SASL_MECHANISM)"),
    ("sasl_username", "SASL user (env ABQ_SASL_USERNAME)"),
    ("sasl_password", "SASL password; prefer env ABQ_SASL_PASSWORD, flags show in `ps`"),
    ("ssl_cafile", "CA bundle for TLS (env ABQ_SSL_CAFILE)"),
    ("ssl_certfile", "client certificate for mTLS (env ABQ_SSL_CERTFILE)"),
    ("ssl_keyfile", "client key for mTLS (env ABQ_SSL_KEYFILE)"),
]


def add_kafka_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("Kafka connection (flags override ABQ_* environment variables)")
    for name, help_ in _KAFKA_FLAGS:
        g.add_argument("--" + name.replace("_", "-"), dest=name, default=None, help=help_)


def add_experiment_flags(p: argparse.ArgumentParser, need_variant: bool = False, pools: bool = False) -> None:
    p.add_argument("--config", default=None, help="experiment config YAML (default: the built-in 'demo' experiment)")
    p.add_argument("--experiment", default=None, help="experiment name; must match the config's name")
    if need_variant:
        p.add_argument(
            *(("--variant", "--pool") if pools else ("--variant",)),
            dest="variant",
            required=True,
            help=f"the variant this process serves ({CONTROL}: the config's control variant)"
            + (
                "; or a pool, whose variants it serves on one engine (so does a pooled variant's name)" if pools else ""
            ),
        )


CONTROL = "@control"


def variant_name(exp: ExperimentConfig, name: str, pools: bool = False) -> str:
    """`name`, or the config's control variant for @control (what the worker image runs by default).
    pools: a pool's name is taken too."""
    if pools and name in exp.pools():
        return name
    return exp.control_variant if name == CONTROL else exp.variant(name).name


def typed(model: type[M], what: str, **fields: Any) -> M:
    """`model` built from what the user gave; a value it refuses is a one-line UsageError."""
    try:
        return model(**fields)
    except ValidationError as e:
        raise UsageError(f"{what}: {describe(e, whole=None)}") from None


def kafka_settings(args: argparse.Namespace) -> KafkaSettings:
    given = {name: getattr(args, name) for name, _ in _KAFKA_FLAGS if getattr(args, name, None) is not None}
    return typed(KafkaSettings, "Kafka settings", **given)


def experiment(args: argparse.Namespace) -> ExperimentConfig:
    exp = load_experiment(args.config)
    if args.experiment and args.experiment != exp.name:
        where = f"config {args.config}" if args.config else "the built-in demo config"
        raise ConfigError(
            f"--experiment {args.experiment} does not match {where} (experiment {exp.name!r}); pass --config FILE for {args.experiment}"
        )
    return exp


# Typed vLLM settings, as flags; the same names as the config's `vllm:` section and vLLM's own.
_VLLM_FLAGS = [
    ("dtype", str, "auto, float16, bfloat16 or float32"),
    ("max_model_len", int, "context length in tokens"),
    ("gpu_memory_utilization", float, "share of GPU memory vLLM may use (0-1)"),
    ("max_num_seqs", int, "sequences in the running batch at most"),
    ("max_num_batched_tokens", int, "tokens per engine step at most"),
    ("quantization", str, "awq, gptq, fp8, ..."),
    ("tensor_parallel_size", int, "GPUs per worker"),
]


def add_engine_flags(p: argparse.ArgumentParser, scope: str) -> None:
    p.add_argument(
        "--engine",
        choices=list(ENGINES),
        default=None,
        help=f"engine for {scope} (default: the config's); vllm batches continuously, vllm-batch statically",
    )
    p.add_argument("--model", default=None, help=f"model for {scope} (a local directory for vllm)")
    g = p.add_argument_group("vLLM settings (override the config's `vllm:` section)")
    for name, type_, help_ in _VLLM_FLAGS:
        g.add_argument("--" + name.replace("_", "-"), dest=name, type=type_, default=None, help=help_)
    g.add_argument(
        "--enable-prefix-caching",
        dest="enable_prefix_caching",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="reuse KV cache across requests sharing a prefix",
    )
    p.add_argument(
        "--engine-arg",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="further engine setting, repeatable; for vllm any engine argument, e.g. kv_cache_memory_bytes=1e9",
    )


def engine_args(args: argparse.Namespace) -> dict:
    out = {name: getattr(args, name) for name, _, _ in _VLLM_FLAGS if getattr(args, name, None) is not None}
    if getattr(args, "enable_prefix_caching", None) is not None:
        out["enable_prefix_caching"] = args.enable_prefix_caching
    for item in args.engine_arg:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise UsageError(f"--engine-arg {item!r} is not KEY=VALUE; e.g. --engine-arg max_model_len=4096")
        out[key] = yaml.safe_load(value)  # 4096 -> int, true -> bool, text stays text
    return out


def engine_flags(args: argparse.Namespace) -> list[str]:
    """The engine flags again, for a command that starts workers."""
    flags = []
    if args.engine:
        flags += ["--engine", args.engine]
    if args.model:
        flags += ["--model", args.model]
    for name, _, _ in _VLLM_FLAGS:
        if getattr(args, name, None) is not None:
            flags += ["--" + name.replace("_", "-"), str(getattr(args, name))]
    if getattr(args, "enable_prefix_caching", None) is not None:
        flags.append("--enable-prefix-caching" if args.enable_prefix_caching else "--no-enable-prefix-caching")
    for item in args.engine_arg:
        flags += ["--engine-arg", item]
    return flags


def duration(text: str) -> float:
    m = re.fullmatch(r"(\d+(?:\.\d+)?)([smh]?)", text.strip())
    if not m:
        raise argparse.ArgumentTypeError(f"{text!r} is not a duration like 90s, 10m or 1h")
    return float(m.group(1)) * {"": 1, "s": 1, "m": 60, "h": 3600}[m.group(2)]
