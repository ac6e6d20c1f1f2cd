"""Streaming through abqueue against `vllm serve` streaming on the same model, the official openai SDK
as the client of both, same prompts, same sampling (`ignore_eos`: every answer is --max-tokens long):

  (a) SDK -> `vllm serve`, stream=True;
  (b) SDK -> `abq gateway` -> Kafka -> `abq worker --engine vllm` (vLLM's serving layer in-process)
      -> chunks on the gateway's reply topic -> server-sent events.

At one caller and at --concurrency callers: time to first token (the first chunk with content) p50
and p95, and output tokens/s (from the usage chunk). The goals: (b)'s TTFT p50 at one caller within
30 ms of (a)'s; (b)'s output tokens/s at --concurrency callers >= 0.9 of (a)'s. Also the Kafka
records per streamed answer (the worker's abq_stream_records_total over abq_streams_total), and
where (b)'s time to first token went at one caller (legs()).

On a machine with few cores, place the engine the same way in both paths (--pin-engine: a CPU of
its own, as a GPU host leaves its CPUs to the rest; --nice-engine: a lower priority): see
openai_serving.place_engine.

CPU (default): the "small" random Llama of tests/tiny_model.py. GPU: --model /path [--engine-arg k=v].

Run:  python bench/streaming.py [--requests 96] [--single 16] [--concurrency 32] [--max-tokens 64] [--nice-engine] [--pin-engine]
Uses ABQ_BOOTSTRAP_SERVERS / KAFKA_BOOTSTRAP_SERVERS if set, else starts a local broker.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from common import bootstrap, percentile
from openai_serving import abqueue_stack, pin_everything_else, placement_args, placement_flags, vllm_server

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from conftest import metric_values
from throughput import prompts
from tiny_model import make_tiny_model

from workers.streams import says_something


def streamer(base_url: str, model: str, texts: list[str], args):
    import openai

    sdk = openai.OpenAI(base_url=base_url, api_key="none", max_retries=0, timeout=600)

    def one(i: int) -> tuple[float, int]:
        """(seconds to the first chunk with content, output tokens)."""
        t0, first, tokens = time.perf_counter(), None, 0
        for chunk in sdk.chat.completions.create(
            model=model, messages=[{"role": "user", "content": texts[i]}], max_tokens=args.max_tokens,
            temperature=0, user=f"user-{i}", stream=True, stream_options={"include_usage": True},
            extra_body={"ignore_eos": True},
        ):  # fmt: skip
            if first is None and chunk.choices and chunk.choices[0].delta.content:
                first = time.perf_counter() - t0
            if chunk.usage is not None:
                tokens = chunk.usage.completion_tokens
        assert first is not None and tokens == args.max_tokens, (first, tokens)
        return first, tokens

    return one


def drive(one, n: int, callers: int) -> dict:
    with ThreadPoolExecutor(callers) as pool:
        list(pool.map(one, range(min(callers, n))))  # warm: connections, the first batches
        t0 = time.perf_counter()
        done = list(pool.map(one, range(n)))
        elapsed = time.perf_counter() - t0
    ttfts = [f for f, _ in done]
    return {
        "ttft_p50_ms": 1000 * statistics.median(ttfts),
        "ttft_p95_ms": 1000 * percentile(ttfts, 95),
        "tokens_per_s": sum(t for _, t in done) / elapsed,
    }


def both(one, args) -> dict:
    return {"one": drive(one, args.single, 1), "many": drive(one, args.requests, args.concurrency)}


def vllm_serve(model: str, texts: list[str], args, workdir: Path) -> dict:
    with vllm_server(model, args, workdir) as url:
        return both(streamer(url, "bench", texts, args), args)


def through_abqueue(addr: str, model: str, texts: list[str], args, workdir: Path) -> tuple[dict, float, dict]:
    with abqueue_stack(addr, model, args, workdir, "sb") as stack:
        out = both(streamer(stack.url, stack.exp.name, texts, args), args)
        with urllib.request.urlopen(f"http://127.0.0.1:{stack.metrics}/metrics", timeout=5) as r:
            m = metric_values(r.read().decode())
        return out, m["abq_stream_records_total"] / m["abq_streams_total"], legs(stack, args.single)


LEGS = (
    "the request's hop: gateway's send -> worker's poll",
    "in the worker before the engine",
    "the engine: start -> first token (vLLM's own figure)",
    "first token -> its record sent (vLLM's serving layer, the worker)",
)


def legs(stack, single: int) -> dict[str, float]:
    """Where (b)'s time to first token went at one caller, p50 in ms over the one-at-a-time streams:
    from each answer's timings and the create time of the first record that carried text (set by
    the worker's producer as it sends). What is left of the TTFT is the SDK's call reaching the
    gateway and the chunk's hop back through the broker and the gateway."""
    from kafka_helpers import read_all

    from abqueue.kafka import admin_client
    from schemas import decode_response
    from schemas.stream import decode_part, is_part

    answers = sorted(
        (decode_response(r.value) for r in read_all(stack.settings, stack.exp.response_topic)),
        key=lambda a: a.timings.enqueued,
    )[1 : 1 + single]  # after drive()'s warm-up call: the streams at one caller
    admin = admin_client(stack.settings)
    try:
        replies = [t for t in admin.list_topics() if t.startswith(f"abq.{stack.exp.name}.replies")]
    finally:
        admin.close()
    sent: dict[str, float] = {}
    for topic in replies:
        for r in read_all(stack.settings, topic):
            if not is_part(r.headers):
                continue
            part = decode_part(r.value)
            if any(says_something(c) for c in part.chunks):
                sent.setdefault(part.request_id, r.timestamp / 1000)
    rows = [
        (t.dequeued - t.enqueued, t.started - t.dequeued, t.first_token - t.started, sent[a.request_id] - t.first_token)
        for a in answers
        if (t := a.timings).started and t.first_token and a.request_id in sent
    ]
    return {name: 1000 * statistics.median(leg) for name, leg in zip(LEGS, zip(*rows, strict=True), strict=True)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=96, help="streams at --concurrency callers")
    ap.add_argument("--single", type=int, default=16, help="streams one at a time")
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--model", help="a local model directory (default: a small random Llama, vLLM's CPU build)")
    ap.add_argument("--engine-arg", action="append", default=[], metavar="KEY=VALUE")
    placement_flags(ap)
    args = ap.parse_args()
    pin_everything_else(args)
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    workdir = Path(tempfile.mkdtemp(prefix="abq-bench-stream-"))
    model = args.model or str(make_tiny_model(workdir / "small", size="small"))
    texts = prompts(max(args.requests, args.single))
    addr, broker = bootstrap()
    try:
        print("(a) openai SDK -> vllm serve, streaming", file=sys.stderr)
        a = vllm_serve(model, texts, args, workdir)
        print("(b) openai SDK -> abq gateway -> Kafka -> abq worker, streaming", file=sys.stderr)
        b, records, where = through_abqueue(addr, model, texts, args, workdir)
    finally:
        if broker:
            broker.stop()
    print(f"\nstreamed chats of {args.max_tokens} tokens, the openai SDK, stream=True")
    print(f"{'':<44}{'TTFT p50 ms':>12}{'TTFT p95 ms':>12}{'tokens/s':>10}")
    for callers, key in ((1, "one"), (args.concurrency, "many")):
        for name, r in (("(a) vllm serve", a), ("(b) abq gateway -> Kafka -> abq worker", b)):
            x = r[key]
            label = f"{name}, {callers} caller{'s' if callers > 1 else ''}"
            print(f"{label:<44}{x['ttft_p50_ms']:>12.1f}{x['ttft_p95_ms']:>12.1f}{x['tokens_per_s']:>10.0f}")
    added = b["one"]["ttft_p50_ms"] - a["one"]["ttft_p50_ms"]
    print(f"{'added TTFT p50 at 1 caller, b - a (goal <= 30 ms)':<56}{added:>8.1f} ms")
    ratio = b["many"]["tokens_per_s"] / a["many"]["tokens_per_s"]
    print(f"{f'output tokens/s at {args.concurrency} callers, b/a (goal >= 0.90)':<56}{ratio:>8.2f}")
    print(f"{'Kafka records per streamed answer (worker metrics)':<56}{records:>8.1f}")
    print("\nwhere (b)'s time to first token went at 1 caller, p50 from the records' timestamps:")
    for name, ms in where.items():
        print(f"  {name:<70}{ms:>8.1f} ms")
    rest = b["one"]["ttft_p50_ms"] - sum(where.values())
    print(f"  {'the rest: the call reaching the gateway, the chunk back through Kafka':<70}{rest:>8.1f} ms")
    print(
        f"\nrerun: python bench/streaming.py --requests {args.requests} --single {args.single} "
        f"--concurrency {args.concurrency} --max-tokens {args.max_tokens}"
        + (f" --model {args.model}" if args.model else "")
        + placement_args(args)
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
