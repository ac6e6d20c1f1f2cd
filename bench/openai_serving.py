"""abqueue against what a user would run instead: `vllm serve` on the same model, the official openai
SDK as the client of both, same prompts, same sampling, same number of concurrent callers.

  (a) SDK -> `vllm serve` (vLLM's own OpenAI server);
  (b) SDK -> `abq gateway` -> Kafka -> `abq worker --engine vllm` (vLLM's serving layer in-process)
      -> Kafka -> the gateway;
  (c) the same callers through `AbqClient.call` straight to Kafka (no gateway), to tell the two apart.
Reports output tokens/s and latency percentiles of both and the ratio b/a (the bar: >= 0.9). Every
request asks for exactly --max-tokens tokens (`ignore_eos`), so both paths do the same work.

Then the CPU the serving layer adds to a worker: the worker process's own CPU seconds (vLLM's engine
core runs in a child process and is not counted) per request, for the same chats sent (c) as OpenAI
bodies (vLLM's serving layer) and (d) in the request format without a body (abqueue's hand-rolled
prompt path), published at once through one AbqClient.

CPU (default): the "small" random Llama of tests/tiny_model.py (~30M parameters, so the engine, not
the queue, dominates as a real model does on a GPU). GPU: --model /path/to/model [--engine-arg k=v].

Run:  python bench/openai_serving.py [--requests 256] [--concurrency 32] [--max-tokens 64] [--nice-engine] [--pin-engine]
Uses ABQ_BOOTSTRAP_SERVERS / KAFKA_BOOTSTRAP_SERVERS if set, else starts a local broker.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import yaml
from common import bootstrap, cpu_seconds, free_port, leave_no_trace, percentile, start_worker, wait_ready

from abqueue.kafka import KafkaSettings, ensure_topics
from producers import AbqClient
from schemas import ExperimentConfig, InferenceRequest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from throughput import _engine_running, prompts
from tiny_model import make_tiny_model


def engine_flags(args) -> dict:
    flags = {"max_model_len": 512, "max_num_seqs": args.concurrency, "dtype": "float32", "enforce_eager": True}
    if args.model is None:
        flags["load_format"] = "dummy"
    for kv in args.engine_arg:
        k, _, v = kv.partition("=")
        flags[k] = yaml.safe_load(v)
    return flags


def placement_flags(ap: argparse.ArgumentParser) -> None:
    ap.add_argument(
        "--nice-engine",
        action="store_true",
        help="run vLLM's engine processes at nice 19 in both paths (a machine with few cores: see place_engine)",
    )
    ap.add_argument(
        "--pin-engine",
        action="store_true",
        help="run vLLM's engine processes on the last CPU and everything else on the others, in both paths "
        "(see place_engine)",
    )


def placement_args(args) -> str:
    return (" --nice-engine" if args.nice_engine else "") + (" --pin-engine" if args.pin_engine else "")


def pin_everything_else(args) -> None:
    """--pin-engine, before anything starts: this process (and so the broker, the gateway, the worker
    and `vllm serve`, its children) keeps all CPUs but the last, which vLLM's compute thread is bound
    to (VLLM_CPU_OMP_THREADS_BIND) and place_engine moves the rest of the engine to."""
    if not args.pin_engine:
        return
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        sys.exit("--pin-engine needs two CPUs or more: one for the engine, the rest for everything else")
    args.engine_cpu = cpus[-1]
    os.sched_setaffinity(0, cpus[:-1])
    os.environ["VLLM_CPU_OMP_THREADS_BIND"] = str(cpus[-1])


def place_engine(args) -> None:
    """vLLM's CPU build keeps its engine-core and model-runner processes spinning (each near a whole
    core, waiting on each other through shared memory); on a machine with few cores whatever else runs
    (the broker, the gateway, the callers) waits for CPU behind them, as it would not where the engine
    runs on a GPU and the broker on machines of its own. In both paths alike, --nice-engine lowers the
    engine processes' priority, so the rest runs when it has work; --pin-engine gives the engine a CPU
    of its own and the rest the others, so neither takes the other's CPU."""
    if not (args.nice_engine or args.pin_engine):
        return
    for pid in os.listdir("/proc"):
        try:
            if pid.isdigit() and Path(f"/proc/{pid}/comm").read_text().startswith("VLLM::"):
                for task in os.listdir(f"/proc/{pid}/task"):
                    if args.nice_engine:
                        os.setpriority(os.PRIO_PROCESS, int(task), 19)
                    if args.pin_engine:
                        os.sched_setaffinity(int(task), {args.engine_cpu})
        except OSError:
            continue


