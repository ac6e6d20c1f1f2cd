"""What the queueing layer costs: echo workers (no model), so every millisecond measured is
producer -> Kafka -> worker -> Kafka -> consumer.

Reports, in one run on one broker, for an at-least-once and an exactly-once worker at their defaults:
  - added latency at low load: one request at a time, publish to response (p50/p95/p99), and its legs;
  - throughput of one worker draining a backlog (requests/s) and the worker's CPU per request (/proc);
  - the same records through a bare relay (a consumer that republishes raw records, no decoding, its
    own process): the floor and ceiling for this client library on this machine.

All three paths run at once and are measured in turns, after a warm-up of each: round trips go
relay, at-least-once, exactly-once, then the next round starts one further on; backlogs run relay,
at-least-once, exactly-once and then in the reverse order. Measured one path after another, the first
one met a colder broker: the JVM compiles its produce and fetch paths as it runs, and one hop on a
fresh local broker fell from about 8 to 4 ms over its first 50,000 records, so whatever was measured
last looked best. Every path is fed the same bytes (the encoded requests, published by one raw
producer) and read by a raw consumer, so the client's own costs are the same for all three; a last
row gives the at-least-once round trip through `AbqClient.submit`, what an application sees.

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
from dataclasses import dataclass, field
from pathlib import Path

import orjson
from common import bootstrap, cpu_seconds, echo_experiment, leave_no_trace, percentile, start_worker, wait_ready
from kafka import TopicPartition

from abqueue.kafka import KafkaSettings, admin_client, consumer, producer, tracing
from abqueue.localkafka.broker import free_port
from producers import AbqClient
from producers.publisher import RequestPublisher
from schemas import ExperimentConfig, InferenceRequest, encode
from workers.worker import POLL_RECORDS

WARM_UP = 2000  # records through each path before anything is measured
MODES = ("at-least-once", "exactly-once")


def request(exp: ExperimentConfig, i: int) -> InferenceRequest:
    return InferenceRequest(
        experiment=exp.name, routing_key=f"user-{i}", prompt=f"benchmark request number {i} " * 4, max_tokens=16
    )


@dataclass
class Lane:
    """One path through Kafka: where its records go in, where they come out, who does the work."""

    name: str
    pid: int
    out_topic: str
    id_field: str  # the field of an output record that names the input's id
    make: object  # i -> (topic, key, value, headers)
    out: object = None  # a raw consumer on out_topic
    rtts: list[float] = field(default_factory=list)
    legs: dict[str, list[float]] = field(default_factory=lambda: {"to_worker": [], "in_worker": [], "back": []})
    backlog: list[tuple[int, float, float]] = field(default_factory=list)  # (records, seconds, CPU seconds)
    submit: object = None  # i -> None: a round trip through the client library instead of raw records


def relay(settings: KafkaSettings, name: str, ready) -> None:
    """The bare relay: consume, republish the raw record, flush, commit; no decoding. It polls as many
    records at a time as a worker does."""
    c = consumer(
        settings, f"{name}.in", group_id=f"{name}.relay", max_poll_records=POLL_RECORDS, auto_offset_reset="latest"
    )
    p = producer(settings, linger_ms=0)
    while not c.assignment():
        c.poll(timeout_ms=100)
    ready.set()
    while True:
        batch = c.poll(timeout_ms=100)
        recs = [r for rs in batch.values() for r in rs]
        for r in recs:
            p.send(f"{name}.out", key=r.key, value=r.value, headers=r.headers)
        if recs:
            p.flush()
            c.commit()


def request_maker(exp: ExperimentConfig, publisher: RequestPublisher, topic: str | None = None):
    """i -> the record the publisher would write for request i (to `topic` instead, for the relay)."""

    def make(i: int):
        req = publisher.assign(request(exp, i))
        headers = [(tracing.HEADER, tracing.new_traceparent().encode("ascii"))]
        return (topic or exp.request_topic(req.variant, req.priority), req.routing_key.encode(), encode(req), headers)

    return make


def tail_consumer(settings: KafkaSettings, topic: str, partitions: int):
    c = consumer(settings, group_id=None, fetch_max_wait_ms=50, isolation_level="read_committed")
    tps = [TopicPartition(topic, p) for p in range(partitions)]
    c.assign(tps)
    c.seek_to_end(*tps)
    for tp in tps:
        c.position(tp)
    return c


def round_trip(prod, lane: Lane, i: int) -> None:
    if lane.submit is not None:
        t0 = time.perf_counter()
        lane.submit(i)
        lane.rtts.append(time.perf_counter() - t0)
        return
    topic, key, value, headers = lane.make(i)
    rid = orjson.loads(value)["id"]
    t0 = time.perf_counter()
    prod.send(topic, key=key, value=value, headers=headers)
    prod.flush()
    while True:
        for recs in lane.out.poll(timeout_ms=100).values():
            for r in recs:
                out = orjson.loads(r.value)
                if out[lane.id_field] != rid:
                    continue  # a late duplicate or another caller's: not this round trip's
                now = time.time()
                lane.rtts.append(time.perf_counter() - t0)
                if tm := out.get("timings"):
                    lane.legs["to_worker"].append(tm["dequeued"] - tm["enqueued"])
                    lane.legs["in_worker"].append(tm["finished"] - tm["dequeued"])
                    lane.legs["back"].append(now - tm["finished"])
                return


def drain(prod, lane: Lane, first: int, n: int, record: bool = True) -> None:
    """A backlog of n through the lane, timed from the first send to the last output record."""
    records = [lane.make(first + i) for i in range(n)]  # encoded before the clock starts
    t0, cpu = time.perf_counter(), cpu_seconds(lane.pid)
    for topic, key, value, headers in records:
        prod.send(topic, key=key, value=value, headers=headers)
    prod.flush()
    got = 0
    while got < n:
        got += sum(len(rs) for rs in lane.out.poll(timeout_ms=200).values())
    if record:
        lane.backlog.append((n, time.perf_counter() - t0, cpu_seconds(lane.pid) - cpu))


def worker_flags(args) -> list[str]:
    """The worker settings given on the command line; the rest are the worker's defaults."""
    return [
        f
        for name in ("max_batch", "max_inflight")
        if getattr(args, name)
        for f in (f"--{name.replace('_', '-')}", str(getattr(args, name)))
    ]


