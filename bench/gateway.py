"""What `abq gateway` adds: one echo worker behind it, the official openai SDK in front.

Reports, in one run on one broker:
  - added latency at low load: one request at a time through the gateway (SDK -> HTTP -> gateway ->
    Kafka -> worker -> Kafka -> gateway) against `AbqClient.submit` straight to Kafka (p50/p95);
  - requests/s through one gateway process with C concurrent callers, against the same callers
    submitting straight to Kafka through one shared AbqClient.

Run:  python bench/gateway.py [--sequential 200] [--requests 2000] [--concurrency 32]
Uses ABQ_BOOTSTRAP_SERVERS / KAFKA_BOOTSTRAP_SERVERS if set, else starts a local broker.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import yaml
from common import bootstrap, leave_no_trace, percentile, start_worker

from abqueue.kafka import KafkaSettings, ensure_topics
from abqueue.localkafka.broker import free_port
from producers import AbqClient
from schemas import ExperimentConfig, InferenceRequest

PROMPT = "benchmark request " * 8


def direct(client: AbqClient, exp: ExperimentConfig, i: int) -> float:
    t0 = time.perf_counter()
    client.submit(InferenceRequest(experiment=exp.name, routing_key=f"user-{i}", prompt=PROMPT, max_tokens=16))
    return time.perf_counter() - t0


def through(sdk, exp: ExperimentConfig, i: int) -> float:
    t0 = time.perf_counter()
    sdk.completions.create(model=exp.name, prompt=PROMPT, max_tokens=16, user=f"user-{i}")
    return time.perf_counter() - t0


def rate(call, n: int, concurrency: int) -> float:
    t0 = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(call, range(n)))
    return n / (time.perf_counter() - t0)


def main() -> int:
    import openai

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sequential", type=int, default=200)
    ap.add_argument("--requests", type=int, default=2000)
    ap.add_argument("--concurrency", type=int, default=32)
    args = ap.parse_args()
    addr, broker = bootstrap()
    settings = KafkaSettings(bootstrap_servers=addr)
    exp = ExperimentConfig(
        name=f"gw{uuid.uuid4().hex[:8]}", partitions=4, variants=[{"name": "a", "weight": 100, "engine": "echo"}]
    )
    leave_no_trace(f"abq.{exp.name}.")
    ensure_topics(settings, exp)
    cfg = Path("/tmp") / f"{exp.name}.yaml"
    cfg.write_text(yaml.safe_dump(exp.model_dump(mode="json")))
    port = free_port()
    env = {**os.environ, "ABQ_BOOTSTRAP_SERVERS": addr, "ABQ_LOG_LEVEL": "WARNING"}
    worker = start_worker(exp, addr, "a")
    gateway = subprocess.Popen(
        [sys.executable, "-m", "abqueue.cli.main", "gateway", "--config", str(cfg), "--port", str(port)], env=env
    )
    try:
        sdk = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0)
        deadline = time.monotonic() + 60
        while True:
            try:
                sdk.models.list()
                break
            except openai.APIConnectionError:
                if time.monotonic() > deadline:
                    raise SystemExit("abq gateway did not start within 60 s") from None
                time.sleep(0.2)
        with AbqClient(settings, exp) as client:
            for i in range(20):  # warm both paths: connections, metadata, the worker's first batch
                direct(client, exp, i), through(sdk, exp, i)
            print(f"one at a time, {args.sequential} requests each way", file=sys.stderr)
            d = [direct(client, exp, i) for i in range(args.sequential)]
            g = [through(sdk, exp, i) for i in range(args.sequential)]
            print(f"{args.requests} requests, {args.concurrency} callers, each way", file=sys.stderr)
            d_rate = rate(lambda i: direct(client, exp, i), args.requests, args.concurrency)
            g_rate = rate(lambda i: through(sdk, exp, i), args.requests, args.concurrency)
    finally:
        gateway.terminate()
        worker.terminate()
        gateway.wait(30)
        worker.wait(30)
        if broker:
            broker.stop()
    ms = lambda xs, q: 1000 * percentile(xs, q)  # noqa: E731
    print(f"\n{'':<44}{'p50 ms':>10}{'p95 ms':>10}")
    print(f"{'AbqClient.submit, one at a time':<44}{ms(d, 50):>10.1f}{ms(d, 95):>10.1f}")
    print(f"{'openai SDK -> abq gateway, one at a time':<44}{ms(g, 50):>10.1f}{ms(g, 95):>10.1f}")
    print(f"{'added by the gateway':<44}{ms(g, 50) - ms(d, 50):>10.1f}{ms(g, 95) - ms(d, 95):>10.1f}")
    print(f"\n{'requests/s with ' + str(args.concurrency) + ' callers':<44}{'req/s':>10}")
    print(f"{'AbqClient.submit (one shared client)':<44}{d_rate:>10.0f}")
    print(f"{'openai SDK -> one abq gateway process':<44}{g_rate:>10.0f}")
    print(f"{'ratio gateway / direct':<44}{g_rate / d_rate:>10.2f}")
    print(
        f"\nrerun: python bench/gateway.py --sequential {args.sequential} --requests {args.requests} "
        f"--concurrency {args.concurrency}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
