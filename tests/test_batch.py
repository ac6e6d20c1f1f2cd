"""`abq batch`: OpenAI Batch and own lines, results as they arrive, errors apart, resume without loss."""

import itertools
import os
import signal
import subprocess
import time
from collections import Counter

import orjson
import pytest
from conftest import REPO, abq_cmd, new_experiment, write_config
from kafka_helpers import committed, end_offsets, wait_until

from abqueue.kafka import ensure_topics
from producers.batch import BatchInputError, BatchJob, scan_input
from producers.client import AbqClient


def _openai_lines(n, model, start=0):
    for i in range(start, start + n):
        if i % 2:
            yield {
                "custom_id": f"req-{i}",
                "method": "POST",
                "url": "/v1/chat/completions",
                "body": {"model": model, "messages": [{"role": "user", "content": f"chat {i}"}], "max_tokens": 8},
            }
        else:
            yield {
                "custom_id": f"req-{i}",
                "method": "POST",
                "url": "/v1/completions",
                "body": {"model": model, "prompt": f"complete {i}", "max_tokens": 8, "user": f"user-{i % 7}"},
            }


def _write(path, lines):
    path.write_bytes(b"".join(orjson.dumps(line) + b"\n" for line in lines))


def _run_batch(kafka_bootstrap, cfg, inp, out, *extra, wait=True):
    env = {**os.environ, "ABQ_BOOTSTRAP_SERVERS": kafka_bootstrap}
    proc = subprocess.Popen(
        abq_cmd("batch", "--config", str(cfg), str(inp), "--out", str(out), *extra),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
        cwd=REPO,
    )
    if wait:
        stdout, stderr = proc.communicate(timeout=180)
        return proc.returncode, stdout.decode(), stderr.decode()
    return proc


def _lines(path):
    return [orjson.loads(line) for line in path.read_bytes().splitlines()] if path.exists() else []


def _answered_all(settings, exp) -> int:
    """Waits until the worker has committed every request in the batch topic; returns how many there are."""
    topic = exp.request_topic("a", "batch")
    group = exp.consumer_group("a")

    def published():
        return {p: o for p, o in end_offsets(settings, topic).items() if o > 0}

    wait_until(lambda: committed(settings, group, topic) == published(), 30, "the backlog answered")
    return sum(published().values())


def test_interrupted_batch_resumes_and_the_output_has_each_id_exactly_once(
    settings, kafka_bootstrap, thread_worker, tmp_path
):
    # 60 lines in batches of 4, 400 ms each: six seconds of answers, so that a busy machine (the
    # suite runs in parallel) still kills the job midway.
    exp = new_experiment(variants=(("a", 100),), latency_ms=400)
    ensure_topics(settings, exp)
    cfg = write_config(exp, tmp_path)
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    bad = {"custom_id": "bad-url", "method": "POST", "url": "/v1/audio/speech", "body": {"input": "x"}}
    _write(inp, [*_openai_lines(60, exp.name), bad])
    # Four records a poll, and a pass waits for the engine between polls: the answers come spread out,
    # so the kill below lands midway.
    with thread_worker(exp, "a", max_batch=4, poll_records=4, max_wait_ms=10):
        proc = _run_batch(kafka_bootstrap, cfg, inp, out, "--no-progress", wait=False)
        deadline = time.monotonic() + 60
        while len(_lines(out)) < 8 and time.monotonic() < deadline:
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)  # the hardest interruption: no chance to clean up
        proc.wait()
        first = len(_lines(out))
        assert 8 <= first < 60
        # The worker answers what the killed run had published while no batch command runs.
        published = _answered_all(settings, exp)
        code, stdout, stderr = _run_batch(kafka_bootstrap, cfg, inp, out)
    assert code == 0, stderr
    assert "61 lines" in stdout and "0 missing" in stdout
    # The rerun collects those answers from where its saved state says to read; it resubmits only
    # what the killed run never published (a resume ignoring its state would resubmit 60 - first).
    # Already done: the results written, and the invalid line the killed run filed first.
    assert f"{first + 1} already done" in stdout and f"{60 - published} submitted" in stdout, stdout
    lines = _lines(out)
    counts = Counter(line["custom_id"] for line in lines)
    assert set(counts) == {f"req-{i}" for i in range(60)} and max(counts.values()) == 1
    chat = next(line for line in lines if line["custom_id"] == "req-1")
    assert chat["error"] is None and chat["response"]["status_code"] == 200
    body = chat["response"]["body"]
    assert body["object"] == "chat.completion" and body["choices"][0]["message"] == {
        "role": "assistant",
        "content": "chat 1",
    }
    assert body["usage"]["total_tokens"] == body["usage"]["prompt_tokens"] + body["usage"]["completion_tokens"]
    comp = next(line for line in lines if line["custom_id"] == "req-0")["response"]["body"]
    assert comp["object"] == "text_completion" and comp["choices"][0]["text"] == "complete 0"
    errors = _lines(tmp_path / "out.errors.jsonl")
    assert [e["custom_id"] for e in errors] == ["bad-url"] and "not an endpoint abqueue serves" in errors[0]["error"][
        "message"
    ]
    # A third run finds nothing to do and writes nothing twice.
    code, stdout, _ = _run_batch(kafka_bootstrap, cfg, inp, out, "--no-progress")
    assert code == 0 and "61 already done" in stdout and len(_lines(out)) == 60
    # The README offers OpenAI-format results to `abq report --input` (issue 12: it refused them).
    report = subprocess.run(
        abq_cmd("report", "--config", str(cfg), "--input", str(out), "--format", "json"),
        capture_output=True, text=True, cwd=REPO,
    )  # fmt: skip
    assert report.returncode == 0, report.stderr
    assert orjson.loads(report.stdout)["variants"]["a"]["count"] == 60


