"""Two revisions of the worker side by side: an echo worker of each drains backlogs in turns on one
broker, and the run reports the CPU per request, the rate and the round trip of each and their ratios.

This machine's speed drifts by more than the effects worth finding (a tenth or more between runs),
so a change is judged by a ratio within one run: the two workers run at once, their backlogs
alternate (base first in even rounds, head first in odd ones), and both meet the same broker, the
same load from the benchmark and the same moment's noise.

Run:  python bench/compare.py --base REV [--head REV] [--rounds 6] [--requests 4000] [--sequential 150]
          [--delivery at-least-once|exactly-once] [--base-flags "..."] [--head-flags "..."]
REV is any git revision, checked out into a temporary worktree; without --head the head is the
working tree as it is now. Uses ABQ_BOOTSTRAP_SERVERS / KAFKA_BOOTSTRAP_SERVERS if set, else starts
a local broker.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml
from common import bootstrap, echo_experiment, wait_ready
from overhead import Lane, drain, request_maker, round_trip, tail_consumer

from abqueue.kafka import KafkaSettings, producer
from abqueue.localkafka.broker import free_port
from producers.publisher import RequestPublisher
from schemas import ExperimentConfig

REPO = Path(__file__).resolve().parent.parent


@contextlib.contextmanager
def checkout(rev: str | None):
    """A directory holding `rev` (a temporary git worktree), or the working tree itself for None."""
    if rev is None:
        yield REPO
        return
    where = Path(tempfile.mkdtemp(prefix="abq-compare-")) / "tree"
    subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", "-q", str(where), rev], check=True)
    try:
        yield where
    finally:
        subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(where)], check=False)


def start(root: Path, exp: ExperimentConfig, addr: str, flags: list[str]) -> tuple[subprocess.Popen, int]:
    """`abq worker` from the code under `root` (it comes first on the path, before the installed copy)."""
    cfg = Path(tempfile.mkdtemp(prefix="abq-compare-")) / f"{exp.name}.yaml"
    cfg.write_text(yaml.safe_dump(exp.model_dump(mode="json")))
    port = free_port()
    env = {**os.environ, "ABQ_BOOTSTRAP_SERVERS": addr, "ABQ_LOG_LEVEL": "ERROR", "PYTHONPATH": str(root)}
    cmd = [sys.executable, "-m", "abqueue.cli.main", "worker", "--config", str(cfg), "--variant", "a"]
    worker = subprocess.Popen([*cmd, "--metrics-port", str(port), *flags], env=env, cwd=root)
    return worker, port


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base", required=True, help="the revision to compare against (a commit, a branch, HEAD~3)")
    ap.add_argument("--head", default=None, help="the revision to compare (default: the working tree as it is)")
    ap.add_argument("--rounds", type=int, default=6, help="backlogs per worker, in alternating order")
    ap.add_argument("--requests", type=int, default=4000, help="requests per backlog")
    ap.add_argument("--sequential", type=int, default=150, help="one-at-a-time round trips per worker")
    ap.add_argument("--delivery", default="at-least-once", choices=("at-least-once", "exactly-once"))
    ap.add_argument("--partitions", type=int, default=4)
    ap.add_argument("--base-flags", default="", help="more `abq worker` flags for the base worker")
    ap.add_argument("--head-flags", default="", help="more `abq worker` flags for the head worker")
    args = ap.parse_args()

    addr, broker = bootstrap()
    settings = KafkaSettings(bootstrap_servers=addr)
    lanes: list[Lane] = []
    procs: list[subprocess.Popen] = []
    try:
        with checkout(args.base) as base, checkout(args.head) as head:
            for label, root, extra in (("base", base, args.base_flags), ("head", head, args.head_flags)):
                exp = echo_experiment(settings, "cmp", args.partitions)
                worker, port = start(root, exp, addr, ["--delivery", args.delivery, *shlex.split(extra)])
                procs.append(worker)
                wait_ready(worker, port, timeout_s=120)
                lane = Lane(
                    label,
                    worker.pid,
                    exp.response_topic,
                    "request_id",
                    request_maker(exp, RequestPublisher(settings, exp)),
                )
                lane.out = tail_consumer(settings, exp.response_topic, args.partitions)
                lanes.append(lane)
            prod = producer(settings)
            print("warming up: 5000 requests through each worker", file=sys.stderr)
            for lane in lanes:
                drain(prod, lane, 0, 5000, record=False)
            for k in range(args.rounds):
                for lane in lanes if k % 2 == 0 else lanes[::-1]:
                    drain(prod, lane, 1_000_000 * (k + 1), args.requests)
                print(f"  round {k + 1} of {args.rounds}", file=sys.stderr)
            for i in range(args.sequential):
                for lane in lanes if i % 2 == 0 else lanes[::-1]:
                    round_trip(prod, lane, 90_000_000 + i)
            prod.close()
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            proc.wait(timeout=30)
        if broker:
            broker.stop()

    base_lane, head_lane = lanes

    def cpu(lane: Lane) -> float:
        return sum(c for _, _, c in lane.backlog) / sum(n for n, _, _ in lane.backlog)

    def rate(lane: Lane) -> float:
        return sum(n for n, _, _ in lane.backlog) / sum(t for _, t, _ in lane.backlog)

    def rtt(lane: Lane) -> float:
        return 1000 * statistics.median(lane.rtts) if lane.rtts else float("nan")

    print(f"\n{'measure':<40}{'base':>12}{'head':>12}{'head/base':>12}")
    for name, f in (
        ("worker CPU ms per request", lambda x: 1000 * cpu(x)),
        ("requests/s", rate),
        ("round trip ms p50", rtt),
    ):
        b, h = f(base_lane), f(head_lane)
        print(f"{name:<40}{b:>12.3f}{h:>12.3f}{h / b:>12.3f}")
    print("per round, CPU ms per request: base " + " ".join(f"{1000 * c / n:.3f}" for n, _, c in base_lane.backlog))
    print("                               head " + " ".join(f"{1000 * c / n:.3f}" for n, _, c in head_lane.backlog))
    flags = "".join(
        f" --{k}-flags {shlex.quote(v)}" for k, v in (("base", args.base_flags), ("head", args.head_flags)) if v
    )
    head_arg = f" --head {args.head}" if args.head else ""
    print(
        f"\nrerun: python bench/compare.py --base {args.base}{head_arg} --rounds {args.rounds} --requests {args.requests} "
        f"--sequential {args.sequential} --delivery {args.delivery} --partitions {args.partitions}{flags}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