def wait_http(url: str, proc: subprocess.Popen, timeout: float, log: Path) -> None:
    import urllib.request

    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            raise SystemExit(f"{url} exited while starting; its log: {log}\n{log.read_text()[-2000:]}")
        if time.monotonic() > deadline:
            raise SystemExit(f"{url} did not answer within {timeout:.0f}s; its log: {log}")
        try:
            if urllib.request.urlopen(url, timeout=2).status == 200:
                return
        except OSError:
            pass
        time.sleep(1)


def chat_body(text: str, args) -> dict:
    return {"messages": [{"role": "user", "content": text}], "max_tokens": args.max_tokens, "temperature": 0,
            "ignore_eos": True}  # fmt: skip


def sdk_call(base_url: str, model: str, texts: list[str], args):
    import openai

    sdk = openai.OpenAI(base_url=base_url, api_key="none", max_retries=0, timeout=600)

    def one(i: int) -> tuple[float, int]:
        t0 = time.perf_counter()
        body = chat_body(texts[i], args)
        r = sdk.chat.completions.create(
            model=model, messages=body.pop("messages"), max_tokens=body.pop("max_tokens"), temperature=0,
            user=f"user-{i}", extra_body={"ignore_eos": True},
        )  # fmt: skip
        return time.perf_counter() - t0, r.usage.completion_tokens

    return one


def drive(one, texts: list[str], args, metrics_port: int | None = None) -> dict:
    """Every prompt through `one`, --concurrency at a time: tokens/s, latencies, and (with the
    worker's metrics port) how many requests its engine ran on average."""
    running: list[float] = []
    sampling = threading.Event()

    def sample():
        while not sampling.wait(0.25):
            if (value := _engine_running(metrics_port)) is not None:
                running.append(value)

    with ThreadPoolExecutor(args.concurrency) as pool:
        list(pool.map(one, range(min(args.concurrency, len(texts)))))  # warm: connections, the first batches
        if metrics_port is not None:
            threading.Thread(target=sample, daemon=True).start()
        t0 = time.perf_counter()
        done = list(pool.map(one, range(len(texts))))
        elapsed = time.perf_counter() - t0
        sampling.set()
    latencies = [d for d, _ in done]
    tokens = sum(t for _, t in done)
    return {
        "tokens_per_s": tokens / elapsed,
        "requests_per_s": len(done) / elapsed,
        "tokens": tokens,
        "p50_s": statistics.median(latencies),
        "p95_s": percentile(latencies, 95),
        **({"engine_running_mean": statistics.mean(running)} if running else {}),
    }


@contextlib.contextmanager
def vllm_server(model: str, args, workdir: Path) -> Iterator[str]:
    """`vllm serve` on the model with the engine flags; yields its base URL."""
    port = free_port()
    # `vllm serve` is this server behind vLLM's CLI, which asks for the `vllm` distribution's version:
    # the CPU build is installed as `vllm-cpu`, so the server is started as its own module.
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model, "--port", str(port),
           "--served-model-name", "bench"]  # fmt: skip
    for k, v in engine_flags(args).items():
        flag = "--" + k.replace("_", "-")
        cmd += [flag] if v is True else [] if v is False else [flag, str(v)]
    log = workdir / "vllm-serve.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_http(f"http://127.0.0.1:{port}/health", proc, 900, log)
        place_engine(args)
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        proc.terminate()
        proc.wait(timeout=120)


