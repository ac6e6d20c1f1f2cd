"""What a GPU worker fed from Kafka delivers, against vLLM called directly: same prompts, same engine.

  (a) vLLM directly: AsyncLLM in this process, every prompt submitted at once (it batches continuously);
  (b) producer -> Kafka -> `abq worker --engine vllm` (its own process) -> Kafka -> consumer, every
      prompt published at once.
Reports requests/s, output tokens/s and latency percentiles of both, the ratio b/a, and, with
--sequential N, the latency each path adds at low load (one request at a time).

Greedy decoding on the same weights gives both paths the same output tokens, so the token counts
double as a check that they did the same work.

CPU (default): the tiny random Llama the tests use (vLLM's CPU build; minutes, mostly engine start).
GPU: --model /path/to/model [--engine-arg gpu_memory_utilization=0.9 ...].
--engine sim: the GPU-shaped simulated engine (workers/engines/sim.py: Llama-3.1-8B on one H100, 256
slots) instead of vLLM, so that a machine without a GPU can answer whether the queue keeps a GPU's
engine full; (b) then runs the worker at its default settings. Defaults 2,000 requests of 256 tokens.

--compare-batching: continuous (`vllm`) against static (`vllm-batch`) batching through Kafka, on
outputs of varied length (the small random model on CPU).

Run:  python bench/throughput.py [--requests 64] [--max-tokens 32] [--sequential 10] [--json out.json]
      python bench/throughput.py --engine sim
      python bench/throughput.py --compare-batching [--requests 256] [--max-tokens 48 (the mean)]
Uses ABQ_BOOTSTRAP_SERVERS / KAFKA_BOOTSTRAP_SERVERS if set, else starts a local broker.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import os
import random
import statistics
import sys
import tempfile
import threading
import time
import urllib.request
import uuid
from pathlib import Path

import orjson
import yaml
from common import bootstrap, free_port, leave_no_trace, percentile, start_worker, wait_ready

from abqueue.kafka import KafkaSettings, ensure_topics
from producers import AbqClient
from schemas import ExperimentConfig, InferenceRequest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from tiny_model import ENGINE_ARGS, make_tiny_model

WORDS = [
    "queue",
    "worker",
    "batch",
    "token",
    "engine",
    "kafka",
    "model",
    "variant",
    "prompt",
    "latency",
    "cache",
    "partition",
    "offset",
]


def prompts(n: int, seed: int = 7) -> list[str]:
    rnd = random.Random(seed)
    return [" ".join(rnd.choice(WORDS) for _ in range(rnd.randint(3, 12))) for _ in range(n)]


def summarise(latencies: list[float], out_tokens: int, elapsed: float) -> dict:
    return {
        "requests_per_s": len(latencies) / elapsed,
        "output_tokens_per_s": out_tokens / elapsed,
        "output_tokens": out_tokens,
        "latency_ms_p50": 1000 * statistics.median(latencies),
        "latency_ms_p95": 1000 * percentile(latencies, 95),
        "elapsed_s": elapsed,
    }


def direct_sim(texts: list[str], max_tokens: int, sequential: int) -> tuple[dict, list[float]]:
    """(a) for --engine sim: the simulated engine in this process, every request at once."""
    import threading

    from workers.engines.sim import SimEngine

    engine = SimEngine()
    try:

        def run(batch: list[str]) -> tuple[list[float], int, float]:
            finished: dict[int, float] = {}
            tokens, all_done, lock = [0], threading.Event(), threading.Lock()
            start = time.perf_counter()

            def done_for(i):
                def done(c):
                    with lock:
                        finished[i] = time.perf_counter()
                        tokens[0] += c.completion_tokens
                        if len(finished) == len(batch):
                            all_done.set()

                return done

            for i, text in enumerate(batch):
                engine.submit(
                    InferenceRequest(experiment="sim", routing_key=f"u{i}", prompt=text, max_tokens=max_tokens),
                    done_for(i),
                )
            all_done.wait()
            return [finished[i] - start for i in range(len(batch))], tokens[0], time.perf_counter() - start

        busy0 = engine.busy_s
        latencies, tokens, elapsed = run(texts)
        figures = {**summarise(latencies, tokens, elapsed), "engine_busy_share": (engine.busy_s - busy0) / elapsed}
        seq = [run([text])[2] for text in texts[:sequential]]
        return figures, seq
    finally:
        engine.close()


def direct(
    model: str, engine_args: dict, texts: list[str], max_tokens: int, sequential: int, place=lambda: None
) -> tuple[dict, list[float]]:
    """place(): called once the engine's processes run (--pin-engine moves them to their CPU)."""
    from vllm import SamplingParams
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.sampling_params import RequestOutputKind
    from vllm.v1.engine.async_llm import AsyncLLM

    params = SamplingParams(max_tokens=max_tokens, temperature=0, output_kind=RequestOutputKind.FINAL_ONLY)

    async def run():
        llm = AsyncLLM.from_engine_args(AsyncEngineArgs(model=model, **engine_args))
        place()

        async def one(text):
            start, final = time.perf_counter(), None
            async for out in llm.generate(text, params, request_id=uuid.uuid4().hex):
                final = out
            return time.perf_counter() - start, sum(len(o.token_ids) for o in final.outputs)

        try:
            await one("warm up")
            t0 = time.perf_counter()
            results = await asyncio.gather(*(one(t) for t in texts))
            elapsed = time.perf_counter() - t0
            seq = [(await one(t))[0] for t in texts[:sequential]]
        finally:
            llm.shutdown()
        return summarise([r[0] for r in results], sum(r[1] for r in results), elapsed), seq

    return asyncio.run(run())


