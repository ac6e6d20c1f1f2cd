"""Chaos soak: a steady stream of interactive requests and a bulk job against a three-node Kafka
cluster and several workers of two variants, while faults are injected at random: kill -9 and
SIGTERM of workers, kill -9 of a broker then its restart, SIGSTOP of a broker or a worker for 5-20 s,
and rebalance storms (workers joining and leaving). A checker then reads every response and prints
what was sent, answered, lost (must be 0) and answered twice (must stay under the documented bound).

The fault schedule is a function of the seed alone (printed first); the run is bounded in time
(--minutes of faults, then at most --recover-timeout s to catch up) and leaves nothing behind: its
workers, its brokers and their data directory are gone at exit, Ctrl-C included.

    python bench/chaos.py --minutes 10 --seed 7
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import yaml
from kafka import TopicPartition

from abqueue.analysis.stats import percentile
from abqueue.kafka import KafkaSettings, admin_client, consumer, ensure_topics
from abqueue.localkafka import LocalCluster
from abqueue.localkafka.broker import free_port, port_open
from producers import AbqClient
from schemas import ExperimentConfig, InferenceRequest, InferenceResponse, VariantConfig

FAULTS = ("worker-kill9", "worker-sigterm", "worker-sigstop", "broker-kill9", "broker-sigstop", "rebalance-storm")
MAX_INFLIGHT, MAX_BATCH = 32, 16
# What one worker may answer again after a fault: the documented window, two rounds of --max-inflight
# (README, "Guarantees").
WINDOW = 2 * MAX_INFLIGHT


@dataclass
class Fault:
    at: float  # seconds after the start
    kind: str
    target: int  # which worker slot or broker node (modulo their number)
    seconds: float  # how long a process stays stopped or down


def schedule(seed: int, minutes: float) -> list[Fault]:
    """Deterministic: the same seed and length give the same faults at the same times."""
    rng = random.Random(seed)
    out, t = [], 20.0  # the first fault once traffic flows
    while t < minutes * 60:
        out.append(Fault(round(t, 1), rng.choice(FAULTS), rng.randrange(1000), round(rng.uniform(5, 20), 1)))
        t += rng.uniform(15, 35)
    return out


def _free_base(n: int) -> int:
    while True:
        base = free_port()
        if base < 65000 and not any(port_open("127.0.0.1", base + i) for i in range(n)):
            return base


class Fleet:
    """Worker processes of both variants, replaced when a fault ends them."""

    def __init__(self, exp: ExperimentConfig, cfg: Path, bootstrap: str, logs: Path):
        self.exp, self.cfg, self.bootstrap, self.logs = exp, cfg, bootstrap, logs
        self.slots: list[tuple[str, subprocess.Popen]] = []
        self.started = 0

    def spawn(self, variant: str) -> subprocess.Popen:
        self.started += 1
        log = open(self.logs / f"worker-{variant}-{self.started}.log", "wb")  # noqa: SIM115 (the worker writes it)
        env = {**os.environ, "ABQ_BOOTSTRAP_SERVERS": self.bootstrap, "ABQ_LOG_LEVEL": "INFO"}
        flags = ["--max-inflight", str(MAX_INFLIGHT), "--max-batch", str(MAX_BATCH), "--drain-seconds", "10"]
        cmd = [sys.executable, "-m", "abqueue.cli.main", "worker", "--config", str(self.cfg), "--variant", variant]
        return subprocess.Popen([*cmd, *flags], env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)

    def start(self, per_variant: int) -> None:
        for v in self.exp.variants:
            self.slots += [(v.name, self.spawn(v.name)) for _ in range(per_variant)]

    def replace(self, slot: int) -> None:
        variant, proc = self.slots[slot]
        proc.wait()
        self.slots[slot] = (variant, self.spawn(variant))

    def stop(self) -> None:
        for _, p in self.slots:
            _kill_group(p)


def _kill_group(p: subprocess.Popen) -> None:
    try:
        os.killpg(p.pid, signal.SIGCONT)
        os.killpg(p.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    p.wait()


def inject(f: Fault, fleet: Fleet, cluster: LocalCluster, wait_in_sync) -> str:
    """Do one fault and undo it; returns what was done."""
    if f.kind.startswith("worker"):
        slot = f.target % len(fleet.slots)
        variant, proc = fleet.slots[slot]
        what = f"worker {slot} ({variant}, pid {proc.pid})"
        if f.kind == "worker-sigstop":
            os.kill(proc.pid, signal.SIGSTOP)
            time.sleep(f.seconds)
            os.kill(proc.pid, signal.SIGCONT)
            return f"SIGSTOP of {what} for {f.seconds:.0f} s"
        proc.send_signal(signal.SIGKILL if f.kind == "worker-kill9" else signal.SIGTERM)
        fleet.replace(slot)
        return f"{'kill -9' if f.kind == 'worker-kill9' else 'SIGTERM'} of {what}, replaced"
    if f.kind.startswith("broker"):
        wait_in_sync()  # one broker down at a time: two would leave partitions under min.insync.replicas
        node = cluster.nodes[f.target % len(cluster.nodes)]
        if f.kind == "broker-sigstop":
            node.send_signal(signal.SIGSTOP)
            time.sleep(f.seconds)
            node.send_signal(signal.SIGCONT)
            return f"SIGSTOP of broker {node.node_id} for {f.seconds:.0f} s"
        node.send_signal(signal.SIGKILL)
        time.sleep(f.seconds)
        cluster.start(log=lambda m: None)
        return f"kill -9 of broker {node.node_id}, restarted after {f.seconds:.0f} s"
    # A rebalance storm: three workers join, one at a time, then leave, one at a time.
    variant = fleet.exp.variants[f.target % len(fleet.exp.variants)].name
    extra = []
    for _ in range(3):
        extra.append(fleet.spawn(variant))
        time.sleep(f.seconds / 6)
    for p in extra:
        p.send_signal(signal.SIGTERM)
        time.sleep(f.seconds / 6)
    for p in extra:
        try:
            p.wait(timeout=30)
        except subprocess.TimeoutExpired:
            _kill_group(p)
    return f"rebalance storm on {variant}: 3 workers joined and left over {f.seconds:.0f} s"


def duplicate_bound(kind: str, workers: int) -> int:
    """The documented window: a worker fault redoes one worker's window; a broker fault or a
    rebalance (6 of them in a storm) may make every worker of the cluster redo its window."""
    if kind.startswith("worker"):
        return WINDOW
    return workers * WINDOW * (6 if kind == "rebalance-storm" else 1)


def total_lag(settings: KafkaSettings, exp: ExperimentConfig) -> int:
    admin, reader = admin_client(settings), consumer(settings, group_id=None)
    try:
        lag = 0
        for v in exp.variants:
            group = exp.consumer_group(v.name)
            committed = {tp: om.offset for tp, om in admin.list_group_offsets(group).get(group, {}).items()}
            for topic in exp.request_topics(v.name).values():
                tps = [TopicPartition(topic, p) for p in reader.partitions_for_topic(topic) or ()]
                for tp, end in reader.end_offsets(tps).items():
                    lag += end - max(committed.get(tp, 0), 0)
        return lag
    finally:
        admin.close()
        reader.close()


def read_responses(settings: KafkaSettings, topic: str) -> list[InferenceResponse]:
    c = consumer(settings, group_id=None)
    tps = [TopicPartition(topic, p) for p in c.partitions_for_topic(topic)]
    c.assign(tps)
    c.seek_to_beginning(*tps)
    ends = c.end_offsets(tps)
    out = []
    try:
        while any(c.position(tp) < ends[tp] for tp in tps):
            for recs in c.poll(timeout_ms=500).values():
                out += [InferenceResponse.model_validate_json(r.value) for r in recs]
        return out
    finally:
        c.close()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--minutes", type=float, default=10.0, help="how long faults are injected (default 10)")
    ap.add_argument("--seed", type=int, default=7, help="the fault schedule's seed (default 7)")
    ap.add_argument("--rate", type=float, default=10.0, help="interactive requests per second (default 10)")
    ap.add_argument("--bulk-rate", type=float, default=3.0, help="the bulk job's requests per second (default 3)")
    ap.add_argument("--workers", type=int, default=2, help="workers per variant (default 2)")
    ap.add_argument("--recover-timeout", type=float, default=300.0, help="seconds to catch up after (default 300)")
    args = ap.parse_args()
    command = f"python bench/chaos.py --minutes {args.minutes:g} --seed {args.seed}"
    faults = schedule(args.seed, args.minutes)
    print(f"chaos soak, seed {args.seed}: {len(faults)} faults over {args.minutes:g} min")
    for f in faults:
        print(f"  t={f.at:6.1f}s  {f.kind:<16} target {f.target % 100:<3} {f.seconds:4.1f}s")

    work = Path(tempfile.mkdtemp(prefix=f"abq-chaos-{args.seed}-"))
    cluster = LocalCluster(port=_free_base(3), brokers=3, data_dir=work / "kafka")
    fleet: Fleet | None = None
    bulk: subprocess.Popen | None = None
    ok = False
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        print(f"starting a 3-node cluster in {work}...", flush=True)
        bootstrap = cluster.start(log=lambda m: None)
        settings = KafkaSettings(bootstrap_servers=bootstrap)
        exp = ExperimentConfig(
            name=f"chaos{args.seed}",
            variants=[
                VariantConfig(name=n, weight=50, engine="echo", model=f"echo-{n}", engine_args={"latency_ms": 30})
                for n in ("a", "b")
            ],
            partitions=6,
        )
        ensure_topics(settings, exp)
        cfg = work / "experiment.yaml"
        cfg.write_text(yaml.safe_dump(exp.model_dump(mode="json")))
        fleet = Fleet(exp, cfg, bootstrap, work)
        fleet.start(args.workers)
        workers = len(fleet.slots)

        def wait_in_sync(timeout: float = 120.0) -> None:
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                st = cluster.status()
                if all(n.running for n in st.nodes) and st.controller is not None and not st.under_replicated:
                    return
                time.sleep(1)

        # The bulk job: `abq batch` at batch priority, for the whole soak.
        lines = int(args.bulk_rate * args.minutes * 60)
        bulk_in = work / "bulk.jsonl"
        bulk_in.write_text(
            "".join(
                json.dumps({"id": f"bulk-{i}", "prompt": f"bulk {i}", "priority": "batch", "max_tokens": 8}) + "\n"
                for i in range(lines)
            )
        )
        bulk = subprocess.Popen(
            [sys.executable, "-m", "abqueue.cli.main", "batch", str(bulk_in), "--out", str(work / "bulk.out.jsonl"),
             "--config", str(cfg), "--rate", str(args.bulk_rate), "--no-progress", "--timeout", str(args.recover_timeout)],
            env={**os.environ, "ABQ_BOOTSTRAP_SERVERS": bootstrap, "ABQ_LOG_LEVEL": "WARNING"},
            stdout=subprocess.DEVNULL, stderr=open(work / "bulk.log", "wb"), start_new_session=True,  # noqa: SIM115
        )  # fmt: skip

        sent: dict[str, float] = {}
        arrived: dict[str, float] = {}
        stop = threading.Event()
        client = AbqClient(settings, exp, create_topics=False)

        def publish() -> None:
            i, t0 = 0, time.monotonic()
            while not stop.is_set():
                req, _ = client.publish(
                    InferenceRequest(
                        experiment=exp.name, routing_key=f"user-{i % 500}", prompt=f"chat {i}", max_tokens=8
                    )
                )
                sent[req.id] = time.time()
                i += 1
                time.sleep(max(0.0, t0 + i / args.rate - time.monotonic()))

        def listen() -> None:
            while not stop.is_set() or len(arrived) < len(sent):
                for reply in client.listener.poll(timeout_ms=200):
                    arrived.setdefault(reply.response.request_id, time.time())
                if stop.is_set() and time.monotonic() > listen_deadline:
                    return

        listen_deadline = float("inf")
        publisher, listener = threading.Thread(target=publish), threading.Thread(target=listen)
        publisher.start()
        listener.start()

        start = time.monotonic()
        done: Counter[str] = Counter()
        bound = 0
        for f in faults:
            time.sleep(max(0.0, start + f.at - time.monotonic()))
            what = inject(f, fleet, cluster, wait_in_sync)
            done[f.kind] += 1
            bound += duplicate_bound(f.kind, workers)
            print(f"  t={time.monotonic() - start:6.1f}s  {what}", flush=True)
        # Recovery: the time from the end of the last fault until the groups' lag is first back to 0.
        last_fault_end, recovered = time.monotonic(), None
        while recovered is None and time.monotonic() < last_fault_end + args.recover_timeout:
            if total_lag(settings, exp) == 0:
                recovered = time.monotonic() - last_fault_end
            else:
                time.sleep(0.5)
        time.sleep(max(0.0, start + args.minutes * 60 - time.monotonic()))
        stop.set()
        publisher.join()
        client.publisher.flush()
        listen_deadline = time.monotonic() + args.recover_timeout

        # The end: every request of the stream answered and both groups' lag back to 0.
        deadline = time.monotonic() + args.recover_timeout
        lag = None
        while time.monotonic() < deadline:
            lag = total_lag(settings, exp)
            if lag == 0 and len(arrived) >= len(sent) and bulk.poll() is not None:
                break
            time.sleep(1)
        listener.join(timeout=30)
        if bulk.poll() is None:
            bulk.terminate()
            bulk.wait(timeout=30)
        client.close()

        answers = read_responses(settings, exp.response_topic)
        counts = Counter(r.request_id for r in answers)
        bulk_ids = {f"bulk-{i}" for i in range(lines)}
        submitted = set(sent) | bulk_ids
        lost = submitted - set(counts)
        strangers = set(counts) - submitted
        duplicates = sum(n - 1 for n in counts.values())
        errors = sum(1 for r in answers if r.error is not None)
        latency = sorted(arrived[i] - sent[i] for i in sent if i in arrived)
        out_file = work / "bulk.out.jsonl"
        bulk_results = len(out_file.read_text().splitlines()) if out_file.exists() else 0

        print()
        print(f"| {'fault':<16} | count |")
        print(f"| {'-' * 16} | ----- |")
        for kind in FAULTS:
            print(f"| {kind:<16} | {done[kind]:>5} |")
        rows = [
            ("requests sent", f"{len(submitted)} ({len(sent)} interactive, {lines} bulk)"),
            ("answered", f"{len(submitted) - len(lost)}"),
            ("lost (must be 0)", f"{len(lost)}"),
            ("answers to unknown ids (must be 0)", f"{len(strangers)}"),
            ("duplicate responses", f"{duplicates} (bound {bound}: {WINDOW} per worker fault, {workers}x{WINDOW} per broker fault or rebalance)"),
            ("error responses", f"{errors}"),
            ("bulk job results", f"{bulk_results} of {lines}, exit {bulk.returncode}"),
            ("interactive latency p50 / p99", f"{percentile(latency, 50):.2f} s / {percentile(latency, 99):.2f} s" if latency else "-"),
            ("lag back to 0 after the last fault", f"{recovered:.1f} s" if recovered is not None else f"not within {args.recover_timeout:.0f} s"),
            ("lag at the end (must be 0)", f"{lag}"),
        ]  # fmt: skip
        print()
        for k, v in rows:
            print(f"| {k:<35} | {v} |")
        print(f"\nrerun: {command}")
        ok = not lost and not strangers and duplicates <= bound and lag == 0
        if not ok:
            print("FAILED: see the table", file=sys.stderr)
        return 0 if ok else 1
    finally:
        if fleet:
            fleet.stop()
        if bulk and bulk.poll() is None:
            _kill_group(bulk)
        cluster.stop()
        # The brokers' data always goes; a failed run keeps the workers' and the bulk job's logs.
        shutil.rmtree(work / "kafka", ignore_errors=True)
        if ok:
            shutil.rmtree(work, ignore_errors=True)
        else:
            print(f"logs kept in {work}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
