"""A pool against dedicated workers: three variants of one base model (the base and two LoRA adapters)
served (a) by one pool worker, one engine, and (b) by one worker per variant, three engines, on the
same requests (an equal share each, all published at once, greedy decoding).

On a GPU, (b) needs three GPUs where (a) needs one; on this CPU both share the same cores, so the
figures are what one engine does with three variants against three engines splitting the machine,
and the memory the engines hold (resident set of the worker processes and vLLM's engine processes).

CPU (default): the "small" random Llama (~30M parameters, seeded random weights) and two random
adapters made here, vLLM's CPU build. Engine start is not measured.

Run:  python bench/pool.py [--requests 96] [--max-tokens 32]
Uses ABQ_BOOTSTRAP_SERVERS / KAFKA_BOOTSTRAP_SERVERS if set, else starts a local broker.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

from common import bootstrap, free_port, leave_no_trace, percentile, start_worker, tree_rss_bytes, wait_ready
from throughput import prompts

from abqueue.kafka import KafkaSettings, ensure_topics
from producers import AbqClient
from schemas import ExperimentConfig, InferenceRequest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from tiny_model import ENGINE_ARGS, make_lora_adapter, make_tiny_model

VARIANTS = ("base", "lora-a", "lora-b")


def experiment(model: Path, adapters: dict[str, Path], pooled: bool) -> ExperimentConfig:
    typed = {k: ENGINE_ARGS[k] for k in ("dtype", "max_model_len", "max_num_seqs")}
    args = {**{k: v for k, v in ENGINE_ARGS.items() if k not in typed}, "load_format": "auto"}
    engine = {"engine": "vllm", "model": str(model), "vllm": typed, "engine_args": args}
    variants = [
        {
            "name": name,
            "weight": 34 if name == "base" else 33,
            **({"pool": "shared"} if pooled else {}),
            **(engine if name == "base" or not pooled else {}),
            **({"lora": {"path": str(adapters[name])}} if name in adapters else {}),
        }
        for name in VARIANTS
    ]
    return ExperimentConfig.model_validate(
        {"name": f"pool{uuid.uuid4().hex[:8]}", "partitions": 2, "variants": variants}
    )


def run(addr: str, exp: ExperimentConfig, units: list[str], texts: list[str], max_tokens: int) -> dict:
    settings = KafkaSettings(bootstrap_servers=addr)
    ensure_topics(settings, exp)
    leave_no_trace(f"abq.{exp.name}.")
    ports = {u: free_port() for u in units}
    workers = {u: start_worker(exp, addr, u, "--metrics-port", str(ports[u])) for u in units}
    try:
        for u, port in ports.items():
            wait_ready(workers[u], port, 1800)
        with AbqClient(settings, exp) as client:
            reqs = [
                InferenceRequest(experiment=exp.name, routing_key=f"u{i}", variant=VARIANTS[i % 3], prompt=text,
                                 max_tokens=max_tokens, temperature=0)
                for i, text in enumerate(texts)
            ]  # fmt: skip
            sent: dict[str, float] = {}
            done: dict[str, float] = {}
            t0 = time.perf_counter()
            for r in reqs:
                sent[client.publish(r)[0].id] = time.perf_counter()
            client.publisher.flush()
            got = client.wait(
                set(sent), 3600, on_reply=lambda r: done.setdefault(r.response.request_id, time.perf_counter())
            )
            elapsed = time.perf_counter() - t0
        assert len(got) == len(sent) and all(r.response.ok for r in got.values()), "requests failed or were lost"
        tokens = sum(r.response.usage.completion_tokens for r in got.values())
        latencies = [done[i] - sent[i] for i in sent]
        return {
            "engines": len(units),
            "requests_per_s": len(sent) / elapsed,
            "output_tokens_per_s": tokens / elapsed,
            "latency_s_p50": statistics.median(latencies),
            "latency_s_p95": percentile(latencies, 95),
            "resident_mb": sum(tree_rss_bytes(w.pid) for w in workers.values()) / 2**20,
            "output_tokens": tokens,
        }
    finally:
        for w in workers.values():
            w.terminate()
        for w in workers.values():
            w.wait(timeout=120)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--requests", type=int, default=96, help="in all, an equal share per variant (default 96)")
    p.add_argument("--max-tokens", type=int, default=32)
    args = p.parse_args()
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    work = Path(tempfile.mkdtemp(prefix="abq-pool-"))
    model = make_tiny_model(work / "small", "small", weights=True)
    adapters = {name: make_lora_adapter(work / name, model, seed) for name, seed in (("lora-a", 1), ("lora-b", 2))}
    texts = prompts(args.requests)
    addr, broker = bootstrap()
    try:
        print(f"pool: one worker, one engine, three variants; {args.requests} requests", file=sys.stderr)
        pooled = run(addr, experiment(model, adapters, True), ["shared"], texts, args.max_tokens)
        print("dedicated: one worker and engine per variant, the same requests", file=sys.stderr)
        dedicated = run(addr, experiment(model, adapters, False), list(VARIANTS), texts, args.max_tokens)
    finally:
        if broker:
            broker.stop()
    print(f"\n{'measure':<24}{'pool':>12}{'dedicated':>12}{'pool/ded.':>11}")
    for k in ("engines", "output_tokens_per_s", "requests_per_s", "latency_s_p50", "latency_s_p95", "resident_mb",
              "output_tokens"):  # fmt: skip
        a, b = pooled[k], dedicated[k]
        print(f"{k:<24}{a:>12.2f}{b:>12.2f}{a / b:>11.3f}")
    print(f"\nrerun: python bench/pool.py --requests {args.requests} --max-tokens {args.max_tokens}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