def _engine_running(port: int) -> float | None:
    """The worker's abq_engine_running_requests gauge, from its /metrics."""
    try:
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2).read().decode()
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith("abq_engine_running_requests{"):
            return float(line.rsplit(" ", 1)[1])
    return None


def through_kafka(
    addr: str,
    model: str,
    engine_args: dict,
    texts: list[str],
    max_tokens: int | list[int],
    sequential: int,
    max_inflight: int | None,
    engine: str = "vllm",
    place=lambda: None,
) -> tuple[dict, list[float]]:
    """max_tokens: one for all, or one per text. place(): called once the worker's engine runs."""
    lengths = max_tokens if isinstance(max_tokens, list) else [max_tokens] * len(texts)
    settings = KafkaSettings(bootstrap_servers=addr)
    exp = ExperimentConfig(
        name=f"tput{uuid.uuid4().hex[:8]}",
        partitions=4,
        variants=[
            {
                "name": "v",
                "weight": 100,
                "engine": engine,
                "model": model,
                "engine_args": engine_args,
                "max_tokens_limit": max(4096, *lengths),
            }
        ],
    )
    ensure_topics(settings, exp)
    leave_no_trace(f"abq.{exp.name}.")
    port = free_port()
    flags = ["--max-inflight", str(max_inflight)] if max_inflight else []  # else: the worker's defaults
    worker = start_worker(exp, addr, "v", *flags, "--metrics-port", str(port))
    try:
        wait_ready(worker, port, 1200)
        place()
        with AbqClient(settings, exp) as client:

            def req(i, text):
                return InferenceRequest(
                    experiment=exp.name,
                    routing_key=f"u{i}",
                    prompt=text,
                    max_tokens=lengths[i % len(lengths)],
                    temperature=0,
                )

            client.submit(req(-1, "warm up"), timeout=600)
            sent, done = {}, {}
            running: list[float] = []
            sampling = threading.Event()

            def sample():  # how full the engine is kept, from the worker's own gauge
                while not sampling.wait(0.5):
                    if (value := _engine_running(port)) is not None:
                        running.append(value)

            sampler = threading.Thread(target=sample, daemon=True)
            sampler.start()
            t0 = time.perf_counter()
            for i, text in enumerate(texts):
                r, _ = client.publish(req(i, text))
                sent[r.id] = time.perf_counter()
            client.publisher.flush()
            client.wait(
                set(sent),
                timeout=3600,
                on_reply=lambda r: done.__setitem__(r.response.request_id, (time.perf_counter(), r.response)),
            )
            elapsed = time.perf_counter() - t0
            sampling.set()
            assert len(done) == len(sent), f"only {len(done)} of {len(sent)} responses"
            failed = [resp.error for _, resp in done.values() if not resp.ok]
            assert not failed, f"{len(failed)} requests failed: {failed[0]}"
            latencies = [done[i][0] - sent[i] for i in sent]
            tokens = sum(resp.usage.completion_tokens for _, resp in done.values())
            # Where the time went, per request (wall clocks of one machine, or of NTP-synced ones).
            legs = {"to_worker": [], "waiting_in_worker": [], "engine": [], "back_to_caller": []}
            for i in sent:
                got_at, resp = done[i]
                t, received = resp.timings, time.time() - (time.perf_counter() - got_at)
                legs["to_worker"].append(t.dequeued - t.enqueued)
                legs["waiting_in_worker"].append((t.started or t.dequeued) - t.dequeued)
                legs["engine"].append(t.finished - (t.started or t.dequeued))
                legs["back_to_caller"].append(received - t.finished)
            seq = []
            for i, text in enumerate(texts[:sequential]):
                start = time.perf_counter()
                client.submit(req(10_000 + i, text), timeout=600)
                seq.append(time.perf_counter() - start)
        return {
            **summarise(latencies, tokens, elapsed),
            **({"engine_running_mean": statistics.mean(running)} if running else {}),
            **{f"leg_{k}_ms_p50": 1000 * statistics.median(v) for k, v in legs.items()},
            **{f"leg_{k}_ms_p95": 1000 * percentile(v, 95) for k, v in legs.items()},
        }, seq
    finally:
        worker.terminate()
        worker.wait(timeout=60)


