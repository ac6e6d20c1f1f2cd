"""`abq experiment apply|show`: the live experiment config in Kafka."""

from __future__ import annotations

import argparse
import datetime as dt

import orjson

from abqueue.cli import options
from abqueue.errors import UsageError


def register(sub) -> None:
    p = sub.add_parser("experiment", help="apply and show live experiment configs (no restarts)")
    esub = p.add_subparsers(dest="experiment_command", required=True, metavar="ACTION")
    a = esub.add_parser(
        "apply",
        help="validate a config and publish it as the experiment's next version",
        description="Producers that follow the config topic switch to it within seconds; an invalid config is refused and never published.",
    )
    a.add_argument("file", help="experiment config YAML")
    a.add_argument("--comment", default=None, help="why, kept in the history")
    a.add_argument(
        "--create-topics",
        action="store_true",
        help="also create the experiment's topics that do not exist yet (the operator's job where ACLs apply: "
        "workers and producers may not)",
    )
    options.add_kafka_flags(a)
    a.set_defaults(func=run_apply)
    s = esub.add_parser("show", help="the current config of an experiment and its history")
    s.add_argument("name")
    s.add_argument("--format", choices=["table", "json"], default="table")
    options.add_kafka_flags(s)
    s.set_defaults(func=run_show)


def _weights(exp) -> str:
    return ", ".join(f"{v.name} {v.weight:g}" for v in exp.variants)


def run_apply(args: argparse.Namespace) -> int:
    from abqueue.control import live_config
    from abqueue.kafka import admin_client, ensure_topics, replication
    from schemas import load_experiment

    exp = load_experiment(
        args.file, given_as="as FILE"
    )  # refuses an invalid config with one line, before anything is sent
    settings = options.kafka_settings(args)
    # What every producer and worker would refuse is refused here, before it is published.
    admin = admin_client(settings)
    try:
        replication.for_experiment(admin, exp.replication_factor, exp.min_insync_replicas)
    finally:
        admin.close()
    if args.create_topics:
        created = ensure_topics(settings, exp)
        print(f"created {len(created)} topics of {exp.name}" + (f": {', '.join(created)}" if created else ""))
    prev = live_config.current(settings, exp.name)
    if prev is not None and prev.experiment == exp:
        print(f"{exp.name} v{prev.version} is already this config; nothing applied")
        return 0
    rec = live_config.apply(settings, exp, args.comment)
    was = f" (was v{prev.version}: {_weights(prev.experiment)})" if prev else ""
    print(f"applied {exp.name} v{rec.version}: {_weights(exp)}{was}")
    return 0


def run_show(args: argparse.Namespace) -> int:
    from abqueue.control import live_config

    versions = live_config.read_all(options.kafka_settings(args), args.name)
    if not versions:
        raise UsageError(
            f"no config for experiment {args.name!r} in {live_config.CONFIG_TOPIC}; `abq experiment apply FILE` publishes one"
        )
    if args.format == "json":
        print(
            orjson.dumps(
                {
                    "current": versions[-1].model_dump(mode="json"),
                    "history": [v.model_dump(mode="json") for v in versions],
                },
                option=orjson.OPT_INDENT_2,
            ).decode()
        )
        return 0
    cur = versions[-1]
    print(f"{cur.experiment.name} v{cur.version} (applied {_when(cur.applied_at)} by {cur.applied_by})")
    for v in cur.experiment.variants:
        print(f"  {v.name:<16} weight {v.weight:>6g}  engine {v.engine:<10} model {v.model}")
    for o in cur.experiment.overrides:
        print(f"  override {o.name}: {o.match} -> {o.variant}")
    print("history:")
    for rec in reversed(versions):
        note = f"  # {rec.comment}" if rec.comment else ""
        print(f"  v{rec.version:<4} {_when(rec.applied_at)}  {rec.applied_by:<24} {_weights(rec.experiment)}{note}")
    return 0


def _when(ts: float) -> str:
    return dt.datetime.fromtimestamp(ts, dt.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
