"""How `abq report` scales: N synthetic responses of a two-variant experiment in the responses topic,
then `abq report` over them, its wall time and peak resident memory (the report streams: its memory
should not grow with N).

Prints N, seconds, peak RSS, the latency lift it finds (b is 5% slower) and its first lines, and the
command to rerun.

Run:  python bench/report_scale.py [--responses 1000000]
Uses ABQ_BOOTSTRAP_SERVERS / KAFKA_BOOTSTRAP_SERVERS if set, else starts a local broker.
"""

from __future__ import annotations

import argparse
import os
import random
import resource
import subprocess
import sys
import time
import uuid
from pathlib import Path

import orjson
import yaml
from common import bootstrap, leave_no_trace

from abqueue.kafka import KafkaSettings, ensure_topics, producer
from schemas import ExperimentConfig, InferenceResponse, unit_of


def fill(settings: KafkaSettings, exp: ExperimentConfig, n: int) -> None:
    """N responses, half per variant (by user), from one template (the contract's own encoding) with a fresh
    id, user and timings each; b is 5% slower."""
    rnd = random.Random(1)
    template = InferenceResponse(
        request_id="x", experiment=exp.name, variant="a", assigned_by="weights", model="m", outputs=["hello"],
        finish_reason="stop", usage={"prompt_tokens": 20, "completion_tokens": 40, "prompt_chars": 80},
        timings={"enqueued": 0.0, "dequeued": 0.0, "started": 0.0, "first_token": 0.0, "finished": 0.0, "ttft_s": 0.1},
        worker_id="w",
    ).model_dump(mode="json", exclude_none=True)  # fmt: skip
    p = producer(settings, linger_ms=20, batch_size=256 * 1024)
    t0, start = time.monotonic(), time.time() - n / 1000
    for i in range(n):
        user = f"user-{i // 3}"  # three requests each, sticky to one variant
        variant = "ab"[(i // 3) % 2]
        enq = start + i / 1000
        chars = rnd.randint(10, 2000)
        latency = (0.5 + chars / 2000 + rnd.expovariate(2)) * (1.05 if variant == "b" else 1.0)
        template.update(request_id=f"r{i:09d}", variant=variant, unit=unit_of(exp.name, user))
        template["usage"]["prompt_chars"] = chars
        template["timings"].update(
            enqueued=enq, dequeued=enq, started=enq, first_token=enq + 0.1, finished=enq + latency
        )
        p.send(exp.response_topic, key=user.encode(), value=orjson.dumps(template))
        if i and i % 200_000 == 0:
            print(f"  {i:>10,} responses written ({i / (time.monotonic() - t0):,.0f}/s)", file=sys.stderr)
    p.flush()
    p.close()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--responses", type=int, default=1_000_000)
    args = ap.parse_args()
    addr, broker = bootstrap()
    settings = KafkaSettings(bootstrap_servers=addr)
    exp = ExperimentConfig(
        name=f"scale{uuid.uuid4().hex[:8]}",
        partitions=8,
        variants=[{"name": "a", "weight": 50}, {"name": "b", "weight": 50}],
    )
    leave_no_trace(f"abq.{exp.name}.")
    cfg = Path("/tmp") / f"{exp.name}.yaml"
    cfg.write_text(yaml.safe_dump(exp.model_dump(mode="json")))
    try:
        ensure_topics(settings, exp)
        print(f"writing {args.responses:,} responses to {exp.response_topic}", file=sys.stderr)
        fill(settings, exp, args.responses)
        env = {**os.environ, "ABQ_BOOTSTRAP_SERVERS": addr}
        t0 = time.monotonic()
        out = subprocess.run(
            [sys.executable, "-m", "abqueue.cli.main", "report", "--config", str(cfg), "--format", "json"],
            env=env, capture_output=True, text=True,
        )  # fmt: skip
        elapsed = time.monotonic() - t0
        if out.returncode:
            raise SystemExit(f"abq report failed: {out.stderr.strip().splitlines()[-1]}")
        peak_kb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss  # Linux: kilobytes
        result = orjson.loads(out.stdout)
        counts = {k: v["count"] for k, v in result["variants"].items()}
    finally:
        if broker:
            broker.stop()
    print(f"\n{'responses in the topic':<36}{args.responses:>14,}")
    print(f"{'counted by the report':<36}{sum(counts.values()):>14,}")
    print(f"{'abq report wall time (s)':<36}{elapsed:>14.1f}")
    print(f"{'responses per second':<36}{args.responses / elapsed:>14,.0f}")
    print(f"{'peak RSS (MB)':<36}{peak_kb / 1024:>14.0f}")
    print(f"{'peak RSS per 100k responses (MB)':<36}{peak_kb / 1024 / (args.responses / 100_000):>14.1f}")
    lift = result["comparisons"]["b"]["latency_s"]
    print(f"{'b: mean latency lift (true +5%)':<36}{100 * lift['lift']:>13.2f}%  "
          f"(95% CI {100 * lift['lift_ci'][0]:+.2f}% to {100 * lift['lift_ci'][1]:+.2f}%)")  # fmt: skip
    print("report's first lines:", *result["summary"], sep="\n  ")
    print(f"\nrerun: python bench/report_scale.py --responses {args.responses}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