def varied_lengths(n: int, mean: int, longest: int, seed: int = 11) -> list[int]:
    """Output lengths as chat traffic has them: mostly short, a long tail (exponential, 4..longest)."""
    rnd = random.Random(seed)
    return [max(4, min(longest, round(rnd.expovariate(1 / mean)))) for _ in range(n)]


def compare_batching(args, place) -> int:
    """Continuous batching (AsyncLLM: a finished request's slot is refilled at the next step) against
    static batching (LLM.generate: a batch holds its slots until its longest request ends), each
    through Kafka and a worker at its defaults, on the same prompts and output lengths."""
    if args.engine != "vllm" or args.model:
        raise SystemExit("--compare-batching runs the small random model on vLLM's CPU build; drop --engine/--model")
    n = args.requests or 256
    mean = args.max_tokens or 48
    lengths = varied_lengths(n, mean, longest=176)  # prompt + output stay within max_model_len 256
    model = str(make_tiny_model(Path(tempfile.mkdtemp(prefix="abq-small-")), "small"))
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "0")
    texts = prompts(n)
    addr, broker = bootstrap()
    results = {}
    try:
        for engine in ("vllm", "vllm-batch"):
            print(f"{engine}: {n} prompts, output lengths mean {statistics.mean(lengths):.0f}, "
                  f"longest {max(lengths)}", file=sys.stderr)  # fmt: skip
            results[engine], _ = through_kafka(addr, model, ENGINE_ARGS, texts, lengths, 0, None, engine, place)
    finally:
        if broker:
            broker.stop()
    cont, static = results["vllm"], results["vllm-batch"]
    print(f"\n{'measure':<28}{'continuous':>14}{'static':>14}{'c/s':>8}")
    for k in ("output_tokens_per_s", "requests_per_s", "latency_ms_p50", "latency_ms_p95", "output_tokens"):
        print(f"{k:<28}{cont[k]:>14.2f}{static[k]:>14.2f}{cont[k] / static[k]:>8.3f}")
    ratio = cont["output_tokens_per_s"] / static["output_tokens_per_s"]
    print(f"continuous / static output tokens/s: {ratio:.3f}")
    print(
        f"\nrerun: python bench/throughput.py --compare-batching --requests {n} --max-tokens {mean}"
        + (" --pin-engine" if args.pin_engine else "")
    )
    if args.json:
        figures = {"continuous": cont, "static": static, "ratio_output_tokens_per_s": ratio, "lengths_mean": mean}
        args.json.write_text(orjson.dumps(figures, option=orjson.OPT_INDENT_2).decode())
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="local model directory (default: a random Llama made here, for CPU)")
    ap.add_argument(
        "--size", choices=["tiny", "small"], default="tiny", help="shape of the random Llama when no --model"
    )
    ap.add_argument(
        "--engine-arg", action="append", default=[], metavar="KEY=VALUE", help="vLLM engine argument, repeatable"
    )
    ap.add_argument(
        "--engine", choices=["vllm", "sim"], default="vllm", help="vllm, or the simulated H100 engine (no compute)"
    )
    ap.add_argument("--requests", type=int, default=None, help="default 64 (vllm), 2000 (sim)")
    ap.add_argument("--max-tokens", type=int, default=None, help="default 32 (vllm), 256 (sim)")
    ap.add_argument("--sequential", type=int, default=10, help="one-at-a-time requests for added latency (0: skip)")
    ap.add_argument(
        "--max-inflight",
        type=int,
        default=None,
        help="the worker's --max-inflight (default: 256 with vllm, the worker's own with sim)",
    )
    ap.add_argument(
        "--compare-batching",
        action="store_true",
        help="instead: continuous (vllm) against static (vllm-batch) batching, both through Kafka at the worker's "
        "defaults, on outputs of varied length (default 256 requests)",
    )
    ap.add_argument("--json", type=Path, default=None, help="also write the figures here")
    ap.add_argument(
        "--pin-engine",
        action="store_true",
        help="vLLM's engine processes on the last CPU and everything else on the others, in both paths "
        "(openai_serving.place_engine); without it the engine's compute thread is bound to CPU 0",
    )
    args = ap.parse_args()
    from openai_serving import pin_everything_else, place_engine  # it imports this module

    args.nice_engine = False
    pin_everything_else(args)
    place = functools.partial(place_engine, args)
    if args.compare_batching:
        return compare_batching(args, place)
    sim = args.engine == "sim"
    args.requests = args.requests or (2000 if sim else 64)
    args.max_tokens = args.max_tokens or (256 if sim else 32)
    if not sim and args.max_inflight is None:
        args.max_inflight = 256

    engine_args = {k: yaml.safe_load(v) for k, _, v in (a.partition("=") for a in args.engine_arg)}
    model = args.model
    if sim:
        model = model or "sim-llama-3.1-8b-h100"
    elif model is None:
        model = str(make_tiny_model(Path(tempfile.mkdtemp(prefix="abq-tiny-")), args.size))
        engine_args = {**ENGINE_ARGS, **engine_args}
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
        # The engine's compute thread on core 0 only, in both paths: Kafka and the worker's Python keep
        # the other core(s), as they keep the host CPUs beside a GPU. Unbound, torch takes every core
        # and the comparison measures CPU starvation of the broker instead of the queue. (Its engine-core
        # process still runs anywhere; --pin-engine moves it too.)
        os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "0")
    texts = prompts(args.requests)
    what = "the simulated engine" if sim else "vLLM"
    print(f"(a) {what} directly: {args.requests} prompts, max_tokens {args.max_tokens}", file=sys.stderr)
    if sim:
        a, a_seq = direct_sim(texts, args.max_tokens, args.sequential)
    else:
        a, a_seq = direct(model, engine_args, texts, args.max_tokens, args.sequential, place)
    addr, broker = bootstrap()
    try:
        print("(b) through Kafka and an abq worker", file=sys.stderr)
        b, b_seq = through_kafka(
            addr, model, engine_args, texts, args.max_tokens, args.sequential, args.max_inflight, args.engine, place
        )
    finally:
        if broker:
            broker.stop()

    figures = {
        "direct": a,
        "through_kafka": b,
        "ratio_output_tokens_per_s": b["output_tokens_per_s"] / a["output_tokens_per_s"],
        "ratio_requests_per_s": b["requests_per_s"] / a["requests_per_s"],
    }
    if args.sequential:
        figures["low_load_ms_p50_direct"] = 1000 * statistics.median(a_seq)
        figures["low_load_ms_p50_through_kafka"] = 1000 * statistics.median(b_seq)
        figures["added_latency_ms_p50"] = figures["low_load_ms_p50_through_kafka"] - figures["low_load_ms_p50_direct"]
    print(f"\n{'measure':<24}{'(a) direct':>14}{'(b) kafka':>14}{'b/a':>8}")
    for k in (k for k in a if k in b):
        print(f"{k:<24}{a[k]:>14.2f}{b[k]:>14.2f}{b[k] / a[k] if a[k] else float('nan'):>8.3f}")
    for k in (k for k in [*a, *b] if (k in a) != (k in b) and not k.startswith("leg_")):
        print(f"{k:<34}{a.get(k, b.get(k)):>14.2f}  ({'a' if k in a else 'b'})")
    for k in (k for k in b if k.startswith("leg_")):
        print(f"{k:<34}{b[k]:>14.2f}")
    if args.sequential:
        print(
            f"{'low load p50 ms':<24}{figures['low_load_ms_p50_direct']:>14.2f}{figures['low_load_ms_p50_through_kafka']:>14.2f}"
        )
        print(f"added latency at low load (p50): {figures['added_latency_ms_p50']:.2f} ms")
    if a["output_tokens"] != b["output_tokens"]:
        print(
            f"note: output tokens differ ({a['output_tokens']} vs {b['output_tokens']}); check the engine settings match"
        )
    rerun = f"python bench/throughput.py --requests {args.requests} --max-tokens {args.max_tokens} --sequential {args.sequential}"
    if sim:
        rerun += " --engine sim" + (f" --max-inflight {args.max_inflight}" if args.max_inflight else "")
    else:
        rerun += (
            f" --model {args.model}"
            if args.model
            else f" --size {args.size}" + "".join(f" --engine-arg {e}" for e in args.engine_arg)
        ) + (" --pin-engine" if args.pin_engine else "")
    print(f"\nrerun: {rerun}")
    if args.json:
        args.json.write_text(orjson.dumps(figures, option=orjson.OPT_INDENT_2).decode())
    return 0


if __name__ == "__main__":
    sys.exit(main())
