"""`abq keda plan`, `simulate` and `tune`: see what KEDA will do before applying a change, and find the
settings that meet a wait target at the least cost."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import orjson

from abqueue.cli import options
from abqueue.cli.exits import OK, ExitCode
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
    _add_arrivals(sim)
    _add_fleet(sim)
    for flag, dest, type_, help_ in (
        ("--lag-threshold", "lagThreshold", int, "lagThreshold"),
        ("--activation-lag-threshold", "activationLagThreshold", int, "activationLagThreshold"),
        ("--min-replicas", "minReplicas", int, "minReplicaCount"),
        ("--max-replicas", "maxReplicas", int, "maxReplicaCount"),
        ("--polling-interval", "pollingInterval", int, "seconds between KEDA polls"),
        ("--cooldown-period", "cooldownPeriod", int, "seconds inactive before scaling to zero"),
        ("--stabilization-window", "stabilizationWindowSeconds", int, "HPA scale-down stabilization (s)"),
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

    tune = ksub.add_parser(
        "tune",
        help="the cheapest trigger settings that meet a wait target on past arrivals",
        description="Replays the arrivals through the simulator of `keda simulate` for every combination of "
        "the trigger's settings in a grid, and prints the one with the fewest replica-hours whose wait "
        "percentile meets the target, with the config and ScaledObject snippets to paste.",
    )
    _add_arrivals(tune)
    _add_fleet(tune)
    goal = tune.add_mutually_exclusive_group(required=True)
    goal.add_argument("--p95-wait", type=options.duration, metavar="DURATION", help="target: p95 wait, e.g. 30s")
    goal.add_argument("--p99-wait", type=options.duration, metavar="DURATION", help="target: p99 wait, e.g. 2m")
    tune.add_argument(
        "--max-replica-hours", type=float, default=None, help="a cost ceiling: at most this many replica-hours"
    )
    tune.add_argument(
        "--grid",
        action="append",
        default=[],
        metavar="NAME=V1,V2,...",
        help="the values to try for one setting instead of the default's (repeatable; the defaults are in "
        "docs/guides/scaling-on-kubernetes.md), e.g. --grid lagThreshold=4,8,16",
    )
    tune.add_argument("--drain", type=int, default=1800, help="seconds simulated after the last arrival (default 1800)")
    tune.add_argument("--format", choices=["table", "json"], default="table")
    tune.set_defaults(func=run_tune)


def _add_arrivals(p: argparse.ArgumentParser) -> None:
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument(
        "--trace",
        type=Path,
        help="arrival timestamps: CSV (first or 'timestamp' column) or JSONL (timestamp, ts, enqueued, or the "
        "enqueued time of abqueue responses and OpenAI Batch output, e.g. abq batch results)",
    )
    src.add_argument("--profile", help="burst:N@T | step:R1,R2@T | diurnal:PEAK[,PERIOD] (requests/s)")
    p.add_argument("--duration", type=int, default=3600, help="seconds of synthetic profile (default 3600)")
    p.add_argument(
        "--time-field", default=None, metavar="PATH", help="JSONL traces: the dotted path of each line's time"
    )


def _add_fleet(p: argparse.ArgumentParser) -> None:
    """What a variant's fleet is, which no trigger setting changes."""
    p.add_argument("--config", default=None, help="experiment config YAML to take --variant's scaling settings from")
    p.add_argument("--variant", default=None)
    p.add_argument("--per-replica-rps", type=float, default=None, help="requests/s one replica serves")
    p.add_argument(
        "--from-benchmark",
        type=Path,
        default=None,
        help="read per-replica requests/s from bench/throughput.py --json output",
    )
    for flag, dest, type_, help_ in (
        ("--partitions", "partitions", int, "partitions of the variant's topic"),
        ("--cold-start", "cold_start_s", int, "seconds from pod creation to serving (default 120)"),
        ("--hpa-sync-period", "hpaSyncPeriod", int, "the HPA controller's sync period in seconds (default 15)"),
        (
            "--request-seconds",
            "request_seconds",
            float,
            "seconds a request spends in a worker, uncommitted (default 0)",
        ),
    ):
        p.add_argument(flag, dest=dest, type=type_, default=None, help=help_)


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
        "hpaSyncPeriod",
    ):
        if getattr(args, name, None) is not None:
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


# -- tune --------------------------------------------------------------------------------------
NOT_MET = ExitCode(1, "`tune`: no setting in the grid meets the target; the closest is printed")


def run_tune(args: argparse.Namespace) -> int:
    from abqueue.scaling.simulate import profile, read_trace
    from abqueue.scaling.tune import Target, parse_grid, searched, tune
    from producers.progress import Progress

    arrivals = read_trace(args.trace, args.time_field) if args.trace else profile(args.profile, args.duration)
    base = _settings(args)
    quantile, wait = (95.0, args.p95_wait) if args.p95_wait is not None else (99.0, args.p99_wait)
    target = Target(wait_s=wait, quantile=quantile, max_replica_hours=args.max_replica_hours)
    grid = parse_grid(args.grid, base.partitions)
    bar: list[Progress] = []

    def progress(done: int, total: int) -> None:
        if not bar:
            bar.append(Progress(total, "tuning"))
        bar[0].update(done)

    tuned = tune(arrivals, base, target, grid, args.drain, progress)
    if bar:
        bar[0].finish(tuned.combinations, f"{tuned.runs} runs simulated")
    chosen = tuned.best or tuned.closest
    summary = None if chosen is None else {"settings": searched(chosen.settings), **chosen.summary()}
    if args.format == "json":
        out = {
            "target": {"quantile": quantile, "wait_s": wait, "max_replica_hours": args.max_replica_hours},
            "met": tuned.best is not None,
            "chosen": summary,
            "combinations": tuned.combinations,
            "runs": tuned.runs,
            "feasible": tuned.feasible,
            "grid": {k: list(v) for k, v in grid.items()},
        }
        print(orjson.dumps(out, option=orjson.OPT_INDENT_2).decode())
    else:
        _print_tuned(tuned, target, arrivals)
    return OK if tuned.best is not None else NOT_MET


def _print_tuned(tuned, target, arrivals: list[int]) -> None:
    from abqueue.scaling.tune import config_snippet, scaledobject_snippet

    q = f"p{target.quantile:g}"
    print(
        f"{sum(arrivals)} requests over {len(arrivals)} s; searched {tuned.combinations} combinations "
        f"({tuned.runs} simulated, {tuned.combinations - tuned.runs} replays of a run already made skipped); "
        f"{tuned.feasible} met {target.describe()}"
    )
    if tuned.best is None:
        print("none meets the target: loosen it, or widen the grid (--grid minReplicas=... maxReplicas=...)")
        if tuned.closest is None:
            print("every setting in the grid goes over the replica-hours ceiling")
            return
        print("closest:")
    r = tuned.best or tuned.closest
    s = r.summary()
    print(
        f"{'cheapest' if tuned.best else 'shortest wait'}: {s['gpu_hours']:.2f} replica-hours, "
        f"{q} wait {r.wait_percentile(target.quantile):g} s (p50 {s['wait_s_p50']:g} s, max backlog "
        f"{s['max_backlog']}, up to {s['max_replicas']} replicas)"
    )
    print("\nexperiment config (abq deploy render writes the ScaledObject from it):")
    print(_indent(config_snippet(r.settings)))
    print("or, in a ScaledObject written by hand:")
    print(_indent(scaledobject_snippet(r.settings)))


def _indent(text: str) -> str:
    return "".join(f"    {line}\n" for line in text.splitlines()).rstrip("\n")