def test_results_that_arrived_survive_a_timeout_and_a_rerun_collects_the_rest(
    settings, kafka_bootstrap, thread_worker, tmp_path
):
    exp = new_experiment(variants=(("a", 100),))
    ensure_topics(settings, exp)
    cfg = write_config(exp, tmp_path)
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    _write(
        inp, [{"id": f"own-{i}", "routing_key": f"u{i}", "prompt": f"own line {i}", "max_tokens": 4} for i in range(30)]
    )
    # No worker yet: the first run times out with nothing, keeps its place on the responses topic.
    code, _, stderr = _run_batch(kafka_bootstrap, cfg, inp, out, "--timeout", "2", "--no-progress")
    assert code == 1 and "rerun the same command" in stderr and "\n" not in stderr.strip()
    assert (tmp_path / "out.jsonl.state.json").exists()
    with thread_worker(exp, "a"):
        assert _answered_all(settings, exp) == 30  # while no batch command runs
        code, stdout, stderr = _run_batch(kafka_bootstrap, cfg, inp, out, "--no-progress")
    assert code == 0, stderr
    assert "0 submitted" in stdout and "30 ok" in stdout  # all collected, none submitted again
    ids = Counter(line["request_id"] for line in _lines(out))
    assert set(ids) == {f"own-{i}" for i in range(30)} and max(ids.values()) == 1
    assert not (tmp_path / "out.jsonl.state.json").exists()


def test_duplicate_ids_are_refused_up_front_with_their_line_numbers(tmp_path):
    inp = tmp_path / "dup.jsonl"
    _write(inp, [{"id": "x", "prompt": "1"}, {"id": "y", "prompt": "2"}, {"id": "x", "prompt": "3"}])
    with pytest.raises(BatchInputError, match=r"duplicate ids: 'x' on lines 1, 3"):
        scan_input(inp)


def test_a_line_too_large_for_the_topic_goes_to_the_errors_file_and_the_rest_runs(
    settings, kafka_bootstrap, thread_worker, tmp_path
):
    exp = new_experiment(variants=(("a", 100),))
    ensure_topics(settings, exp)
    cfg = write_config(exp, tmp_path)
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    lines = [{"id": f"l{i}", "prompt": f"line {i}"} for i in range(5)]
    lines.insert(2, {"id": "huge", "prompt": "x" * 1_100_000})
    _write(inp, lines)
    with thread_worker(exp, "a"):
        code, stdout, stderr = _run_batch(kafka_bootstrap, cfg, inp, out, "--no-progress")
    assert code == 3, stderr  # done, but some lines could not be submitted
    assert "5 submitted" in stdout and "5 ok" in stdout and "1 invalid" in stdout
    assert {line["request_id"] for line in _lines(out)} == {f"l{i}" for i in range(5)}
    [err] = _lines(tmp_path / "out.errors.jsonl")
    assert err["key"] == "huge" and "max.message.bytes" in err["error"]["message"]


