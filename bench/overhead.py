"""What the queueing layer costs: one echo worker (no model), so every millisecond measured is
producer -> Kafka -> worker -> Kafka -> consumer.

Reports, in one run on one broker, for at-least-once and for exactly-once delivery:
  - added latency at low load: one request at a time, submit to response (p50/p95/p99);
  - throughput of one worker draining a backlog (requests/s);
  - the same backlog, and the same one-at-a-time round trips, piped through Kafka with no worker logic
    (a consumer that republishes raw records): the floor and ceiling for this client library on this
    machine, so the worker's own share is measured against them in the same run.

Run:  python bench/overhead.py [--requests 3000] [--sequential 200] [--max-inflight N] [--json out.json]
Uses ABQ_BOOTSTRAP_SERVERS / KAFKA_BOOTSTRAP_SERVERS if set, else starts a local broker.
"""

from __future__ import annotations

import argparse
import multiprocessing
import statistics
import sys
import time
import uuid
from pathlib import Path

import orjson
from common import bootstrap, cpu_seconds, leave_no_trace, percentile, start_worker
from kafka import TopicPartition

from abqueue.kafka import KafkaSettings, admin_client, consumer, ensure_topics, producer
from producers import AbqClient
from schemas import ExperimentConfig, InferenceRequest


def request(exp, i):
    return InferenceRequest(
        experiment=exp.name, routing_key=f"user-{i}", prompt=f"benchmark request number {i} " * 4, max_tokens=16
    )


def raw_pipe(settings, n, payload: bytes, partitions: int, sequential: int) -> tuple[float, float, list[float]]:
    """Records through Kafka and back with a consumer that republishes them: no decode, no engine.
    Returns records/s for a backlog of n, the relay's CPU seconds per record, and round trips of
    `sequential` records sent one at a time."""
    name = f"abq.raw{uuid.uuid4().hex[:8]}"
    leave_no_trace(name)
    admin = admin_client(settings)
    admin.create_topics(
        {
            f"{name}.in": {"num_partitions": partitions, "replication_factor": 1},
            f"{name}.out": {"num_partitions": partitions, "replication_factor": 1},
        },
        wait_for_metadata=True,
    )
    admin.close()
    out_c = consumer(settings, group_id=None)
    out_tps = [TopicPartition(f"{name}.out", p) for p in range(partitions)]
    out_c.assign(out_tps)
    out_c.seek_to_end(*out_tps)
    for tp in out_tps:
        out_c.position(tp)
    stop = multiprocessing.get_context("fork").Event()

    def relay():
        c = consumer(settings, f"{name}.in", group_id=f"{name}.relay", max_poll_records=64)
        p = producer(settings, linger_ms=0)
        while not stop.is_set():
            batch = c.poll(timeout_ms=100)
            recs = [r for rs in batch.values() for r in rs]
            for r in recs:
                p.send(f"{name}.out", key=r.key, value=r.value)
            if recs:
                p.flush()
                c.commit()
        c.close()
        p.close()

    # The relay runs in its own process, as the worker does, so the two compete for the CPU alike.
    t = multiprocessing.get_context("fork").Process(target=relay, daemon=True)
    p = producer(settings)
    t.start()
    time.sleep(3)  # group join
    rtts = []
    for i in range(sequential + 1):
        t0 = time.perf_counter()
        p.send(f"{name}.in", key=b"seq", value=payload)
        p.flush()
        while not out_c.poll(timeout_ms=100):
            pass
        if i:  # the first one waits for the relay's group join
            rtts.append(time.perf_counter() - t0)
    start, cpu = time.perf_counter(), cpu_seconds(t.pid)
    for i in range(n):
        p.send(f"{name}.in", key=str(i).encode(), value=payload)
    p.flush()
    got = 0
    while got < n:
        got += sum(len(rs) for rs in out_c.poll(timeout_ms=200).values())
    elapsed, cpu = time.perf_counter() - start, cpu_seconds(t.pid) - cpu
    stop.set()
    t.join()
    p.close()
    out_c.close()
    return n / elapsed, cpu / n, rtts


def measure(settings, addr, args, delivery: str) -> dict:
    """One echo worker in `delivery` mode: latency one request at a time, then a backlog's throughput."""
    exp = ExperimentConfig(
        name=f"bench{uuid.uuid4().hex[:8]}",
        partitions=args.partitions,
        variants=[{"name": "a", "weight": 100, "engine": "echo"}],
    )
    ensure_topics(settings, exp)
    leave_no_trace(f"abq.{exp.name}.")
    # The worker runs at its defaults unless the command line says otherwise: defaults are what users get.
    worker = start_worker(exp, addr, "a", *worker_flags(args), "--delivery", delivery)
    try:
        with AbqClient(settings, exp) as client:
            # Warm up: the worker joins its group and the first fetches settle.
            client.submit(request(exp, -1), timeout=60)
            rtts, legs = [], {"to_worker": [], "in_worker": [], "back_to_caller": []}
            for i in range(args.sequential):
                t0 = time.perf_counter()
                reply = client.submit(request(exp, i), timeout=30)
                rtts.append(time.perf_counter() - t0)
                tm, now = reply.response.timings, time.time()
                legs["to_worker"].append(tm.dequeued - tm.enqueued)
                legs["in_worker"].append(tm.finished - tm.dequeued)
                legs["back_to_caller"].append(now - tm.finished)

            sent = set()
            t0, cpu = time.perf_counter(), cpu_seconds(worker.pid)
            for i in range(args.requests):
                req, _ = client.publish(request(exp, 100_000 + i))
                sent.add(req.id)
            client.publisher.flush()
            done = client.wait(sent, timeout=600)
            elapsed, cpu = time.perf_counter() - t0, cpu_seconds(worker.pid) - cpu
            assert len(done) == len(sent), f"only {len(done)} of {len(sent)} responses"
    finally:
        worker.terminate()
        worker.wait(timeout=30)
    return {
        "added_latency_ms_p50": 1000 * statistics.median(rtts),
        "added_latency_ms_p95": 1000 * percentile(rtts, 95),
        "added_latency_ms_p99": 1000 * percentile(rtts, 99),
        **{f"leg_{k}_ms_p50": 1000 * statistics.median(v) for k, v in legs.items()},
        "requests_per_s": len(done) / elapsed,
        "cpu_ms_per_request": 1000 * cpu / len(done),
    }


