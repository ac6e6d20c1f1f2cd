"""The `abq` command line: help everywhere, one-line errors, submit, and the local broker commands."""

import argparse
import os
import subprocess
import time
import urllib.request
from pathlib import Path

import orjson
import pytest
import recipes
from conftest import REPO, abq_cmd, metric_values, write_config

from abqueue.localkafka.broker import free_port, port_open

SUBCOMMANDS = [
    ["demo"],
    ["worker"],
    ["submit"],
    ["batch"],
    ["kafka"],
    ["kafka", "up"],
    ["kafka", "down"],
    ["kafka", "status"],
    ["kafka", "reset"],
    ["schemas"],
    ["schemas", "export"],
    ["schemas", "check"],
]


def abq(*args, env=None, timeout=120):
    return subprocess.run(
        abq_cmd(*args), capture_output=True, text=True, cwd=REPO, timeout=timeout, env={**os.environ, **(env or {})}
    )


@pytest.mark.parametrize("sub", SUBCOMMANDS, ids=" ".join)
def test_every_subcommand_has_help(sub):
    r = abq(*sub, "--help")
    assert r.returncode == 0 and "usage: abq" in r.stdout


@pytest.mark.parametrize(
    "args,env,message",
    [
        (
            ["submit", "--routing-key", "u", "--prompt", "p", "--bootstrap-servers", "127.0.0.1:1"],
            {},
            "no Kafka broker answers at 127.0.0.1:1; start one with `abq kafka up`",
        ),
        (
            ["worker", "--variant", "a", "--config", "/nonexistent.yaml"],
            {},
            "does not exist; pass an existing YAML file",
        ),
        (["worker", "--variant", "zz"], {}, "has no variant 'zz' (variants: a, b)"),
        (["worker", "--variant", "a", "--experiment", "other"], {}, "--experiment other does not match"),
        (["worker", "--variant", "a"], {"ABQ_SECURITY_PROTOCOL": "SASL_SSL"}, "needs ABQ_SASL_MECHANISM"),
        (["worker", "--variant", "a", "--poll-records", "0"], {}, "--poll-records must be >= 1"),
        # Feedback names its experiment: without --config it was recorded on the demo, silently.
        (["feedback", "--request-id", "r1", "--thumbs", "up"], {}, "give --config FILE: the experiment whose answer"),
        (  # an existing directory, so the argument check is what refuses
            [
                "worker",
                "--variant",
                "a",
                "--engine",
                "vllm",
                "--model",
                str(REPO),
                "--engine-arg",
                "max_model_length=64",
            ],
            {},
            "unknown vLLM engine argument 'max_model_length'; did you mean 'max_model_len'?",
        ),
        (  # a directory that holds no model: vLLM's own failure, as one line
            ["worker", "--variant", "a", "--engine", "vllm-batch", "--model", str(REPO / "k8s")],
            {"VLLM_CPU_KVCACHE_SPACE": "1"},
            f"vLLM could not load model {REPO / 'k8s'}:",
        ),
    ],
)
def test_user_errors_are_one_line_naming_problem_and_fix(args, env, message):
    r = abq(*args, env=env)
    assert r.returncode == 2, r.stderr
    lines = [line for line in r.stderr.splitlines() if line.startswith("abq: error:")]
    assert len(lines) == 1 and message in lines[0], r.stderr
    assert "Traceback" not in r.stderr


def test_a_missing_model_directory_is_refused_before_vllm_is_imported(tmp_path):
    """Importing vLLM takes ~20 s: a mistyped --model gets its one-line error without that wait."""
    (tmp_path / "vllm").mkdir()
    (tmp_path / "vllm" / "__init__.py").write_text('raise ImportError("vLLM was imported")\n')
    r = abq(
        "worker", "--variant", "a", "--engine", "vllm", "--model", "/no/such/model", env={"PYTHONPATH": str(tmp_path)}
    )
    assert r.returncode == 2, r.stderr
    (line,) = [line for line in r.stderr.splitlines() if line.startswith("abq: error:")]
    assert "model directory /no/such/model does not exist" in line, r.stderr


def test_secrets_never_reach_the_log(kafka_bootstrap, experiment, tmp_path):
    r = abq(
        "worker",
        "--config",
        str(write_config(experiment, tmp_path)),
        "--variant",
        "a",
        "--security-protocol",
        "SASL_PLAINTEXT",
        "--sasl-mechanism",
        "PLAIN",
        "--sasl-username",
        "svc",
        "--sasl-password",
        "hunter2-secret",
        "--bootstrap-servers",
        "127.0.0.1:1",
    )
    assert r.returncode == 2
    assert "hunter2-secret" not in r.stderr and "svc" in r.stderr