def test_rate_flag_spaces_submissions(settings, kafka_bootstrap, thread_worker, tmp_path, monkeypatch):
    """Record timestamps are taken at send, so 11 sends at 10/s span a second, less the millisecond
    resolution. The first send stamps its record only after fetching the topic's metadata (about
    100 ms on CI, made 150 ms here); pacing whose clock started before that fetch sent the second
    record at once, and the eleven spanned 0.892 s."""
    exp = new_experiment(variants=(("a", 100),))
    ensure_topics(settings, exp)
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    _write(inp, [{"id": f"r{i}", "prompt": f"rate {i}"} for i in range(11)])
    publish, calls = AbqClient.publish, []

    def slow_first(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            time.sleep(0.15)
        return publish(self, *args, **kwargs)

    monkeypatch.setattr(AbqClient, "publish", slow_first)
    with thread_worker(exp, "a"):
        summary = BatchJob(settings, exp, inp, out, rate=10, timeout_s=30, progress=False).run()
    assert summary.ok == 11
    sent = sorted(line["timings"]["enqueued"] for line in _lines(out))
    assert sent[-1] - sent[0] >= 1.0 - 0.002, [round(b - a, 3) for a, b in itertools.pairwise(sent)]


def test_lines_that_can_never_finish_go_to_the_errors_file_with_their_line_numbers(
    settings, kafka_bootstrap, thread_worker, tmp_path
):
    """A line for another experiment, an unknown variant or a shadow variant used to abort every rerun
    at that line (or wait forever for an answer no caller ever gets)."""
    exp = new_experiment(variants=(("a", 100), ("s", 0)))
    exp.variants[1].shadow_of = "a"
    ensure_topics(settings, exp)
    cfg = write_config(exp, tmp_path)
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    _write(
        inp,
        [
            {"id": "ok-1", "prompt": "one"},
            {"id": "other", "experiment": "nope", "prompt": "x"},
            {"id": "ghost", "variant": "zzz", "prompt": "x"},
            {"id": "shadowed", "variant": "s", "prompt": "x"},
            {"id": "elsewhere", "prompt": "x", "reply_to": "abq.experiments"},
            {"id": "ok-2", "prompt": "two"},
        ],
    )
    with thread_worker(exp, "a"):
        code, stdout, stderr = _run_batch(kafka_bootstrap, cfg, inp, out, "--no-progress", "--timeout", "30")
    assert code == 3, stderr  # done, but some lines could not be submitted
    assert "2 ok" in stdout and "4 invalid" in stdout and "0 missing" in stdout, stdout
    errors = {e["key"]: e for e in _lines(tmp_path / "out.errors.jsonl")}
    assert set(errors) == {"other", "ghost", "shadowed", "elsewhere"}
    assert [errors[k]["line"] for k in ("other", "ghost", "shadowed", "elsewhere")] == [2, 3, 4, 5]
    assert "'nope'" in errors["other"]["error"]["message"]
    assert "'zzz'" in errors["ghost"]["error"]["message"]
    assert "shadow" in errors["shadowed"]["error"]["message"]
    assert "reply_to abq.experiments" in errors["elsewhere"]["error"]["message"]


def test_reply_to_sends_the_results_there(settings, kafka_bootstrap, thread_worker, tmp_path):
    """--reply-to used to listen on the topic without asking workers to write there."""
    from kafka_helpers import responses

    from abqueue.kafka import admin_client

    exp = new_experiment(variants=(("a", 100),))
    ensure_topics(settings, exp)
    replies = f"abq.{exp.name}.replies.batch"
    admin = admin_client(settings)
    admin.create_topics({replies: {"num_partitions": 2, "replication_factor": 1}})
    admin.close()
    cfg = write_config(exp, tmp_path)
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    _write(inp, [{"id": f"r{i}", "prompt": f"reply {i}"} for i in range(5)])
    with thread_worker(exp, "a"):
        code, stdout, stderr = _run_batch(
            kafka_bootstrap, cfg, inp, out, "--no-progress", "--timeout", "30", "--reply-to", replies
        )
    assert code == 0 and "5 ok" in stdout, (stdout, stderr)
    assert {r.request_id for r in responses(settings, replies, expect=5)} == {f"r{i}" for i in range(5)}


def test_a_torn_last_line_is_repaired_on_resume(settings, kafka_bootstrap, thread_worker, tmp_path):
    """kill -9 mid-write leaves half a line; the next result used to be appended to it, so that id was
    resubmitted on every rerun and the file could not be read."""
    exp = new_experiment(variants=(("a", 100),))
    ensure_topics(settings, exp)
    cfg = write_config(exp, tmp_path)
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    _write(inp, [{"id": f"t{i}", "prompt": f"torn {i}"} for i in range(4)])
    whole = orjson.dumps({"request_id": "t0", "outputs": ["torn 0"]}) + b"\n"
    out.write_bytes(whole + b'{"request_id": "t1", "outp')
    with thread_worker(exp, "a"):
        code, stdout, stderr = _run_batch(kafka_bootstrap, cfg, inp, out, "--no-progress", "--timeout", "30")
    assert code == 0, stderr
    assert "1 already done" in stdout and "3 submitted" in stdout, stdout
    assert Counter(line["request_id"] for line in _lines(out)) == {f"t{i}": 1 for i in range(4)}


def test_two_jobs_with_the_same_ids_each_get_their_own_results(settings, kafka_bootstrap, thread_worker, tmp_path):
    """Both jobs read the same responses topic; ids 1..N collide, and each must keep only its own answers."""
    exp = new_experiment(variants=(("a", 100),))
    ensure_topics(settings, exp)
    cfg = write_config(exp, tmp_path)
    jobs = {}
    for name in ("left", "right"):
        inp = tmp_path / f"{name}.jsonl"
        _write(inp, [{"id": str(i), "prompt": f"{name} {i}"} for i in range(40)])
        jobs[name] = (inp, tmp_path / f"{name}.out.jsonl")
    with thread_worker(exp, "a"):
        procs = {
            name: _run_batch(kafka_bootstrap, cfg, inp, out, "--no-progress", "--timeout", "60", wait=False)
            for name, (inp, out) in jobs.items()
        }
        for proc in procs.values():
            _, stderr = proc.communicate(timeout=120)
            assert proc.returncode == 0, stderr.decode()
    for name, (_, out) in jobs.items():
        got = {line["request_id"]: line["outputs"] for line in _lines(out)}
        assert got == {str(i): [f"{name} {i}"] for i in range(40)}, name


def test_a_rerun_waits_for_what_is_queued_instead_of_submitting_it_again(settings, kafka_bootstrap, tmp_path):
    """With no worker, a rerun used to submit everything still queued again (double the GPU work);
    and --max-pending bounds what one job keeps in flight, and so its memory."""
    exp = new_experiment(variants=(("a", 100),))
    ensure_topics(settings, exp)
    cfg = write_config(exp, tmp_path)
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    _write(inp, [{"id": f"q{i}", "prompt": f"queued {i}"} for i in range(30)])
    code, stdout, _ = _run_batch(
        kafka_bootstrap, cfg, inp, out, "--no-progress", "--timeout", "2", "--max-pending", "12"
    )
    assert code == 1 and "12 submitted" in stdout and "30 missing" in stdout, stdout
    code, stdout, _ = _run_batch(
        kafka_bootstrap, cfg, inp, out, "--no-progress", "--timeout", "2", "--max-pending", "12"
    )
    assert code == 1 and "0 submitted" in stdout, stdout
    assert sum(end_offsets(settings, exp.request_topic("a", "batch")).values()) == 12


def test_openai_lines_without_a_usable_custom_id_or_with_a_non_object_message_go_to_the_errors_file(
    settings, kafka_bootstrap, thread_worker, tmp_path
):
    """Lines whose custom_id was null all got request id "None": the second line received the first's
    answer, and a rerun wrote it for both. A message that is not an object crashed every rerun with an
    AttributeError. Both are refused into the errors file; the other lines run (and the reply topic,
    which no command created, is created by the job)."""
    exp = new_experiment(variants=(("a", 100),))
    ensure_topics(settings, exp)
    cfg = write_config(exp, tmp_path)
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    good = list(_openai_lines(2, exp.name))
    nulls = [{**line, "custom_id": None, "body": {"model": exp.name, "prompt": f"null {i}"}, "url": "/v1/completions"} for i, line in enumerate(good)]  # fmt: skip
    _write(
        inp,
        [
            *good,
            *nulls,
            {**good[0], "custom_id": ""},
            {**good[1], "custom_id": "not-an-object", "body": {"model": exp.name, "messages": ["hi"]}},
            # Another model than the experiment: refused as the gateway refuses it, not run on this one.
            {**good[1], "custom_id": "elsewhere", "body": {**good[1]["body"], "model": "gpt-4o"}},
            {**good[1], "custom_id": "pinned", "body": {**good[1]["body"], "model": f"{exp.name}:a"}},
        ],
    )
    with thread_worker(exp, "a"):
        for run in range(2):  # the rerun finds every line done
            code, stdout, stderr = _run_batch(
                kafka_bootstrap, cfg, inp, out, "--no-progress", "--timeout", "30",
                "--reply-to", f"abq.{exp.name}.replies.jobs",
            )  # fmt: skip
            assert code == (3, 0)[run] and "Traceback" not in stderr, stderr
    assert "8 already done" in stdout, stdout
    assert sorted(r["custom_id"] for r in _lines(out)) == ["pinned", "req-0", "req-1"]
    errors = _lines(tmp_path / "out.errors.jsonl")
    assert len(errors) == 5, errors
    messages = sorted(e["error"]["message"] for e in errors)
    assert sum("custom_id must be a non-empty string" in m for m in messages) == 3, messages
    assert any("messages.0 must be an object with 'role' and 'content', not JSON string" in m for m in messages)
    assert any(f"model 'gpt-4o' is not this experiment ({exp.name})" in m for m in messages), messages


def test_a_batch_assigns_its_lines_by_the_live_weights_not_the_file_s(settings, thread_worker, tmp_path):
    """Gateway batches and `abq batch` assigned by the weights in the startup file: a candidate rolled
    back to 0% kept receiving batch traffic for the batch's life while the same gateway's synchronous
    calls followed the live weights. (The gateway's batches run this same job.)"""
    from abqueue.control import live_config

    exp = new_experiment(variants=(("control", 50), ("candidate", 50)))
    ensure_topics(settings, exp)
    rolled_back = exp.model_copy(update={"variants": [exp.variants[0].model_copy(update={"weight": 100}), exp.variants[1].model_copy(update={"weight": 0})]})  # fmt: skip
    live_config.apply(settings, rolled_back, comment="candidate rolled back")
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    _write(inp, [{"id": f"r{i}", "prompt": f"line {i}", "routing_key": f"user-{i}"} for i in range(40)])
    with thread_worker(exp, "control"), thread_worker(exp, "candidate"):
        summary = BatchJob(settings, exp, inp, out, timeout_s=30, progress=False).run()
    assert summary.ok == 40
    assert Counter(r["variant"] for r in _lines(out)) == {"control": 40}
    assert {r["config_version"] for r in _lines(out)} == {live_config.current(settings, exp.name).version}


def test_a_batch_waiting_on_absent_workers_says_so_on_its_progress_line(settings, kafka_bootstrap, tmp_path):
    """With no worker running, a batch sat silent until its timeout: its progress line only moved
    when a result came. It now says what it waits for, and that no result has come for how long."""
    exp = new_experiment(variants=(("a", 100),))
    ensure_topics(settings, exp)
    cfg = write_config(exp, tmp_path)
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    _write(inp, [{"id": f"w-{i}", "routing_key": f"u{i}", "prompt": "x", "max_tokens": 2} for i in range(5)])
    code, _, stderr = _run_batch(kafka_bootstrap, cfg, inp, out, "--timeout", "12")
    assert code == 1, stderr
    waiting = [line for line in stderr.splitlines() if "waiting for 5 results" in line]
    assert waiting, stderr
    assert "no result for" in waiting[-1] and f"are {exp.name}'s workers running?" in waiting[-1], waiting
