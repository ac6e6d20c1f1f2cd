"""The gateway's Files and Batches API, called with the official `openai` SDK, against the real
broker and echo workers: every line accounted for exactly once, tenants apart, bad uploads refused
with their line numbers, cancel, expiry, and a gateway killed mid-batch."""

import os
import signal
import subprocess
import urllib.request
from collections import Counter

import openai
import orjson
import pytest
from conftest import REPO, abq_cmd, metric_values, new_experiment, write_config
from kafka_helpers import wait_until
from test_gateway import _client, serving

from abqueue.kafka import ensure_topics
from abqueue.localkafka.broker import free_port

OTHER = "sk-beta-0123456789abcdef"  # the second tenant's key (test_gateway.KEYS)


def _lines(model, n, url="/v1/chat/completions"):
    out = []
    for i in range(n):
        body = {"model": model, "max_tokens": 8, "user": f"user-{i % 7}"}
        if url.endswith("chat/completions"):
            body["messages"] = [{"role": "user", "content": f"line {i}"}]
        else:
            body["prompt"] = f"line {i}"
        out.append({"custom_id": f"req-{i}", "method": "POST", "url": url, "body": body})
    return b"".join(orjson.dumps(line) + b"\n" for line in out)


def _results(client, file_id):
    return [orjson.loads(line) for line in client.files.content(file_id).read().splitlines()] if file_id else []


def _status(client, batch_id, want, timeout=90):
    wait_until(lambda: client.batches.retrieve(batch_id).status in want, timeout, f"batch {batch_id} {want}", every=0.3)
    return client.batches.retrieve(batch_id)


def _experiment(settings, **engine_args):
    exp = new_experiment(variants=(("a", 50), ("b", 50)), **engine_args)
    ensure_topics(settings, exp)
    return exp


def test_a_batch_through_the_sdk_accounts_for_every_line_and_tenants_see_only_their_own(
    settings, thread_worker, tmp_path
):
    exp = _experiment(settings, error_rate=0.1)
    with thread_worker(exp, "a"), thread_worker(exp, "b"), serving(settings, [exp], storage=tmp_path / "s") as url:
        client = _client(url)
        f = client.files.create(file=("in.jsonl", _lines(exp.name, 40)), purpose="batch")
        assert f.purpose == "batch" and f.bytes > 0
        b = client.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h",
                                  metadata={"job": "nightly"})  # fmt: skip
        assert b.status in ("validating", "in_progress") and b.metadata == {"job": "nightly"}
        done = _status(client, b.id, {"completed"})
        out, err = _results(client, done.output_file_id), _results(client, done.error_file_id)
        ids = Counter(line["custom_id"] for line in out + err)
        assert ids == Counter(f"req-{i}" for i in range(40))  # every line, each once
        assert err and all(line["response"]["status_code"] == 500 for line in err)  # the echo engine's errors
        assert all(line["response"]["body"]["choices"][0]["message"]["content"].startswith("line") for line in out)
        assert all(line["abq"]["variant"] in ("a", "b") for line in out)
        assert (done.request_counts.total, done.request_counts.completed, done.request_counts.failed) == (
            40, len(out), len(err),
        )  # fmt: skip
        assert done.in_progress_at and done.finalizing_at and done.completed_at
        text = urllib.request.urlopen(url.removesuffix("/v1") + "/metrics", timeout=10).read().decode()
        assert metric_values(text, result="completed")["abq_gateway_batch_lines_total"] >= len(out)
        assert metric_values(text, status="completed")["abq_gateway_batches"] >= 1
        assert [x.id for x in client.batches.list()].count(b.id) == 1
        # Another tenant: the file and the batch do not exist for it.
        other = _client(url, key=OTHER, max_retries=0)
        with pytest.raises(openai.NotFoundError):
            other.files.retrieve(f.id)
        with pytest.raises(openai.NotFoundError):
            other.files.content(done.output_file_id)
        with pytest.raises(openai.NotFoundError):
            other.batches.retrieve(b.id)
        with pytest.raises(openai.NotFoundError):
            other.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h")
        assert b.id not in [x.id for x in other.batches.list()]
        assert f.id not in [x.id for x in other.files.list()]
        assert client.files.delete(f.id).deleted
        with pytest.raises(openai.NotFoundError):
            client.files.retrieve(f.id)


