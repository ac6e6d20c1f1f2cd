"""`abq keda plan` and `abq keda simulate`: see what KEDA will do before applying a change."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import orjson

from abqueue.cli import options
from abqueue.errors import UsageError


def register(sub) -> None:
    p = sub.add_parser("keda", help="plan and simulate KEDA scaling on consumer-group lag")
    ksub = p.add_subparsers(dest="keda_command", required=True, metavar="ACTION")

    plan = ksub.add_parser(
        "plan",
        help="per variant: lag, KEDA's metric, activation and desired replicas",
        description="Reads live lag (end offsets minus committed offsets per partition of each variant's "
        "topics) or a situation file, and applies the rules of KEDA's Kafka scaler and the HPA.",
    )
    options.add_experiment_flags(plan)
    plan.add_argument(
        "--input",
        type=Path,
        default=None,
        help="offline: a situation JSON file (format in docs/concepts/scaling.md) instead of the cluster",
    )
    plan.add_argument("--format", choices=["table", "json"], default="table")
    plan.add_argument(
        "--keda-version",
        default=None,
        help="the KEDA release you run, where its rules differ (default: the situation's kedaVersion, else "
        "the current release, 2.21)",
    )
    plan.add_argument(
        "--watch",
        type=float,
        default=None,
        metavar="SECONDS",
        help="live: plan again every SECONDS, with the previous committed offsets (persistent lag)",
    )
    options.add_kafka_flags(plan)
    plan.set_defaults(func=run_plan)

    sim = ksub.add_parser(
        "simulate",
        help="replay arrivals against a modelled fleet under KEDA and the HPA",
        description="Reports backlog, wait percentiles, replicas and GPU-hours; --sweep compares settings.",
    )
    src = sim.add_mutually_exclusive_group(required=True)
    src.add_argument(
        "--trace",
        type=Path,
        help="arrival timestamps: CSV (first or 'timestamp' column) or JSONL (timestamp, ts, enqueued, or the "
        "enqueued time of abqueue responses and OpenAI Batch output, e.g. abq batch results)",
    )
    src.add_argument("--profile", help="burst:N@T | step:R1,R2@T | diurnal:PEAK[,PERIOD] (requests/s)")
    sim.add_argument("--duration", type=int, default=3600, help="seconds of synthetic profile (default 3600)")
    sim.add_argument(
        "--time-field", default=None, metavar="PATH", help="JSONL traces: the dotted path of each line's time"
    )
    sim.add_argument("--config", default=None, help="experiment config YAML to take --variant's scaling settings from")
    sim.add_argument("--variant", default=None)
    sim.add_argument("--per-replica-rps", type=float, default=None, help="requests/s one replica serves")
    sim.add_argument(
        "--from-benchmark",
        type=Path,
        default=None,
        help="read per-replica requests/s from bench/throughput.py --json output",
    )
    for flag, dest, type_, help_ in (
        ("--lag-threshold", "lagThreshold", int, "lagThreshold"),
        ("--activation-lag-threshold", "activationLagThreshold", int, "activationLagThreshold"),
        ("--min-replicas", "minReplicas", int, "minReplicaCount"),
        ("--max-replicas", "maxReplicas", int, "maxReplicaCount"),
        ("--polling-interval", "pollingInterval", int, "seconds between KEDA polls"),
        ("--cooldown-period", "cooldownPeriod", int, "seconds inactive before scaling to zero"),
        ("--stabilization-window", "stabilizationWindowSeconds", int, "HPA scale-down stabilization (s)"),
        ("--partitions", "partitions", int, "partitions of the variant's topic"),
        ("--cold-start", "cold_start_s", int, "seconds from pod creation to serving (default 120)"),
        (
            "--request-seconds",
            "request_seconds",
            float,
            "seconds a request spends in a worker, uncommitted (default 0)",
        ),
    ):
        sim.add_argument(flag, dest=dest, type=type_, default=None, help=help_)
    sim.add_argument(
        "--sweep",
        default=None,
        metavar="NAME=V1,V2,...",
        help="compare values of one setting, e.g. lagThreshold=5,10,20",
    )
    sim.add_argument("--drain", type=int, default=1800, help="seconds simulated after the last arrival (default 1800)")
    sim.add_argument("--every", type=int, default=300, help="timeline rows every this many seconds (default 300)")
    sim.add_argument("--png", type=Path, default=None, help="write a chart (needs matplotlib: abqueue[plot])")
    sim.add_argument("--format", choices=["table", "json"], default="table")
    sim.set_defaults(func=run_simulate)


# -- plan --------------------------------------------------------------------------------------
def run_plan(args: argparse.Namespace) -> int:
    from abqueue.scaling.plan import plan_situation, read_situation

    if args.input is not None:
        try:
            situation = orjson.loads(args.input.read_bytes())
        except FileNotFoundError:
            raise UsageError(
                f"situation file {args.input} does not exist; pass a JSON file (format in docs/concepts/scaling.md)"
            ) from None
        except orjson.JSONDecodeError as e:
            raise UsageError(f"situation file {args.input} is not valid JSON: {e}") from None
        if args.keda_version:
            situation["kedaVersion"] = args.keda_version
        _print_plan(plan_situation(situation), args.format)
        return 0
    settings = options.kafka_settings(args)
    exp = options.experiment(args)
    previous = None
    while True:
        situation = read_situation(settings, exp, previous)
        if args.keda_version:
            situation["kedaVersion"] = args.keda_version
        _print_plan(plan_situation(situation), args.format, exp)
        if args.watch is None:
            return 0
        previous = situation
        time.sleep(args.watch)


def _print_plan(result: dict, fmt: str, exp=None) -> None:
    if fmt == "json":
        print(orjson.dumps(result, option=orjson.OPT_INDENT_2).decode())
        return
    for name, v in result["variants"].items():
        now = "?" if v["current_replicas"] is None else v["current_replicas"]
        group = f", group {exp.consumer_group(name)}" if exp else ""
        kind = "pool" if exp and name in exp.pools() else "variant"
        print(
            f"{kind} {name}{group}: replicas now {now}, desired {v['desired_replicas']} "
            f"(min {v['min_replicas']}, max {v['max_replicas']}); active: {'yes' if v['active'] else 'no'}"
        )
        for t in v["triggers"]:
            lags = " ".join(
                f"{p['partition']}:{p['lag']}{'*' if p['persistent'] else ''}{'?' if p['invalid_offset'] else ''}"
                for p in t["partitions"]
            )
            cap = "none (allowIdleConsumers)" if t["cap"] is None else t["cap"]
            print(
                f"  {t['topic'] or ('all its topics' if kind == 'pool' else 'topic')}: lag {t['total_lag']} [{lags}] -> metric {t['lag_metric']}, cap {cap}, "
                f"wants {t['replicas_wanted']}, active {'yes' if t['active'] else 'no'}"
            )
        for w in v["warnings"]:
            print(f"  warning: {w}")
    print("(per partition: * persistent lag excluded from the metric, ? no committed offset)")
    sys.stdout.flush()


# -- simulate ----------------------------------------------------------------------------------
def _settings(args: argparse.Namespace):
    from abqueue.scaling.simulate import Settings
    from schemas import load_experiment

    base = {}
    if args.config or args.variant:
        exp = load_experiment(args.config)
        if not args.variant:
            raise UsageError("--config needs --variant: whose scaling settings to simulate")
        served = exp.serving(args.variant)  # a pool's variants share its workers and their scaling
        sc = served[0].scaling
        base = {
            "lagThreshold": sc.lag_threshold,
            "activationLagThreshold": sc.activation_lag_threshold,
            "minReplicas": sc.min_replicas,
            "maxReplicas": sc.max_replicas,
            "pollingInterval": sc.polling_interval,
            "cooldownPeriod": sc.cooldown_period,
            "stabilizationWindowSeconds": sc.scale_down_stabilization_seconds,
            # A pool's workers split the partitions of all its variants' topics.
            "partitions": exp.partitions_for(args.variant) * len(served),
        }
    for name in (
        "lagThreshold",
        "activationLagThreshold",
        "minReplicas",
        "maxReplicas",
        "pollingInterval",
        "cooldownPeriod",
        "stabilizationWindowSeconds",
        "partitions",
        "cold_start_s",
        "request_seconds",
    ):
        if getattr(args, name) is not None:
            base[name] = getattr(args, name)
    rps = args.per_replica_rps
    if args.from_benchmark:
        figures = orjson.loads(args.from_benchmark.read_bytes())
        rps = figures["through_kafka"]["requests_per_s"]
    if rps is None or rps <= 0:
        raise UsageError(
            "give the per-replica throughput: --per-replica-rps X, or --from-benchmark FILE from bench/throughput.py --json"
        )
    settings = Settings(**base, per_replica_rps=rps)
    if settings.minReplicas > settings.maxReplicas:
        raise UsageError(f"minReplicas {settings.minReplicas} is above maxReplicas {settings.maxReplicas}")
    return settings


def run_simulate(args: argparse.Namespace) -> int:
    from abqueue.scaling.simulate import profile, read_trace, sweep

    if args.png:  # a missing extra is named before the work, not after the whole simulation
        from abqueue.scaling.chart import require_matplotlib

        require_matplotlib()
    arrivals = read_trace(args.trace, args.time_field) if args.trace else profile(args.profile, args.duration)
    name, values = None, []
    if args.sweep:
        name, sep, rest = args.sweep.partition("=")
        values = [v for v in rest.split(",") if v]
        if not sep or not values:
            raise UsageError(f"--sweep {args.sweep!r} is not NAME=V1,V2; e.g. --sweep lagThreshold=5,10,20")
    results = sweep(arrivals, _settings(args), name, values, args.drain)
    summaries = [
        {"setting": f"{name}={getattr(r.settings, name)}" if name else "as given", **r.summary()} for r in results
    ]
    if args.format == "json":
        print(
            orjson.dumps(
                {
                    "summaries": summaries,
                    "timelines": [[row for row in r.timeline if row["t"] % args.every == 0] for r in results],
                },
                option=orjson.OPT_INDENT_2,
            ).decode()
        )
    else:
        _print_simulation(results, summaries, args.every)
    if args.png:
        from abqueue.scaling.chart import write_png

        print(f"chart: {write_png(results, args.png, name)}")
    return 0


def _print_simulation(results, summaries, every: int) -> None:
    keys = [k for k in summaries[0] if k != "setting"]
    width = max(14, *(len(s["setting"]) + 2 for s in summaries))
    print(f"{'':<16}" + "".join(f"{s['setting']:>{width}}" for s in summaries))
    for k in keys:
        print(
            f"{k:<16}"
            + "".join(f"{s[k]:>{width}.2f}" if isinstance(s[k], float) else f"{s[k]:>{width}}" for s in summaries)
        )
    for r, s in zip(results, summaries, strict=True):
        print(f"\ntimeline ({s['setting']}): every {every}s")
        print(f"{'t (s)':>8}{'arrived/s':>11}{'backlog':>9}{'replicas':>9}{'ready':>7}")
        for row in r.timeline:
            if row["t"] % every == 0:
                print(f"{row['t']:>8}{row['arrived']:>11}{row['backlog']:>9}{row['replicas']:>9}{row['ready']:>7}")