def worker_flags(args) -> list[str]:
    """The worker settings given on the command line; the rest are the worker's defaults."""
    return [
        f
        for name in ("max_batch", "max_inflight")
        if getattr(args, name)
        for f in (f"--{name.replace('_', '-')}", str(getattr(args, name)))
    ]


LABELS = {
    "added_latency_ms_p50": "one request at a time ms p50",
    "added_latency_ms_p95": "one request at a time ms p95",
    "added_latency_ms_p99": "one request at a time ms p99",
    "leg_to_worker_ms_p50": "leg to the worker ms p50",
    "leg_in_worker_ms_p50": "leg in the worker ms p50",
    "leg_back_to_caller_ms_p50": "leg back to the caller ms p50",
    "requests_per_s": "one worker draining the backlog requests/s",
    "cpu_ms_per_request": "worker CPU ms per request (/proc)",
    "to_raw_pipe_ratio": "worker / bare relay",
    "cpu_to_raw_pipe_ratio": "worker CPU per request / relay CPU per record",
    "added_over_raw_kafka_ms_p50": "added over the bare relay's round trip ms p50",
}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=3000, help="backlog size for the throughput run")
    ap.add_argument("--sequential", type=int, default=200, help="one-at-a-time requests for latency")
    ap.add_argument("--max-batch", type=int, default=None, help="the worker's records per poll (default: its own)")
    ap.add_argument("--max-inflight", type=int, default=None, help="the worker's bound (default: its own)")
    ap.add_argument("--partitions", type=int, default=4)
    ap.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = ap.parse_args()

    addr, broker = bootstrap()
    settings = KafkaSettings(bootstrap_servers=addr)
    try:
        modes = {mode: measure(settings, addr, args, mode) for mode in ("at-least-once", "exactly-once")}
        payload = orjson.dumps(
            request(ExperimentConfig(name="x", variants=[{"name": "a", "weight": 100}]), 0).model_dump(mode="json")
        )
        raw_rps, raw_cpu, raw_rtts = raw_pipe(settings, args.requests, payload, args.partitions, args.sequential)
    finally:
        if broker:
            broker.stop()

    alo, eos = modes["at-least-once"], modes["exactly-once"]
    raw_p50 = 1000 * statistics.median(raw_rtts)
    for m in modes.values():
        m["to_raw_pipe_ratio"] = m["requests_per_s"] / raw_rps
        m["cpu_to_raw_pipe_ratio"] = m["cpu_ms_per_request"] / (1000 * raw_cpu)
        m["added_over_raw_kafka_ms_p50"] = m["added_latency_ms_p50"] - raw_p50
    # The README's table uses these labels, in this order.
    print(f"\n{'measure':<52}{'at-least-once':>15}{'exactly-once':>15}")
    for k in alo:
        print(f"{LABELS.get(k, k):<52}{alo[k]:>15.3f}{eos[k]:>15.3f}")
    print(f"{'bare relay records/s':<52}{raw_rps:>15.1f}")
    print(f"{'bare relay round trip ms p50':<52}{raw_p50:>15.3f}")
    print(f"{'bare relay CPU ms per record (/proc)':<52}{1000 * raw_cpu:>15.3f}")
    print(f"{'exactly-once / at-least-once requests/s':<52}{eos['requests_per_s'] / alo['requests_per_s']:>15.3f}")
    print(
        f"\nrerun: python bench/overhead.py --requests {args.requests} --sequential {args.sequential} "
        f"--partitions {args.partitions} {' '.join(worker_flags(args))}".rstrip()
    )
    if args.json:
        figures = {
            "modes": modes,
            "raw_kafka_pipe_records_per_s": raw_rps,
            "raw_kafka_pipe_cpu_ms_per_record": 1000 * raw_cpu,
            "raw_kafka_round_trip_ms_p50": raw_p50,
            "requests": args.requests,
            "sequential": args.sequential,
            "max_batch": args.max_batch,
            "max_inflight": args.max_inflight,
            "partitions": args.partitions,
        }
        args.json.write_text(orjson.dumps(figures, option=orjson.OPT_INDENT_2).decode())
    return 0


if __name__ == "__main__":
    sys.exit(main())
