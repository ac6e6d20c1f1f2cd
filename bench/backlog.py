"""Flat under a huge backlog: one echo worker, at its defaults, drains N requests that wait in the
topic before it starts. Its resident memory (from /proc) must stay flat and its rate must not decay
as the backlog goes down: nothing it keeps may grow with what it has processed.

Prints, every tenth of the backlog: requests processed (committed offsets), the rate over that
tenth, and the worker's RSS; then RSS at 0, 100k and N processed, and the last tenth's rate over
the first's.

Run:  python bench/backlog.py [--requests 1000000] [--partitions 8]
Uses ABQ_BOOTSTRAP_SERVERS / KAFKA_BOOTSTRAP_SERVERS if set, else starts a local broker.
"""

from __future__ import annotations

import argparse
import sys
import time
import uuid

import orjson
from common import bootstrap, cpu_seconds, leave_no_trace, rss_bytes, start_worker
from kafka.errors import KafkaError

from abqueue.kafka import KafkaSettings, admin_client, ensure_topics, producer
from schemas import ExperimentConfig, InferenceRequest

MB = 1024 * 1024


def fill(settings: KafkaSettings, exp: ExperimentConfig, n: int) -> None:
    """N valid requests straight into the variant's topic. Encoded from one template (the contract's
    own encoding), with a fresh id and routing key each: the producer side is not what is measured."""
    template = InferenceRequest(
        experiment=exp.name, variant="a", routing_key="user-0", prompt="backlog request " * 8, max_tokens=16
    ).model_dump(mode="json", exclude_none=True)
    topic = exp.request_topic("a")
    p = producer(settings, linger_ms=20, batch_size=256 * 1024, compression_type=None)
    t0 = time.monotonic()
    for i in range(n):
        template["id"], template["routing_key"] = f"bl-{i:09d}", f"user-{i % 10_000}"
        p.send(topic, key=template["routing_key"].encode(), value=orjson.dumps(template))
        if i and i % 100_000 == 0:
            print(f"  {i:>9,} requests written ({i / (time.monotonic() - t0):,.0f}/s)", file=sys.stderr)
    p.flush()
    p.close()


def processed(admin, group: str) -> int:
    """Requests answered and committed so far (0 while the group has no coordinator yet)."""
    try:
        offsets = admin.list_group_offsets(group).get(group, {})
    except KafkaError:
        return 0
    return sum(om.offset for om in offsets.values() if om.offset >= 0)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=1_000_000)
    ap.add_argument("--partitions", type=int, default=8)
    args = ap.parse_args()
    n = args.requests

    addr, broker = bootstrap()
    settings = KafkaSettings(bootstrap_servers=addr)
    exp = ExperimentConfig(
        name=f"backlog{uuid.uuid4().hex[:8]}",
        partitions=args.partitions,
        variants=[{"name": "a", "weight": 100, "engine": "echo"}],
    )
    leave_no_trace(f"abq.{exp.name}.")
    worker = None
    try:
        ensure_topics(settings, exp)
        print(f"writing {n:,} requests to {exp.request_topic('a')}", file=sys.stderr)
        fill(settings, exp, n)
        admin = admin_client(settings)
        worker = start_worker(exp, addr, "a")
        group = exp.consumer_group("a")
        marks = [round(n * k / 10) for k in range(1, 11)]
        rows = []  # (processed, seconds since start, rss bytes, cpu seconds)
        t0 = time.monotonic()
        rss0 = None
        while len(rows) < len(marks):
            if worker.poll() is not None:
                raise SystemExit(f"the worker exited with {worker.returncode}")
            done = processed(admin, group)
            if rss0 is None and done > 0:
                rss0 = rss_bytes(worker.pid)  # serving, nothing much processed yet
                t0, base = time.monotonic(), done
            while len(rows) < len(marks) and done >= marks[len(rows)]:
                rows.append((done, time.monotonic() - t0, rss_bytes(worker.pid), cpu_seconds(worker.pid)))
                prev_n, prev_t = (base, 0.0) if len(rows) == 1 else rows[-2][:2]
                rate = (done - prev_n) / max(1e-9, rows[-1][1] - prev_t)
                print(
                    f"  {done:>9,} processed  {rate:>8,.0f} req/s over the last tenth  RSS {rows[-1][2] / MB:7.1f} MB"
                )
            time.sleep(0.5)
        admin.close()
    finally:
        if worker is not None:
            worker.terminate()
            worker.wait(timeout=60)
        if broker:
            broker.stop()

    def rate(i: int) -> float:
        (n1, t1), (n0, t0_) = rows[i][:2], ((base, 0.0) if i == 0 else rows[i - 1][:2])
        return (n1 - n0) / (t1 - t0_)

    at_100k = next((r[2] for r in rows if r[0] >= 100_000), rows[0][2])
    print(f"\n{'RSS at the start (MB)':<44}{rss0 / MB:>10.1f}")
    print(f"{'RSS at 100k processed (MB)':<44}{at_100k / MB:>10.1f}")
    print(f"{f'RSS at {n:,} processed (MB)':<44}{rows[-1][2] / MB:>10.1f}")
    print(f"{'RSS at the end / at 100k':<44}{rows[-1][2] / at_100k:>10.3f}")
    print(f"{'rate over the first tenth (req/s)':<44}{rate(0):>10.0f}")
    print(f"{'rate over the last tenth (req/s)':<44}{rate(9):>10.0f}")
    print(f"{'last tenth / first tenth':<44}{rate(9) / rate(0):>10.3f}")
    print(f"{'mean rate (req/s)':<44}{(rows[-1][0] - base) / rows[-1][1]:>10.0f}")
    print(f"{'worker CPU ms per request':<44}{1000 * rows[-1][3] / rows[-1][0]:>10.3f}")
    print(f"\nrerun: python bench/backlog.py --requests {n} --partitions {args.partitions}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
