"""Bulk jobs: JSONL in (our request lines or OpenAI Batch lines), JSONL results out as they arrive,
failures to a separate file, a rate limit, progress, and resume by rerunning the same command.

The input is streamed, never held: memory grows with what is in flight (at most `max_pending`
requests), plus an 8-byte fingerprint per line (about 60 bytes in a Python set) for the duplicate
and already-done checks (bench/batch_memory.py). A job keeps, beside its output, a state file:
where the responses topic stood when it started, its caller tag (so that it takes only its own
answers), and up to which line Kafka has acknowledged its requests, so that a rerun collects those
answers instead of submitting them again.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
from kafka.errors import KafkaError
from pydantic import ValidationError

from abqueue.errors import AbqError, UsageError
from abqueue.kafka import KafkaSettings
from producers import openai_batch
from producers.client import AbqClient
from producers.progress import Progress
from producers.publisher import RequestTooLarge
from producers.replies import Reply
from schemas import ConfigError, ExperimentConfig, InferenceRequest
from schemas.codec import describe

log = logging.getLogger(__name__)


class BatchInputError(AbqError, ValueError):
    pass


class BatchSendFailed(AbqError):
    pass


@dataclass
class Item:
    line: int
    key: str  # custom_id for OpenAI lines, else the request id: what resume matches on
    request: InferenceRequest | None = None
    url: str | None = None  # OpenAI lines only
    error: str | None = None


@dataclass
class BatchSummary:
    total: int
    skipped: int
    submitted: int
    ok: int
    failed: int
    invalid: int
    missing: int
    elapsed_s: float


def _fingerprint(key: str) -> int:
    """8 bytes standing for a line's key: the done and duplicate checks keep these, not the keys."""
    return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "big")


def _lines(path: Path) -> Iterator[tuple[int, bytes]]:
    with path.open("rb") as f:
        for n, raw in enumerate(f, start=1):
            if raw.strip():
                yield n, raw


def _object(n: int, raw: bytes) -> tuple[dict | None, str, str | None]:
    """The line's JSON object, the key resume matches it by, and why it is unusable (if it is)."""
    fallback_key = f"line-{n}-{hashlib.sha256(raw.strip()).hexdigest()[:12]}"
    try:
        obj = orjson.loads(raw)
    except orjson.JSONDecodeError as e:
        return None, fallback_key, f"line {n} is not JSON: {e}"
    if not isinstance(obj, dict):
        return None, fallback_key, f"line {n} is not a JSON object"
    key = obj.get("custom_id") if openai_batch.is_openai_line(obj) else obj.get("id")
    if isinstance(key, int) and not isinstance(key, bool):
        key = str(key)
    # Lines without a usable id are matched by their content: "None" or "" would be one id for many lines.
    return obj, key if isinstance(key, str) and key else fallback_key, None


def _other_model(obj: dict, experiment: ExperimentConfig) -> str | None:
    """Why an OpenAI line's `model` is not for this job: it must name the experiment (or
    experiment:variant), as the gateway's `model` does; left out, the job's experiment serves it."""
    body = obj.get("body")
    model = body.get("model") if isinstance(body, dict) else None
    if model is None or (isinstance(model, str) and model.partition(":")[0] == experiment.name):
        return None
    return (
        f"model {model!r} is not this experiment ({experiment.name}); name it, or {experiment.name}:VARIANT to pin "
        "one, as the gateway's model does"
    )