def test_submit_prints_the_response(kafka_bootstrap, experiment, thread_worker, tmp_path):
    with thread_worker(experiment, "a"), thread_worker(experiment, "b"):
        r = abq(
            "submit",
            "--config",
            str(write_config(experiment, tmp_path)),
            "--routing-key",
            "cli-user",
            "--messages",
            '[{"role": "user", "content": "hello there"}]',
            "-n",
            "2",
            env={"ABQ_BOOTSTRAP_SERVERS": kafka_bootstrap},
        )
    assert r.returncode == 0, r.stderr
    resp = orjson.loads(r.stdout)
    assert resp["outputs"] == ["hello there", "hello there"] and resp["variant"] in ("a", "b")
    assert "traceparent: 00-" in r.stderr


def test_worker_serves_metrics_and_probes(settings, experiment, thread_worker):
    from producers import AbqClient
    from schemas import InferenceRequest
    from workers.health import serve

    port = free_port()
    with (
        thread_worker(experiment, "a") as wa,
        thread_worker(experiment, "b"),
        AbqClient(settings, experiment) as client,
    ):
        server = serve(wa, port, host="127.0.0.1")
        try:
            for i in range(20):
                client.submit(
                    InferenceRequest(experiment=experiment.name, routing_key=f"m{i}", prompt="a b c", variant="a"),
                    timeout=30,
                )
            ready = urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz").status
            alive = urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz").status
            ok20 = f'abq_requests_total{{experiment="{experiment.name}",outcome="ok",variant="a"}} 20.0'
            # Metrics are recorded after the commit, a moment after the caller has its response.
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                metrics = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics").read().decode()
                if ok20 in metrics:
                    break
                time.sleep(0.1)
        finally:
            server.shutdown()
    assert ready == 200 and alive == 200
    assert ok20 in metrics
    assert (
        f'abq_tokens_total{{experiment="{experiment.name}",kind="prompt",model="echo-a",variant="a"}} 60.0' in metrics
    )
    values = metric_values(metrics, experiment=experiment.name, variant="a")
    for name in (  # one observation per answered request
        "abq_queue_wait_seconds_count",
        "abq_engine_seconds_count",
        "abq_end_to_end_seconds_count",
        "abq_time_to_first_token_seconds_count",
        "abq_prompt_tokens_count",
    ):
        assert values[name] == 20, name
    assert values["abq_prompt_tokens_sum"] == 60 and values["abq_engine_seconds_sum"] > 0
    assert values["abq_startup_seconds"] > 0  # set when the worker turned ready; registered at 0
    assert values["abq_inflight_requests"] == 0  # every request answered


def test_kafka_up_status_down(tmp_path):
    port = str(free_port())
    data = str(tmp_path / "broker")
    up = abq("kafka", "up", "--port", port, "--data-dir", data)
    try:
        assert up.returncode == 0, up.stderr
        assert up.stdout.strip() == f"127.0.0.1:{port}"
        assert abq("kafka", "status", "--port", port, "--data-dir", data).returncode == 0
        again = abq("kafka", "up", "--port", port, "--data-dir", data)
        assert again.returncode == 0 and "already running" in again.stderr
        # The hint `up` prints is the command that stops it; a `down` that misses it says so (issue 12).
        hint = up.stderr.split("stop with `", 1)[1].split("`", 1)[0]
        assert hint == f"abq kafka down --port {port} --data-dir {data}", up.stderr
        missed = abq("kafka", "down", "--port", port)
        assert missed.returncode == 2 and f"something listens on port {port}" in missed.stderr, missed.stderr
        assert "--data-dir" in missed.stderr and "Traceback" not in missed.stderr
    finally:
        down = (
            abq(*hint.split()[1:]) if "hint" in locals() else abq("kafka", "down", "--port", port, "--data-dir", data)
        )
    assert down.returncode == 0 and "stopped" in down.stdout
    status = abq("kafka", "status", "--port", port, "--data-dir", data)
    assert status.returncode == 3 and "not running" in status.stdout