def test_a_bad_upload_is_refused_with_the_numbers_of_its_bad_lines(settings, tmp_path):
    exp = _experiment(settings)
    good = _lines(exp.name, 3).splitlines()
    bad = [
        good[0],
        b"not json",
        good[1],
        orjson.dumps({"custom_id": "req-0", "method": "POST", "url": "/v1/chat/completions", "body": {}}),
        orjson.dumps(orjson.loads(good[2]) | {"body": {"model": "nope", "messages": []}}),
        orjson.dumps({"custom_id": "t", "method": "POST", "url": "/v1/chat/completions",
                      "body": {"model": exp.name, "messages": [{"role": "user", "content": "x"}], "temperature": 9}}),
    ]  # fmt: skip
    with serving(settings, [exp], storage=tmp_path / "s") as url:
        client = _client(url, max_retries=0)
        kept = {f.id for f in client.files.list()}  # the files topic is shared with the other tests
        with pytest.raises(openai.BadRequestError) as e:
            client.files.create(file=("in.jsonl", b"\n".join(bad) + b"\n"), purpose="batch")
        message = e.value.message
        assert "4 invalid lines" in message
        for n, why in ((2, "not JSON"), (4, "repeats line 1"), (5, "not an experiment"), (6, "temperature")):
            assert f"line {n}: " in message and why in message, (n, message)
        assert "line 1:" not in message and "line 3:" not in message
        assert {f.id for f in client.files.list()} == kept  # nothing kept of a refused upload
        with pytest.raises(openai.BadRequestError) as e:
            client.files.create(file=("in.jsonl", _lines(exp.name, 2)), purpose="fine-tune")
        assert e.value.param == "purpose"
        f = client.files.create(file=("in.jsonl", _lines(exp.name, 2)), purpose="batch")
        with pytest.raises(openai.BadRequestError) as e:
            client.batches.create(input_file_id=f.id, endpoint="/v1/completions", completion_window="24h")
        assert e.value.param == "endpoint"


def test_cancel_stops_submitting_and_keeps_partial_output_and_expiry_lists_the_rest(settings, thread_worker, tmp_path):
    exp = _experiment(settings, latency_ms=150)
    with (
        thread_worker(exp, "a", max_inflight=2),
        thread_worker(exp, "b", max_inflight=2),
        serving(settings, [exp], storage=tmp_path / "s") as url,
    ):
        client = _client(url)
        f = client.files.create(file=("in.jsonl", _lines(exp.name, 200)), purpose="batch")
        b = client.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h")
        wait_until(lambda: client.batches.retrieve(b.id).request_counts.completed >= 5, 60, "first results")
        assert client.batches.cancel(b.id).status in ("cancelling", "cancelled")
        done = _status(client, b.id, {"cancelled"})
        out = _results(client, done.output_file_id)
        ids = Counter(line["custom_id"] for line in out)
        assert 5 <= len(out) < 200 and max(ids.values()) == 1
        assert done.cancelled_at and done.request_counts.completed == len(out)
        with pytest.raises(openai.ConflictError):
            client.batches.cancel(_status(client, _quick(client, exp), {"completed"}).id)

        # A window too short for the whole file: what finished is kept, the rest is listed as expired
        # (by the gateway, or by a worker that found a request past the window's deadline: 408).
        b = client.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="3s")
        done = _status(client, b.id, {"expired"})
        out, err = _results(client, done.output_file_id), _results(client, done.error_file_id)
        assert Counter(line["custom_id"] for line in out + err) == Counter(f"req-{i}" for i in range(200))
        expired = [
            line for line in err
            if (line["error"] and line["error"]["code"] == "batch_expired") or line["response"]["status_code"] == 408
        ]  # fmt: skip
        assert len(expired) == len(err)
        assert out and expired and done.expired_at


def _quick(client, exp):
    f = client.files.create(file=("one.jsonl", _lines(exp.name, 1)), purpose="batch")
    return client.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h").id