def vllm_serve(model: str, texts: list[str], args, workdir: Path) -> dict:
    with vllm_server(model, args, workdir) as url:
        return drive(sdk_call(url, "bench", texts, args), texts, args)


@dataclass
class Stack:
    exp: ExperimentConfig
    settings: KafkaSettings
    url: str  # the gateway's base URL
    metrics: int  # the worker's metrics port
    worker: subprocess.Popen


@contextlib.contextmanager
def abqueue_stack(addr: str, model: str, args, workdir: Path, prefix: str) -> Iterator[Stack]:
    """A vLLM variant of a new experiment, its `abq worker` and an `abq gateway` on the broker at addr."""
    settings = KafkaSettings(bootstrap_servers=addr)
    flags = engine_flags(args)
    typed = {k: flags.pop(k) for k in ("max_model_len", "max_num_seqs", "dtype")}
    exp = ExperimentConfig(
        name=f"{prefix}{uuid.uuid4().hex[:8]}",
        partitions=4,
        variants=[{"name": "v", "weight": 100, "engine": "vllm", "model": model, "vllm": typed, "engine_args": flags}],
    )
    ensure_topics(settings, exp)
    leave_no_trace(f"abq.{exp.name}.")
    cfg = workdir / f"{exp.name}.yaml"
    cfg.write_text(yaml.safe_dump(exp.model_dump(mode="json")))
    metrics, port = free_port(), free_port()
    worker = start_worker(exp, addr, "v", "--metrics-port", str(metrics))
    env = {**os.environ, "ABQ_BOOTSTRAP_SERVERS": addr, "ABQ_LOG_LEVEL": "WARNING"}
    gateway = subprocess.Popen(
        [sys.executable, "-m", "abqueue.cli.main", "gateway", "--config", str(cfg), "--port", str(port),
         "--request-timeout", "600"], env=env,
    )  # fmt: skip
    try:
        wait_ready(worker, metrics, 900)
        place_engine(args)
        wait_http(f"http://127.0.0.1:{port}/readyz", gateway, 120, Path("(the gateway's output above)"))
        yield Stack(exp, settings, f"http://127.0.0.1:{port}/v1", metrics, worker)
    finally:
        gateway.terminate()
        worker.terminate()
        gateway.wait(60)
        worker.wait(120)


def through_abqueue(addr: str, model: str, texts: list[str], args, workdir: Path) -> tuple[dict, dict, dict]:
    with abqueue_stack(addr, model, args, workdir, "oas") as stack:
        through = drive(sdk_call(stack.url, stack.exp.name, texts, args), texts, args, stack.metrics)
        with AbqClient(stack.settings, stack.exp) as client:

            def one(i: int) -> tuple[float, int]:
                t0 = time.perf_counter()
                reply = client.call(
                    "/v1/chat/completions", chat_body(texts[i], args), routing_key=f"user-{i}", timeout=600
                )
                return time.perf_counter() - t0, reply.response.usage.completion_tokens

            direct = drive(one, texts, args, stack.metrics)
        cpu = worker_cpu(stack.settings, stack.exp, stack.worker.pid, texts, args)
        return through, direct, cpu