def test_demo_runs_end_to_end_and_prints_per_variant_results(kafka_bootstrap):
    # On the session's broker (the demo honours KAFKA_BOOTSTRAP_SERVERS); `make demo` starts its own.
    env = {"KAFKA_BOOTSTRAP_SERVERS": kafka_bootstrap}
    r = abq("demo", "--requests", "120", "--users", "80", "--port", "19999", env=env, timeout=180)
    assert r.returncode == 0, r.stderr[-3000:]
    # It says which broker it uses, and that --port did not choose it (a user was left guessing).
    assert (
        f"demo: using Kafka at {kafka_bootstrap} (from KAFKA_BOOTSTRAP_SERVERS); --port 19999 is for the local "
        "broker and is not used"
    ) in r.stderr
    assert "experiment demo: 120/120 responses" in r.stdout
    rows = {line.split()[0]: line.split() for line in r.stdout.splitlines() if line.startswith(("a ", "b "))}
    assert set(rows) == {"a", "b"} and int(rows["a"][2]) + int(rows["b"][2]) == 120
    assert int(rows["a"][2]) > int(rows["b"][2])  # 90/10 over 80 users
    # The README's Quickstart shows this output: its summary and table have the same shape.
    readme = (REPO / "README.md").read_text()
    shown = (
        readme.split("test_demo_runs_end_to_end_and_prints_per_variant_results")[1]
        .split("```text\n")[1]
        .split("```")[0]
    )
    summary = shown[shown.index("experiment demo:") :].splitlines()
    assert recipes.check_shape(summary, r.stdout) is None, (summary, r.stdout)


def test_kafka_up_never_wipes_a_directory_it_did_not_make(tmp_path):
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "thesis.tex").write_text("years of work")
    r = abq("kafka", "up", "--port", str(free_port()), "--data-dir", str(precious))
    assert r.returncode == 2 and "is not empty and was not made by abqueue" in r.stderr
    assert (precious / "thesis.tex").read_text() == "years of work"


def test_every_command_and_action_prints_help(capsys):
    # In this process: a process each took 36 s of the suite, and test_every_subcommand_has_help
    # already runs the real command line.
    from abqueue.cli.main import build_parser

    def walk(parser, path):
        yield path
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, sub in action.choices.items():
                    yield from walk(sub, path + [name])

    paths = list(walk(build_parser(), []))
    assert ["rollout", "abort"] in paths and ["keda", "simulate"] in paths and ["deploy", "render"] in paths
    for path in paths:
        with pytest.raises(SystemExit) as exited:
            build_parser().parse_args([*path, "--help"])
        out = capsys.readouterr()
        assert exited.value.code == 0 and out.out.startswith(f"usage: abq {' '.join(path)}"), (path, out.err[-500:])


def test_the_local_broker_keeps_its_data_across_a_restart_and_reset_wipes_it(tmp_path):
    from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer, TopicPartition
    from kafka.structs import OffsetAndMetadata

    port, data = free_port(), str(tmp_path / "broker")
    where = ("--port", str(port), "--data-dir", data)
    bootstrap = f"127.0.0.1:{port}"
    tp = TopicPartition("kept", 0)

    def state():
        """(records in 'kept', group g's commit) or None if the topic is gone."""
        admin = KafkaAdminClient(bootstrap_servers=bootstrap)
        try:
            if "kept" not in admin.list_topics():
                return None
            offsets = admin.list_group_offsets("g").get("g", {})
        finally:
            admin.close()
        c = KafkaConsumer(bootstrap_servers=bootstrap)
        try:
            return c.end_offsets([tp])[tp], offsets.get(tp).offset if tp in offsets else None
        finally:
            c.close()

    try:
        assert abq("kafka", "up", *where).returncode == 0
        admin = KafkaAdminClient(bootstrap_servers=bootstrap)
        admin.create_topics({"kept": {"num_partitions": 1, "replication_factor": 1}}, wait_for_metadata=True)
        admin.close()
        p = KafkaProducer(bootstrap_servers=bootstrap, acks="all")
        for i in range(10):
            p.send("kept", value=b"%d" % i)
        p.flush()
        p.close()
        c = KafkaConsumer(bootstrap_servers=bootstrap, group_id="g", enable_auto_commit=False)
        c.commit({tp: OffsetAndMetadata(7, "", -1)})
        c.close()
        assert state() == (10, 7)
        assert abq("kafka", "down", *where).returncode == 0
        again = abq("kafka", "up", *where)
        assert again.returncode == 0 and "reusing the data" in again.stderr, again.stderr
        assert state() == (10, 7), "a restart lost the broker's data"
        fresh = abq("kafka", "up", "--fresh", *where)  # wipes even a running broker's data
        assert fresh.returncode == 0, fresh.stderr
        assert state() is None
    finally:
        abq("kafka", "down", *where)
    reset = abq("kafka", "reset", *where)
    assert reset.returncode == 0 and f"deleted {data}" in reset.stdout
    assert not (tmp_path / "broker").exists()


def test_free_ports_lie_below_the_range_outgoing_connections_take_theirs_from():
    """A port the OS picked (bind to 0) comes from the ephemeral range, where every client connection
    takes its own: with the suite in parallel, a cluster's second port, free when checked, was taken
    by another test's connection before its broker bound it ("Address already in use")."""
    low, _ = (int(x) for x in Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
    for _ in range(20):
        assert free_port() < low
        base = free_port(consecutive=3)
        assert base + 2 < low and not any(port_open("127.0.0.1", base + i) for i in range(3))