def p50(xs: list[float]) -> float:
    return 1000 * statistics.median(xs)


def figures(lane: Lane, relay_lane: Lane) -> dict[str, float]:
    n = sum(b[0] for b in lane.backlog)
    seconds, cpu = sum(b[1] for b in lane.backlog), sum(b[2] for b in lane.backlog)
    relay_n = sum(b[0] for b in relay_lane.backlog)
    relay_rate = relay_n / sum(b[1] for b in relay_lane.backlog)
    relay_cpu = sum(b[2] for b in relay_lane.backlog) / relay_n
    out = {
        "added_latency_ms_p50": p50(lane.rtts),
        "added_latency_ms_p95": 1000 * percentile(lane.rtts, 95),
        "added_latency_ms_p99": 1000 * percentile(lane.rtts, 99),
        **{f"leg_{k}_ms_p50": p50(v) for k, v in lane.legs.items() if v},
        "requests_per_s": n / seconds,
        "cpu_ms_per_request": 1000 * cpu / n,
    }
    out["to_raw_pipe_ratio"] = out["requests_per_s"] / relay_rate
    out["cpu_to_raw_pipe_ratio"] = out["cpu_ms_per_request"] / (1000 * relay_cpu)
    out["added_over_raw_kafka_ms_p50"] = out["added_latency_ms_p50"] - p50(relay_lane.rtts)
    return out


