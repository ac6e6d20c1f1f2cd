"""At-least-once under crashes: a worker is killed with SIGKILL over and over while it drains a
backlog, and restarted each time. Counts requests lost (must be 0) and duplicate responses, against
the documented window of about two rounds of --max-inflight per kill.

Run:  python bench/redelivery.py [--requests 2000] [--kills 5] [--max-inflight 16] [--latency-ms 20]
Uses ABQ_BOOTSTRAP_SERVERS / KAFKA_BOOTSTRAP_SERVERS if set, else starts a local broker.
"""

from __future__ import annotations

import argparse
import sys
import time
import uuid
from collections import Counter

from common import bootstrap, leave_no_trace, start_worker

from abqueue.kafka import KafkaSettings, ensure_topics
from producers import AbqClient
from schemas import ExperimentConfig, InferenceRequest


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=2000)
    ap.add_argument("--kills", type=int, default=5)
    ap.add_argument("--max-inflight", type=int, default=16)
    ap.add_argument("--latency-ms", type=float, default=20.0, help="echo engine time per batch")
    ap.add_argument("--partitions", type=int, default=4)
    args = ap.parse_args()

    addr, broker = bootstrap()
    settings = KafkaSettings(bootstrap_servers=addr)
    exp = ExperimentConfig(
        name=f"redeliver{uuid.uuid4().hex[:8]}",
        partitions=args.partitions,
        variants=[{"name": "a", "weight": 100, "engine": "echo", "engine_args": {"latency_ms": args.latency_ms}}],
    )
    ensure_topics(settings, exp)
    leave_no_trace(f"abq.{exp.name}.")
    flags = ("--max-inflight", str(args.max_inflight))
    responses: Counter[str] = Counter()
    kills = 0
    try:
        with AbqClient(settings, exp) as client:
            ids = set()
            for i in range(args.requests):
                req, _ = client.publish(InferenceRequest(experiment=exp.name, routing_key=f"u{i}", prompt=f"r {i}"))
                ids.add(req.id)
            client.publisher.flush()
            worker = start_worker(exp, addr, "a", *flags)
            step = args.requests // (args.kills + 1)
            deadline = time.monotonic() + 600
            while time.monotonic() < deadline and not ids <= set(responses):
                for reply in client.listener.poll(timeout_ms=100):
                    responses[reply.response.request_id] += 1
                answered = len(set(responses) & ids)
                if kills < args.kills and answered >= step * (kills + 1):
                    worker.kill()  # SIGKILL: no drain, no commit, no leaving the group
                    worker.wait()
                    kills += 1
                    print(f"kill {kills}: {answered}/{args.requests} answered", file=sys.stderr)
                    worker = start_worker(exp, addr, "a", *flags)
            # Late duplicates still in flight show up within a moment.
            end = time.monotonic() + 3
            while time.monotonic() < end:
                for reply in client.listener.poll(timeout_ms=100):
                    responses[reply.response.request_id] += 1
            worker.terminate()
            worker.wait(timeout=30)
    finally:
        if broker:
            broker.stop()
    lost = len(ids - set(responses))
    dupes = sum(c - 1 for c in responses.values())
    # Per kill: responses published but not yet covered by a landed commit, at most about two
    # rounds of in-flight requests when requests take equal time.
    window = kills * 2 * args.max_inflight
    print(f"\n{'measure':<36}{'value':>10}")
    for k, v in (
        ("requests", args.requests),
        ("kill -9 of the worker", kills),
        ("lost", lost),
        ("duplicate responses", dupes),
        ("bound (kills x 2 x max_inflight)", window),
        ("duplicates per kill", round(dupes / kills, 2) if kills else 0),
    ):
        print(f"{k:<36}{v:>10}")
    print(
        f"\nrerun: python bench/redelivery.py --requests {args.requests} --kills {args.kills} "
        f"--max-inflight {args.max_inflight} --latency-ms {args.latency_ms:g} --partitions {args.partitions}"
    )
    return 0 if lost == 0 and dupes <= window else 1


if __name__ == "__main__":
    sys.exit(main())
