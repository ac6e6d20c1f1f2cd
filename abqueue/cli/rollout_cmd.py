"""`abq rollout start|pause|resume|abort|status`: progressive rollout with automatic rollback."""

from __future__ import annotations

import argparse
import time

from abqueue.cli import options
from abqueue.cli.exits import ExitCode
from abqueue.errors import UsageError

ROLLED_BACK = ExitCode(
    1, "`start`: the rollout ended without completing: a guardrail rolled it back, or an operator aborted it"
)
NO_ROLLOUT = ExitCode(3, "`status`: no rollout is recorded for the experiment")
NO_CONTROLLER = ExitCode(
    3, "`pause`, `resume`: recorded, but no controller is running to act on it until `start` resumes the rollout"
)


def register(sub) -> None:
    p = sub.add_parser(
        "rollout", help="move a candidate through traffic stages while guardrails hold; roll back when one breaks"
    )
    rsub = p.add_subparsers(dest="rollout_command", required=True, metavar="ACTION")
    s = rsub.add_parser(
        "start",
        help="start (or, after a restart, resume) the rollout controller; runs until done",
        description="State is kept in Kafka: starting again after a crash continues the rollout where it was.",
    )
    options.add_experiment_flags(s)
    s.add_argument("--candidate", required=True)
    s.add_argument(
        "--stages", default="5,10,25,50,100", help="candidate weight per stage, percent (default 5,10,25,50,100)"
    )
    s.add_argument(
        "--stage-duration", type=options.duration, default=600.0, help="minimum time per stage, e.g. 10m (default 10m)"
    )
    s.add_argument("--max-error-rate", type=float, default=0.05, help="candidate error rate, at most (default 0.05)")
    s.add_argument(
        "--max-error-increase",
        type=float,
        default=0.02,
        help="candidate error rate over the control's, at most (default 0.02: two points)",
    )
    s.add_argument(
        "--max-p95-ratio",
        type=float,
        default=1.5,
        help="candidate p95 latency / control's, at most (default 1.5)",
    )
    s.add_argument(
        "--alpha",
        type=float,
        default=0.05,
        help="chance of rolling back a candidate within its limits, however long it is watched (default 0.05)",
    )
    s.add_argument(
        "--min-samples", type=int, default=200, help="responses per variant and stage before any verdict (default 200)"
    )
    options.add_kafka_flags(s)
    s.set_defaults(func=run_start)
    for action, help_ in (
        ("pause", "hold the current stage (weights stay)"),
        ("resume", "continue a paused rollout"),
        ("abort", "stop and set the candidate back to 0%%"),
        ("status", "print the rollout's state"),
    ):
        a = rsub.add_parser(action, help=help_)
        a.add_argument("--experiment", required=True, help="the experiment's name")
        options.add_kafka_flags(a)
        a.set_defaults(func=run_request, action=action)


def run_start(args: argparse.Namespace) -> int:
    from abqueue.analysis import stats
    from abqueue.control import live_config
    from abqueue.control.rollout import IN_WORDS, Guardrails, RolloutController, RolloutState, load_state

    stats.require_extra()  # the sample-ratio check: not a controller that dies at its first stage
    settings = options.kafka_settings(args)
    exp = options.experiment(args)
    live = live_config.current(settings, exp.name)
    base = live.experiment if live else exp
    base.variant(args.candidate)
    try:
        stages = [float(x) for x in args.stages.split(",")]
    except ValueError:
        raise UsageError(f"--stages {args.stages!r} is not a list of percentages, e.g. 5,10,25,50,100") from None
    if not stages or stages != sorted(stages) or not stages[0] > 0 or stages[-1] > 100:
        raise UsageError("--stages must rise within (0, 100], e.g. 5,10,25,50,100")
    if args.candidate == base.control_variant:
        raise UsageError(f"--candidate {args.candidate} is the control; name the variant to roll out")
    state = load_state(settings, exp.name)
    if state and state.status in ("running", "paused"):
        if state.candidate != args.candidate:
            raise UsageError(
                f"a rollout of {state.candidate} is {IN_WORDS[state.status]} for {exp.name}; abort it first"
            )
        print(
            f"resuming the rollout of {state.candidate} at stage {state.stages[state.stage]:g}% ({IN_WORDS[state.status]})"
        )
    else:
        guardrails = options.typed(
            Guardrails,
            "guardrails",
            max_error_rate=args.max_error_rate,
            max_error_increase=args.max_error_increase,
            max_p95_ratio=args.max_p95_ratio,
            alpha=args.alpha,
            min_samples=args.min_samples,
        )
        state = options.typed(
            RolloutState,
            "rollout",
            experiment=exp.name,
            candidate=args.candidate,
            control=base.control_variant,
            stages=stages,
            stage_duration_s=args.stage_duration,
            guardrails=guardrails,
        )
        print(f"rolling out {args.candidate} through {', '.join(f'{x:g}%' for x in stages)}")
    final = RolloutController(settings, state, base, progress=lambda line: print(line, flush=True)).run()
    print(f"rollout {IN_WORDS[final.status]}: {final.reason or ''}".rstrip(": "))
    return 0 if final.status == "completed" else ROLLED_BACK


def run_request(args: argparse.Namespace) -> int:
    from abqueue.control.rollout import IN_WORDS, abort_here, alive, heartbeat, load_state, request

    settings = options.kafka_settings(args)
    if args.action == "status":
        state = load_state(settings, args.experiment)
        if state is None:
            print(f"no rollout recorded for {args.experiment}")
            return NO_ROLLOUT
        print(
            f"{state.experiment}: {state.candidate} {IN_WORDS[state.status]} at stage {state.stage + 1}/{len(state.stages)} "
            f"({state.stages[state.stage]:g}%){': ' + state.reason if state.reason else ''}"
        )
        if state.status in ("running", "paused"):
            print(_controller_line(heartbeat(settings, state.experiment), state))
        for line in state.history:
            print(f"  {line}")
        return 0
    state = request(settings, args.experiment, args.action)
    beat = heartbeat(settings, args.experiment)
    if alive(beat):
        print(f"{args.action} requested for the rollout of {state.candidate}; its controller acts within a second")
        return 0
    gone = _last_seen(beat)
    if args.action == "abort":
        abort_here(settings, state, f"aborted by an operator while no controller was running ({gone})")
        print(f"no controller is running ({gone}); aborted here: {state.candidate} is back at 0%")
        return 0
    print(
        f"{args.action} recorded, but no controller is running ({gone}); it takes effect when "
        f"`abq rollout start --config FILE --candidate {state.candidate}` resumes the rollout"
    )
    return NO_CONTROLLER


def _last_seen(beat) -> str:
    return f"last seen {time.time() - beat.at:.0f}s ago" if beat else "none has run"


def _controller_line(beat, state) -> str:
    from abqueue.control.rollout import alive, stage_numbers

    if not alive(beat):
        return f"  no controller is running ({_last_seen(beat)}); `abq rollout start` resumes it"
    now = time.time()
    return f"  controller alive ({beat.controller}, {now - beat.at:.0f}s ago): {stage_numbers(state, beat, now)}"
