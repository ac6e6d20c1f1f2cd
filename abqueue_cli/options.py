"""Flags shared by every command: Kafka connection and the experiment config."""

from __future__ import annotations

import argparse

import yaml

from kafkaio import KafkaSettings
from schemas import ConfigError, ExperimentConfig, load_experiment

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


def add_experiment_flags(p: argparse.ArgumentParser, need_variant: bool = False) -> None:
    p.add_argument("--config", default=None, help="experiment config YAML (default: the built-in 'demo' experiment)")
    p.add_argument("--experiment", default=None, help="experiment name; must match the config's name")
    if need_variant:
        p.add_argument("--variant", required=True, help="the variant this process serves")


def kafka_settings(args: argparse.Namespace) -> KafkaSettings:
    given = {name: getattr(args, name) for name, _ in _KAFKA_FLAGS if getattr(args, name, None) is not None}
    return KafkaSettings(**given)


def experiment(args: argparse.Namespace) -> ExperimentConfig:
    exp = load_experiment(args.config)
    if args.experiment and args.experiment != exp.name:
        where = f"config {args.config}" if args.config else "the built-in demo config"
        raise ConfigError(f"--experiment {args.experiment} does not match {where} (experiment {exp.name!r}); pass --config FILE for {args.experiment}")
    return exp


def add_engine_flags(p: argparse.ArgumentParser, scope: str) -> None:
    p.add_argument("--engine", choices=["echo", "vllm"], default=None, help=f"engine for {scope} (default: the config's)")
    p.add_argument("--model", default=None, help=f"model for {scope} (a local directory for vllm)")
    p.add_argument("--engine-arg", action="append", default=[], metavar="KEY=VALUE",
                   help="engine setting, repeatable; for vllm any vllm.LLM argument, e.g. max_model_len=4096")


def engine_args(args: argparse.Namespace) -> dict:
    out = {}
    for item in args.engine_arg:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--engine-arg {item!r} is not KEY=VALUE; e.g. --engine-arg max_model_len=4096")
        out[key] = yaml.safe_load(value)  # 4096 -> int, true -> bool, text stays text
    return out


def engine_flags(args: argparse.Namespace) -> list[str]:
    """The engine flags again, for a command that starts workers."""
    flags = []
    if args.engine:
        flags += ["--engine", args.engine]
    if args.model:
        flags += ["--model", args.model]
    for item in args.engine_arg:
        flags += ["--engine-arg", item]
    return flags