def worker_cpu(settings, exp: ExperimentConfig, pid: int, texts: list[str], args) -> dict:
    """The worker process's CPU seconds per request, the same chats as bodies and without one."""

    def body(i: int) -> InferenceRequest:
        return InferenceRequest(
            experiment=exp.name, routing_key=f"u{i}", endpoint="/v1/chat/completions",
            body={"messages": [{"role": "user", "content": texts[i]}], "max_tokens": args.max_tokens,
                  "temperature": 0, "ignore_eos": True},
        )  # fmt: skip

    def plain(i: int) -> InferenceRequest:
        return InferenceRequest(
            experiment=exp.name, routing_key=f"u{i}", messages=[{"role": "user", "content": texts[i]}],
            max_tokens=args.max_tokens, temperature=0,
        )  # fmt: skip

    out = {}
    with AbqClient(settings, exp) as client:
        for name, make in (("body", body), ("plain", plain), ("body_again", body), ("plain_again", plain)):
            before = cpu_seconds(pid)
            sent = {client.publish(make(i))[0].id for i in range(len(texts))}
            client.publisher.flush()
            got = client.wait(sent, timeout=1800)
            assert len(got) == len(sent) and all(r.response.ok for r in got.values()), name
            tokens = sum(r.response.usage.completion_tokens for r in got.values())
            out[name] = {"cpu_ms_per_request": 1000 * (cpu_seconds(pid) - before) / len(sent), "tokens": tokens}
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=256)
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--model", help="a local model directory (default: a small random Llama, vLLM's CPU build)")
    ap.add_argument("--engine-arg", action="append", default=[], metavar="KEY=VALUE")
    placement_flags(ap)
    args = ap.parse_args()
    pin_everything_else(args)
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    workdir = Path(tempfile.mkdtemp(prefix="abq-bench-oas-"))
    model = args.model or str(make_tiny_model(workdir / "small", size="small"))
    texts = prompts(args.requests)
    addr, broker = bootstrap()
    try:
        print("(a) openai SDK -> vllm serve", file=sys.stderr)
        a = vllm_serve(model, texts, args, workdir)
        print("(b) openai SDK -> abq gateway -> Kafka -> abq worker", file=sys.stderr)
        b, c, cpu = through_abqueue(addr, model, texts, args, workdir)
    finally:
        if broker:
            broker.stop()
    print(f"\n{args.requests} chats of {args.max_tokens} tokens, {args.concurrency} concurrent callers, the openai SDK")
    print(f"{'':<46}{'tokens/s':>10}{'req/s':>8}{'p50 s':>8}{'p95 s':>8}{'running':>9}")
    rows = (
        ("(a) vllm serve", a),
        ("(b) abq gateway -> Kafka -> abq worker", b),
        ("(c) AbqClient -> Kafka -> abq worker", c),
    )
    for name, r in rows:
        running = f"{r['engine_running_mean']:>9.1f}" if "engine_running_mean" in r else f"{'':>9}"
        print(
            f"{name:<46}{r['tokens_per_s']:>10.0f}{r['requests_per_s']:>8.1f}{r['p50_s']:>8.2f}{r['p95_s']:>8.2f}{running}"
        )
    print(f"{'output tokens/s, b/a (bar: >= 0.90)':<46}{b['tokens_per_s'] / a['tokens_per_s']:>10.2f}")
    print(f"{'output tokens/s, c/a (no gateway)':<46}{c['tokens_per_s'] / a['tokens_per_s']:>10.2f}")
    body = (cpu["body"]["cpu_ms_per_request"] + cpu["body_again"]["cpu_ms_per_request"]) / 2
    plain = (cpu["plain"]["cpu_ms_per_request"] + cpu["plain_again"]["cpu_ms_per_request"]) / 2
    print("\nthe worker process's CPU per request (the engine core's process not counted), two rounds each:")
    for name, r in cpu.items():
        print(f"  {name:<14}{r['cpu_ms_per_request']:>8.2f} ms   ({r['tokens']} output tokens)")
    print(f"  vLLM's serving layer adds {body - plain:+.2f} ms a request ({body / plain:.2f}x the path without a body)")
    print(
        f"\nrerun: python bench/openai_serving.py --requests {args.requests} --concurrency {args.concurrency} "
        f"--max-tokens {args.max_tokens}" + (f" --model {args.model}" if args.model else "") + placement_args(args)
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