LABELS = {
    "added_latency_ms_p50": "one request at a time ms p50",
    "added_latency_ms_p95": "one request at a time ms p95",
    "added_latency_ms_p99": "one request at a time ms p99",
    "leg_to_worker_ms_p50": "leg to the worker ms p50",
    "leg_in_worker_ms_p50": "leg in the worker ms p50",
    "leg_back_ms_p50": "leg back to the caller ms p50",
    "requests_per_s": "one worker draining the backlog requests/s",
    "cpu_ms_per_request": "worker CPU ms per request (/proc)",
    "to_raw_pipe_ratio": "worker / bare relay",
    "cpu_to_raw_pipe_ratio": "worker CPU per request / relay CPU per record",
    "added_over_raw_kafka_ms_p50": "added over the bare relay's round trip ms p50",
}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=3000, help="backlog size per turn (two turns per path)")
    ap.add_argument("--sequential", type=int, default=200, help="one-at-a-time requests per path for latency")
    ap.add_argument("--max-batch", type=int, default=None, help="the worker's records per poll (default: its own)")
    ap.add_argument("--max-inflight", type=int, default=None, help="the worker's bound (default: its own)")
    ap.add_argument("--partitions", type=int, default=4)
    ap.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = ap.parse_args()

    addr, broker = bootstrap()
    settings = KafkaSettings(bootstrap_servers=addr)
    procs: list = []
    try:
        name = f"abq.raw{uuid.uuid4().hex[:8]}"
        leave_no_trace(name)
        admin = admin_client(settings)
        admin.create_topics(
            {f"{name}.{d}": {"num_partitions": args.partitions, "replication_factor": 1} for d in ("in", "out")},
            wait_for_metadata=True,
        )
        admin.close()
        ready = multiprocessing.get_context("spawn").Event()
        relay_proc = multiprocessing.get_context("spawn").Process(
            target=relay, args=(settings, name, ready), daemon=True
        )
        relay_proc.start()
        procs.append(relay_proc)

        lanes, exps, publishers = [], {}, []
        # The client's lane has a worker of its own: a second reader on another lane's responses topic
        # would slow that lane (its fetches, in this process, compete with the lane's own).
        for mode in (*MODES, "client"):
            exp = echo_experiment(settings, "bench", args.partitions)
            port = free_port()
            # The workers run at their defaults unless the command line says otherwise: defaults are what users get.
            delivery = MODES[0] if mode == "client" else mode
            worker = start_worker(
                exp, addr, "a", *worker_flags(args), "--delivery", delivery, "--metrics-port", str(port)
            )
            procs.append(worker)
            wait_ready(worker, port, timeout_s=120)
            exps[mode] = exp
            if mode == "client":
                client_pid = worker.pid
                continue
            publishers.append(publisher := RequestPublisher(settings, exp))
            lanes.append(Lane(mode, worker.pid, exp.response_topic, "request_id", request_maker(exp, publisher)))
        relay_make = request_maker(exps[MODES[0]], publishers[0], topic=f"{name}.in")
        lanes.insert(0, Lane("relay", relay_proc.pid, f"{name}.out", "id", relay_make))
        ready.wait(60)
        for lane in lanes:
            lane.out = tail_consumer(settings, lane.out_topic, args.partitions)

        # What an application sees: an at-least-once worker through the client library, in the same turns.
        client = AbqClient(settings, exps["client"])
        client_lane = Lane("client", client_pid, exps["client"].response_topic, "request_id", relay_make)
        client_lane.submit = lambda i: client.submit(request(exps["client"], 40_000_000 + i), timeout=30)
        prod = producer(settings)
        print(f"warming up: {WARM_UP} records and 20 round trips through each path", file=sys.stderr)
        for lane in lanes:
            drain(prod, lane, 10_000_000, WARM_UP, record=False)
        turns = [*lanes, client_lane]
        for lane in turns:
            for i in range(20):
                round_trip(prod, lane, 20_000_000 + i)
            lane.rtts.clear()
            for v in lane.legs.values():
                v.clear()
        print(f"round trips: {args.sequential} per path, in turns", file=sys.stderr)
        for i in range(args.sequential):
            for k in range(len(turns)):
                round_trip(prod, turns[(i + k) % len(turns)], i)
        print(f"backlogs: {args.requests} per turn, two turns per path", file=sys.stderr)
        for turn, order in enumerate((lanes, lanes[::-1])):
            for lane in order:
                drain(prod, lane, 1_000_000 * (turn + 1), args.requests)
        client.close()
        prod.close()
        for lane in lanes:
            lane.out.close()
        for publisher in publishers:
            publisher.close()
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            proc.join(30) if hasattr(proc, "join") else proc.wait(timeout=30)
        if broker:
            broker.stop()

    relay_lane, modes = lanes[0], {lane.name: figures(lane, lanes[0]) for lane in lanes[1:]}
    alo, eos = modes["at-least-once"], modes["exactly-once"]
    relay_rate = sum(b[0] for b in relay_lane.backlog) / sum(b[1] for b in relay_lane.backlog)
    relay_cpu = sum(b[2] for b in relay_lane.backlog) / sum(b[0] for b in relay_lane.backlog)
    # The README's table uses these labels, in this order.
    print(f"\n{'measure':<52}{'at-least-once':>15}{'exactly-once':>15}")
    for k in alo:
        print(f"{LABELS.get(k, k):<52}{alo[k]:>15.3f}{eos[k]:>15.3f}")
    print(f"{'bare relay records/s':<52}{relay_rate:>15.1f}")
    print(f"{'bare relay round trip ms p50':<52}{p50(relay_lane.rtts):>15.3f}")
    print(f"{'bare relay CPU ms per record (/proc)':<52}{1000 * relay_cpu:>15.3f}")
    print(f"{'exactly-once / at-least-once requests/s':<52}{eos['requests_per_s'] / alo['requests_per_s']:>15.3f}")
    print(f"{'at-least-once through AbqClient.submit ms p50':<52}{p50(client_lane.rtts):>15.3f}")
    print(f"{'at-least-once through AbqClient.submit ms p99':<52}{1000 * percentile(client_lane.rtts, 99):>15.3f}")
    print(
        f"\nrerun: python bench/overhead.py --requests {args.requests} --sequential {args.sequential} "
        f"--partitions {args.partitions} {' '.join(worker_flags(args))}".rstrip()
    )
    if args.json:
        out = {
            "modes": modes,
            "raw_kafka_pipe_records_per_s": relay_rate,
            "raw_kafka_pipe_cpu_ms_per_record": 1000 * relay_cpu,
            "raw_kafka_round_trip_ms_p50": p50(relay_lane.rtts),
            "client_submit_ms_p50": p50(client_lane.rtts),
            "client_submit_ms_p99": 1000 * percentile(client_lane.rtts, 99),
            **{k: getattr(args, k) for k in ("requests", "sequential", "max_batch", "max_inflight", "partitions")},
        }
        args.json.write_text(orjson.dumps(out, option=orjson.OPT_INDENT_2).decode())
    return 0


if __name__ == "__main__":
    sys.exit(main())