def _item(n: int, raw: bytes, experiment: ExperimentConfig, fmt_openai: bool) -> Item:
    obj, key, error = _object(n, raw)
    if obj is None:
        return Item(n, key, error=error)
    is_openai = openai_batch.is_openai_line(obj)
    if is_openai != fmt_openai:
        kind = "OpenAI Batch" if fmt_openai else "abqueue request"
        return Item(n, key, error=f"line {n} mixes formats: the file started with {kind} lines")
    url = obj.get("url") if is_openai else None
    if is_openai and (not isinstance(cid := obj["custom_id"], str) or not cid):
        # Its answer could not be told from another line's: refused, as OpenAI refuses it.
        return Item(n, key, url=url, error=f"line {n}: custom_id must be a non-empty string, not {cid!r}")
    if is_openai and (refused := _other_model(obj, experiment)):
        return Item(n, key, url=url, error=f"line {n}: {refused}")
    try:
        # Lines without an id get one derived from their content, so a rerun matches them.
        fields = openai_batch.to_request_fields(obj) if is_openai else {"routing_key": key, **obj, "id": key}
        if is_openai and isinstance(model := obj["body"].get("model"), str) and ":" in model:
            fields["variant"] = model.partition(":")[2]  # experiment:variant pins one, as at the gateway
        fields.setdefault("experiment", experiment.name)
        fields.setdefault("priority", "batch")  # bulk work yields to interactive traffic
        return Item(n, key, InferenceRequest.model_validate(fields), url)
    except openai_batch.UnsupportedLine as e:
        return Item(n, key, url=url, error=f"line {n}: {e}")
    except ValidationError as e:
        return Item(n, key, url=url, error=f"line {n}: {describe(e, whole='(line)')}")


@dataclass
class InputScan:
    lines: int
    openai: bool
    fingerprints: set[int]


def scan_input(path: Path) -> InputScan:
    """One pass over the input before anything is sent: its format, its size, and that no id is
    used twice (a rerun could not tell their results apart)."""
    seen: set[int] = set()
    twice: set[int] = set()
    fmt_openai: bool | None = None
    count = 0
    for n, raw in _lines(path):
        count += 1
        obj, key, _ = _object(n, raw)
        if obj is not None and fmt_openai is None:
            fmt_openai = openai_batch.is_openai_line(obj)
        fp = _fingerprint(key)
        if fp in seen:
            twice.add(fp)
        seen.add(fp)
    if twice:
        where: dict[str, list[int]] = {}
        for n, raw in _lines(path):  # only now read the keys themselves, to name them
            _, key, _ = _object(n, raw)
            if _fingerprint(key) in twice:
                where.setdefault(key, []).append(n)
        dupes = {k: v for k, v in where.items() if len(v) > 1}
        shown = "; ".join(f"{k!r} on lines {', '.join(map(str, v))}" for k, v in list(dupes.items())[:5])
        more = f" (and {len(dupes) - 5} more)" if len(dupes) > 5 else ""
        raise BatchInputError(f"{path}: duplicate ids: {shown}{more}; every line needs its own id")
    return InputScan(count, bool(fmt_openai), seen)


def done_keys(*paths: Path) -> set[int]:
    """Fingerprints of the keys that already have a line in the output or errors file."""
    keys: set[int] = set()
    for p in paths:
        if not p.exists():
            continue
        with p.open("rb") as f:
            for raw in f:
                try:
                    obj = orjson.loads(raw)
                except orjson.JSONDecodeError:
                    continue  # a line cut short by a crash: its id is simply not done
                key = obj.get("custom_id") or obj.get("request_id") or obj.get("key")
                if key:
                    keys.add(_fingerprint(str(key)))
    return keys


class ResultFile:
    """A JSONL file appended to as results arrive. `sync` makes what was written durable (fsync): a
    result on disk is one a rerun never asks for again."""

    def __init__(self, path: Path):
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        self._repair_tail()
        self._f = path.open("ab")
        self._dirty = False

    def _repair_tail(self) -> None:
        """A kill -9 mid-write leaves half a line; cut it off, or the next result would be joined to it
        (its id is then collected again, like any other missing one)."""
        if not self.path.exists() or self.path.stat().st_size == 0:
            return
        with self.path.open("r+b") as f:
            f.seek(-1, os.SEEK_END)
            if f.read(1) == b"\n":
                return
            size = f.seek(0, os.SEEK_END)
            keep = size
            while keep > 0:
                step = min(65536, keep)
                f.seek(keep - step)
                chunk = f.read(step)
                cut = chunk.rfind(b"\n")
                if cut >= 0:
                    keep = keep - step + cut + 1
                    break
                keep -= step
            f.truncate(keep)
            f.flush()
            os.fsync(f.fileno())
        log.warning(
            "%s ended in a torn line (%d bytes); cut it off, its result is collected again", self.path, size - keep
        )

    def write(self, obj: dict) -> None:
        self._f.write(orjson.dumps(obj) + b"\n")
        self._dirty = True

    def sync(self) -> None:
        if self._dirty:
            self._f.flush()
            os.fsync(self._f.fileno())
            self._dirty = False

    def close(self) -> None:
        self.sync()
        self._f.close()