def test_a_gateway_killed_mid_batch_is_replaced_and_every_line_is_in_the_output_once(
    settings, kafka_bootstrap, thread_worker, tmp_path
):
    exp = _experiment(settings, latency_ms=100)
    cfg = write_config(exp, tmp_path)
    keys = tmp_path / "keys.yaml"
    keys.write_text("acme: [sk-acme-0123456789abcdef]\n")
    keys.chmod(0o600)
    env = {**os.environ, "ABQ_BOOTSTRAP_SERVERS": kafka_bootstrap}

    def gateway(name):
        port = free_port()
        proc = subprocess.Popen(
            abq_cmd("gateway", "--config", str(cfg), "--port", str(port), "--api-keys", str(keys),
                    "--storage", str(tmp_path / "shared"), "--instance", name),
            stdout=open(tmp_path / f"{name}.log", "wb"), stderr=subprocess.STDOUT, env=env, cwd=REPO,  # noqa: SIM115
        )  # fmt: skip
        client = _client(f"http://127.0.0.1:{port}/v1", max_retries=0)

        def up():
            try:
                return client.models.list() is not None
            except openai.APIConnectionError:
                return False

        wait_until(up, 60, f"gateway {name} serving")
        return proc, client

    first, client = gateway("first")
    second = None
    try:
        with thread_worker(exp, "a", max_inflight=4), thread_worker(exp, "b", max_inflight=4):
            f = client.files.create(file=("in.jsonl", _lines(exp.name, 150)), purpose="batch")
            b = client.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h")
            wait_until(lambda: client.batches.retrieve(b.id).request_counts.completed >= 20, 60, "results")
            before = client.batches.retrieve(b.id)
            first.send_signal(signal.SIGKILL)
            first.wait(10)
            assert before.status == "in_progress" and before.request_counts.completed < 150  # killed mid-batch
            second, client = gateway("second")
            done = _status(client, b.id, {"completed"}, timeout=120)
            out, err = _results(client, done.output_file_id), _results(client, done.error_file_id)
            ids = Counter(line["custom_id"] for line in out + err)
            assert ids == Counter(f"req-{i}" for i in range(150)), [k for k, n in ids.items() if n > 1]
            assert not err
    finally:
        for p in (first, second):
            if p is not None and p.poll() is None:
                p.terminate()
                p.wait(30)


def _upload_until_answered(url: str, body_bytes: int, chunked: bool) -> tuple[bytes, int]:
    """Streams a multipart upload of `body_bytes` to the gateway on a raw socket until it answers;
    (the status line, the bytes sent by then)."""
    import select
    import socket
    from urllib.parse import urlparse

    u = urlparse(url)
    sock = socket.create_connection((u.hostname, u.port), timeout=30)
    head = (
        f"POST /v1/files HTTP/1.1\r\nHost: {u.hostname}\r\nAuthorization: Bearer sk-acme-0123456789abcdef\r\n"
        "Content-Type: multipart/form-data; boundary=XyZ\r\n"
        + ("Transfer-Encoding: chunked\r\n" if chunked else f"Content-Length: {body_bytes}\r\n")
        + "\r\n"
    )
    sock.sendall(head.encode())
    part = b'--XyZ\r\nContent-Disposition: form-data; name="file"; filename="big.jsonl"\r\n\r\n'
    sent, line = 0, b'{"custom_id": "x", "method": "POST"}\n' * 2000
    chunk = part
    try:
        while sent < body_bytes:
            if select.select([sock], [], [], 0)[0]:
                break  # it answered
            data = chunk[: body_bytes - sent]
            sock.sendall(b"%x\r\n%s\r\n" % (len(data), data) if chunked else data)
            sent += len(data)
            chunk = line
    except OSError:
        pass  # it answered and closed while we were still sending
    status = sock.recv(200).split(b"\r\n")[0]
    sock.close()
    return status, sent


