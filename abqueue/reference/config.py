"""The configuration reference: every key of an experiment config, from the pydantic models (their
descriptions are the text), and every environment variable abqueue reads."""

from __future__ import annotations

import inspect
import types
import typing
from typing import Any

import annotated_types
from pydantic import BaseModel
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

from abqueue.reference.markdown import cell, code

# Variables read outside the Kafka settings, with what they do.
OTHER_ENV = {
    "ABQ_LOG_LEVEL": "log level of every command: DEBUG, INFO (default), WARNING, ERROR, CRITICAL",
    "ABQ_CACHE_DIR": "where environments, Kafka jars and the local broker's data live (default `~/.cache/abqueue`)",
    "ABQ_KAFKA_PORT": "`abq kafka`'s client port when `--port` is not given (default 9092)",
    "ABQ_KAFKA_SASL_USERS": "`abq kafka up`'s SASL users, `NAME:PASSWORD[,NAME:PASSWORD...]` (off the command line)",
    "ABQ_K8S_DIR": "`abq k8s`'s state directory when `--dir` is not given (default `~/.local/state/abqueue/k8s`)",
    "KAFKA_BOOTSTRAP_SERVERS": "the brokers, where `ABQ_BOOTSTRAP_SERVERS` is not set (what CI systems and testcontainers set)",
}


def _type(annotation: Any) -> str:
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        shown = [_type(a) for a in args if a is not type(None)]
        return " or ".join(shown)
    if origin is typing.Literal:
        return " \\| ".join(f"`{a}`" for a in args)
    if origin is list:
        return f"list of {_type(args[0])}"
    if origin is dict:
        return f"map of {_type(args[0])} to {_type(args[1])}"
    if inspect.isclass(annotation) and issubclass(annotation, BaseModel):
        return f"[{annotation.__name__}](#{annotation.__name__.lower()})"
    if annotation is Any:
        return "any"
    return getattr(annotation, "__name__", str(annotation)).replace("SecretStr", "secret").replace("Path", "path")


def _bounds(field: FieldInfo) -> str:
    out = []
    for m in field.metadata:
        for attr, sign in (("ge", "≥"), ("gt", ">"), ("le", "≤"), ("lt", "<")):
            if isinstance(m, getattr(annotated_types, attr.capitalize())):
                out.append(f"{sign} {getattr(m, attr)}")
        if isinstance(m, annotated_types.MinLen) and m.min_length:
            out.append(f"at least {m.min_length}")
        pattern = getattr(m, "pattern", None)
        if pattern:
            out.append(f"matches `{pattern}`")
    return ", ".join(out)


def _default(field: FieldInfo) -> str:
    if field.is_required():
        return "required"
    if field.default_factory is not None:
        value = field.default_factory()  # type: ignore[call-arg]
        if isinstance(value, BaseModel):
            return "its defaults"
        return code(value) if value not in ([], {}) else "empty"
    if field.default in (None, PydanticUndefined):
        return "unset"
    return code(field.default)


def _models(root: type[BaseModel]) -> list[type[BaseModel]]:
    seen: list[type[BaseModel]] = []

    def walk(model: type[BaseModel]) -> None:
        if model in seen:
            return
        seen.append(model)
        for field in model.model_fields.values():
            for t in _leaves(field.annotation):
                if inspect.isclass(t) and issubclass(t, BaseModel):
                    walk(t)

    walk(root)
    return seen


def _leaves(annotation: Any) -> list[Any]:
    args = typing.get_args(annotation)
    return [leaf for a in args for leaf in _leaves(a)] if args else [annotation]


def _table(model: type[BaseModel]) -> list[str]:
    rows = ["| key | type | default | what |", "| --- | --- | --- | --- |"]
    for name, field in model.model_fields.items():
        kind = _type(field.annotation)
        bounds = _bounds(field)
        rows.append(
            f"| `{name}` | {kind}{' (' + bounds + ')' if bounds else ''} | {_default(field)} | {cell(field.description or '')} |"
        )
    return rows


def page() -> str:
    from abqueue.kafka.settings import DEFAULT_BOOTSTRAP, KafkaSettings
    from schemas import ExperimentConfig

    out = [
        "# Configuration",
        "",
        "## Experiment config",
        "",
        "An experiment is a YAML file (`--config FILE`), or a live config applied with `abq experiment apply`. "
        "Every key, its type, default and meaning, from the models in `schemas/experiment.py`; an unknown key "
        "is refused with the closest known one.",
        "",
    ]
    for model in _models(ExperimentConfig):
        out += [f"### {model.__name__}", ""]
        doc = inspect.cleandoc(model.__doc__ or "")
        if doc:
            out += [" ".join(doc.split()), ""]
        out += [*_table(model), ""]
    out += [
        "## Environment",
        "",
        "Every command takes the Kafka connection from these variables, or from the flag of the same name "
        "(`ABQ_SASL_USERNAME` is `--sasl-username`); the flag wins. Secrets are never logged.",
        "",
        "| variable | type | default | what |",
        "| --- | --- | --- | --- |",
    ]
    for name, field in KafkaSettings.model_fields.items():
        # Its default is a factory that reads KAFKA_BOOTSTRAP_SERVERS first; what it falls back to is shown.
        default = code(DEFAULT_BOOTSTRAP) if name == "bootstrap_servers" else _default(field)
        out.append(
            f"| `ABQ_{name.upper()}` | {_type(field.annotation)} | {default} | {cell(field.description or '')} |"
        )
    out += ["", "Others:", "", "| variable | what |", "| --- | --- |"]
    out += [f"| `{k}` | {v} |" for k, v in OTHER_ENV.items()]
    return "\n".join(out) + "\n"