@dataclass
class JobState:
    reply_topic: str
    start_offsets: dict[int, int]
    tag: str
    sent_through: int = 0  # every line up to this one was acknowledged by Kafka (or filed as an error)

    @classmethod
    def load(cls, path: Path) -> JobState | None:
        if not path.exists():
            return None
        raw = json.loads(path.read_text())
        return cls(
            raw["reply_topic"],
            {int(p): int(o) for p, o in raw["start_offsets"].items()},
            # A state from before caller tags: its requests carry none, so it takes untagged answers.
            raw.get("tag", ""),
            int(raw.get("sent_through", 0)),
        )

    def save(self, path: Path) -> None:
        tmp = path.with_name(path.name + ".tmp")
        with tmp.open("w") as f:
            json.dump(
                {
                    "reply_topic": self.reply_topic,
                    "start_offsets": self.start_offsets,
                    "tag": self.tag,
                    "sent_through": self.sent_through,
                },
                f,
            )
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)


CHECKPOINT_EVERY_S = 1.0  # how often acknowledged sends are recorded in the state file
WAITING_AFTER_S = 5.0  # without a result for this long, the progress line says what the job waits for


class BatchJob:
    def __init__(
        self,
        settings: KafkaSettings,
        experiment: ExperimentConfig,
        input_path: Path,
        out_path: Path,
        errors_path: Path | None = None,
        rate: float | None = None,
        timeout_s: float = 600.0,
        reply_topic: str | None = None,
        progress: bool = True,
        max_pending: int = 10_000,
        resubmit: bool = False,
        stop: Callable[[], bool] | None = None,
        on_counts: Callable[[int, int], None] | None = None,
        deadline: float | None = None,
    ):
        """timeout_s: how long to wait for results after the last submit, and at most without any
        result while `max_pending` requests are out. resubmit: submit again what an earlier run
        had Kafka acknowledge but got no result for (say, the requests topic was emptied since).
        stop: asked between sends and while waiting; once it says True the run submits nothing more
        and returns what it has (the gateway's cancel and expiry). on_counts(ok, failed) after each
        result. deadline: every request's (Unix time), so workers drop what comes due after it."""
        self.settings, self.experiment = settings, experiment
        self.input_path, self.out_path = Path(input_path), Path(out_path)
        self.errors_path = (
            Path(errors_path) if errors_path else self.out_path.with_name(self.out_path.stem + ".errors.jsonl")
        )
        self.state_path = self.out_path.with_name(self.out_path.name + ".state.json")
        self.rate, self.timeout_s, self.reply_topic = rate, timeout_s, reply_topic
        self.show_progress = progress
        self.max_pending, self.resubmit = max_pending, resubmit
        self.stop, self.on_counts, self.deadline = stop or (lambda: False), on_counts, deadline

    def run(self) -> BatchSummary:
        t0 = time.monotonic()
        out, err = ResultFile(self.out_path), ResultFile(self.errors_path)  # repairs torn tails first
        try:
            return _Run(self, out, err).run(t0)
        finally:
            out.close()
            err.close()