def test_an_upload_over_the_file_limit_is_refused_before_it_is_taken_whole(settings, tmp_path):
    """A 30 MB file against a 1 MB --max-file-bytes was spooled whole before its limit was checked;
    a non-file field could hold up to the file limit in memory. Refused as soon as a limit is crossed."""
    exp = new_experiment(variants=(("a", 100),))
    ensure_topics(settings, exp)
    big = 30_000_000
    with serving(settings, [exp], storage=tmp_path / "s", max_file_bytes=1_000_000) as url:
        status, sent = _upload_until_answered(url, big, chunked=False)
        assert b" 413 " in status and sent < big / 3, (status, sent)  # by its Content-Length, before the body
        status, sent = _upload_until_answered(url, big, chunked=True)
        assert b" 413 " in status and sent < big / 3, (status, sent)  # while it streams in
        client = _client(url, max_retries=0)
        with pytest.raises(openai.BadRequestError) as e:
            client.post("/files", files={"purpose": (None, "b" * 100_000), "file": ("x.jsonl", b"{}")}, cast_to=object, options={"headers": {"Content-Type": "multipart/form-data"}})  # fmt: skip
        assert "form" in e.value.message
        with pytest.raises(openai.BadRequestError) as e:  # a line whose message is not an object: named, not a 500
            line = {"custom_id": "1", "method": "POST", "url": "/v1/chat/completions", "body": {"model": exp.name, "messages": ["hi"]}}  # fmt: skip
            client.files.create(file=("in.jsonl", orjson.dumps(line)), purpose="batch")
        assert "line 1: messages.0 must be an object" in e.value.message


def test_a_terminal_batch_status_never_changes_whatever_a_stale_replica_writes():
    """A replica with a stale view wrote `cancelling` after the owner wrote `completed`; the owner
    ran it again and finalised it as cancelled, its completed_at lost. Every replica reads the
    records in one order and keeps the first terminal status."""
    from abqueue.gateway.records import BatchRecord, merge_batch

    b = BatchRecord(id="batch_1", endpoint="/v1/chat/completions", input_file_id="f", completion_window="24h", created_at=1, tenant="acme")  # fmt: skip
    running = b.model_copy(update={"status": "in_progress"})
    completed = b.model_copy(update={"status": "completed", "completed_at": 5})
    stale_cancel = running.model_copy(update={"status": "cancelling", "cancelling_at": 6})
    kept = merge_batch(merge_batch(running, completed), stale_cancel)
    assert (kept.status, kept.completed_at) == ("completed", 5)
    for later in (running, b.model_copy(update={"status": "cancelled", "cancelled_at": 7})):
        assert merge_batch(kept, later) is kept
    cancelling = merge_batch(running, stale_cancel)
    assert merge_batch(cancelling, running).status == "cancelling"  # progress written meanwhile keeps the cancel
    assert (
        merge_batch(cancelling, b.model_copy(update={"status": "cancelled", "cancelled_at": 8})).status == "cancelled"
    )


def test_an_embeddings_batch_is_answered_with_openai_s_embedding_objects(settings, thread_worker, tmp_path):
    exp = _experiment(settings)
    lines = [{"custom_id": f"e-{i}", "method": "POST", "url": "/v1/embeddings",
              "body": {"model": exp.name, "input": [f"text {i}", "same"], "user": f"u-{i}"}} for i in range(6)]  # fmt: skip
    with thread_worker(exp, "a"), thread_worker(exp, "b"), serving(settings, [exp], storage=tmp_path / "s") as url:
        client = _client(url)
        f = client.files.create(file=("in.jsonl", b"".join(orjson.dumps(x) + b"\n" for x in lines)), purpose="batch")
        b = client.batches.create(input_file_id=f.id, endpoint="/v1/embeddings", completion_window="24h")
        done = _status(client, b.id, {"completed", "failed"})
        assert done.status == "completed" and done.request_counts.completed == 6, done
        out = {r["custom_id"]: r["response"]["body"] for r in _results(client, done.output_file_id)}
    assert sorted(out) == [x["custom_id"] for x in lines]
    for body in out.values():
        assert body["object"] == "list" and [d["index"] for d in body["data"]] == [0, 1]
    # The echo engine's vectors come from the text: the same text, the same vector, in every line.
    assert len({tuple(b["data"][1]["embedding"]) for b in out.values()}) == 1