class _Run:
    """One run of a job: stream the input, submit what is not done, write results as they arrive."""

    def __init__(self, job: BatchJob, out: ResultFile, err: ResultFile):
        self.job, self.out, self.err = job, out, err
        self.pending: dict[str, Item] = {}  # by request id: submitted (now or by an earlier run), no result yet
        self.ok = self.failed = self.invalid = self.sent = 0
        self.progress: Progress | None = None
        self.last_result = time.monotonic()  # of the last result taken, or of the job's start
        self.openai = False

    def run(self, t0: float) -> BatchSummary:
        job = self.job
        done = done_keys(job.out_path, job.errors_path)
        scan = scan_input(job.input_path)
        self.openai = scan.openai
        skipped = len(scan.fingerprints & done)
        scan.fingerprints.clear()  # only the done set is needed from here
        state = JobState.load(job.state_path)
        if state is None and job.reply_topic and (refused := job.experiment.reply_to_refusal(job.reply_topic)):
            raise UsageError(f"--reply-to: {refused}")
        client = AbqClient(
            job.settings,
            job.experiment,
            state.reply_topic if state else job.reply_topic,
            start_offsets=state.start_offsets if state else None,
            tag=state.tag if state and state.tag else None,
            accept_untagged=bool(state and not state.tag),
            # A batch lives for days: its lines go by the live weights as the synchronous calls do (a
            # candidate rolled back to 0% kept getting batch traffic by the file's weights).
            follow=True,
        )
        self.client = client
        if state is None:
            # Where the responses topic stood before anything was sent: a rerun reads from here and
            # so collects the responses that arrived while this command was not running.
            state = JobState(client.listener.topic, client.listener.positions(), client.tag)
            state.save(job.state_path)
        self.state = state
        resuming = state.sent_through > 0
        if job.show_progress:
            self.progress = Progress(scan.lines - skipped, "batch")
        try:
            self._submit_all(done, resuming)
            deadline = time.monotonic() + job.timeout_s
            while self.pending and not job.stop() and (left := deadline - time.monotonic()) > 0:
                client.wait(set(self.pending), min(1.0, left), on_reply=self._take)
                self._waiting()
        finally:
            client.close()
        missing = scan.lines - skipped - self.ok - self.failed - self.invalid
        if self.progress:
            self.progress.finish(self.ok + self.failed, f"ok {self.ok} failed {self.failed} missing {missing}")
        if not missing:
            job.state_path.unlink(missing_ok=True)
        return BatchSummary(
            total=scan.lines,
            skipped=skipped,
            submitted=self.sent,
            ok=self.ok,
            failed=self.failed,
            invalid=self.invalid,
            missing=missing,
            elapsed_s=time.monotonic() - t0,
        )

    def _submit_all(self, done: set[int], resuming: bool) -> None:
        job, client, state = self.job, self.client, self.state
        interval = 1.0 / job.rate if job.rate else 0.0
        next_at: float | None = None  # when the next send is due; the clock starts at the first send
        unacked: list = []  # send futures since the last checkpoint
        checkpoint_at = time.monotonic() + CHECKPOINT_EVERY_S
        caught_up = not resuming
        last_line = 0
        for n, raw in _lines(job.input_path):
            if not caught_up and n > state.sent_through:
                self._catch_up()
                caught_up = True
            it = _item(n, raw, job.experiment, self.openai)
            last_line = n
            if _fingerprint(it.key) in done:
                continue
            if it.error:
                self._invalid(it)
                continue
            assert it.request is not None, "a line without an error has a request"
            if n <= state.sent_through and not job.resubmit:
                self.pending[it.request.id] = it  # in Kafka already: wait for its answer, do not send it again
                continue
            if job.stop() or not self._room():
                break  # stopped, or nothing came back for timeout_s: what is left stays for a rerun
            if interval and next_at is not None:
                delay = next_at - time.monotonic()
                if delay > 0:
                    time.sleep(delay)
                next_at = max(next_at + interval, time.monotonic() - 1.0)
            update: dict[str, Any] = {"reply_to": it.request.reply_to or self._reply_to()}
            if job.deadline is not None:
                update["deadline"] = job.deadline
            try:
                _, future = client.publish(it.request.model_copy(update=update))
            except (RequestTooLarge, ConfigError) as e:
                it.error = f"line {n}: {e}"
                self._invalid(it)
                continue
            if interval and next_at is None:
                # Only once the first send returns: it waits for the topic's metadata before stamping
                # its record, and a clock started before that wait would send the second at once.
                next_at = time.monotonic() + interval
            self.pending[it.request.id] = it
            unacked.append(future)
            self.sent += 1
            if time.monotonic() >= checkpoint_at:
                self._checkpoint(unacked, n)
                checkpoint_at = time.monotonic() + CHECKPOINT_EVERY_S
            if self.sent % 64 == 0:  # collect replies while sending, so results stream out during long submits
                self._collect(0)
        else:
            if not caught_up:
                self._catch_up()
            self._checkpoint(unacked, last_line)
            return
        self._checkpoint(unacked, last_line - 1)

    def _reply_to(self) -> str | None:
        topic = self.state.reply_topic
        return None if topic == self.job.experiment.response_topic else topic

    def _checkpoint(self, unacked: list, through: int) -> None:
        """Record that every line up to `through` is in Kafka, once Kafka says so."""
        self.client.publisher.flush()
        try:
            for future in unacked:
                future.get(timeout=30)
        except KafkaError as e:  # the state keeps the last point Kafka acknowledged
            raise BatchSendFailed(
                f"Kafka did not take a request of this job ({type(e).__name__}: {e}); rerun the same command "
                "to resume from the last acknowledged line"
            ) from e
        unacked.clear()
        self.out.sync()
        self.err.sync()
        if through > self.state.sent_through:
            self.state.sent_through = through
            self.state.save(self.job.state_path)

    def _room(self) -> bool:
        """Wait while max_pending requests are out; False once nothing has come back for timeout_s."""
        deadline = time.monotonic() + self.job.timeout_s
        while len(self.pending) >= self.job.max_pending and not self.job.stop():
            before = len(self.pending)
            self._collect(200)
            if len(self.pending) < before:
                deadline = time.monotonic() + self.job.timeout_s
            elif time.monotonic() > deadline:
                return False
        return True

    def _catch_up(self) -> None:
        """Read what arrived for this job while no run was collecting."""
        listener = self.client.listener
        ends = listener.end_offsets()
        while self.pending and not listener.caught_up(ends) and not self.job.stop():
            self._collect(200)
        log.info("resuming: %d earlier requests still wait for their results", len(self.pending))

    def _collect(self, timeout_ms: int) -> None:
        for reply in self.client.listener.poll(timeout_ms=timeout_ms):
            if isinstance(reply, Reply) and self.client.mine(reply):
                self._take(reply)
        self.out.sync()
        self.err.sync()

    def _take(self, reply: Reply) -> None:
        """Write a reply this job waits for; the first one per id wins, later duplicates are dropped."""
        it = self.pending.pop(reply.response.request_id, None)
        if it is None:
            return
        resp = reply.response
        self.last_result = time.monotonic()
        line = (
            openai_batch.output_line(it.key, resp, it.url or "")
            if self.openai
            else resp.model_dump(mode="json", exclude_none=True)
        )
        if resp.ok:
            self.ok += 1
            self.out.write(line)
        else:
            self.failed += 1
            self.err.write(line)
        if self.job.on_counts:
            self.job.on_counts(self.ok, self.failed)
        if self.progress:
            self.progress.update(self.ok + self.failed, f"sent {self.sent} ok {self.ok} failed {self.failed}")

    def _waiting(self) -> None:
        """Between results, say what the job waits for: with no worker running, nothing else would."""
        quiet = time.monotonic() - self.last_result
        if self.progress and quiet >= WAITING_AFTER_S:
            self.progress.update(
                self.ok + self.failed,
                f"sent {self.sent} ok {self.ok} failed {self.failed}; waiting for {len(self.pending)} results, "
                f"no result for {quiet:.0f}s (are {self.job.experiment.name}'s workers running?)",
            )

    def _invalid(self, it: Item) -> None:
        self.invalid += 1
        self.err.write(
            openai_batch.input_error_line(it.key, "invalid_request", it.error or "")
            if self.openai
            else {"key": it.key, "line": it.line, "error": {"code": "invalid_request", "message": it.error}}
        )


def summary_line(s: BatchSummary, out: Path) -> str:
    parts = [
        f"{s.total} lines",
        f"{s.skipped} already done",
        f"{s.submitted} submitted",
        f"{s.ok} ok",
        f"{s.failed} failed",
        f"{s.invalid} invalid",
        f"{s.missing} missing",
        f"{s.elapsed_s:.1f}s",
    ]
    return f"batch: {', '.join(parts)} -> {out}"
