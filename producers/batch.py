"""Bulk jobs: JSONL in (our request lines or OpenAI Batch lines), JSONL results out as they arrive,
failures to a separate file, a rate limit, progress, and resume by rerunning the same command."""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import orjson
from pydantic import ValidationError

from abqueue.errors import AbqError
from abqueue.kafka import KafkaSettings
from producers import openai_batch
from producers.client import AbqClient
from producers.progress import Progress
from producers.publisher import RequestTooLarge
from producers.replies import Reply
from schemas import ExperimentConfig, InferenceRequest
from schemas.codec import describe

log = logging.getLogger(__name__)


class BatchInputError(AbqError, ValueError):
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


def read_items(path: Path, experiment: ExperimentConfig) -> tuple[list[Item], bool]:
    """Parse every line up front. Returns the items and whether the file uses OpenAI Batch lines."""
    items: list[Item] = []
    fmt_openai: bool | None = None
    with path.open("rb") as f:
        for n, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            fallback_key = f"line-{n}-{hashlib.sha256(raw.strip()).hexdigest()[:12]}"
            try:
                obj = orjson.loads(raw)
            except orjson.JSONDecodeError as e:
                items.append(Item(n, fallback_key, error=f"line {n} is not JSON: {e}"))
                continue
            if not isinstance(obj, dict):
                items.append(Item(n, fallback_key, error=f"line {n} is not a JSON object"))
                continue
            is_openai = openai_batch.is_openai_line(obj)
            if fmt_openai is None:
                fmt_openai = is_openai
            elif is_openai != fmt_openai:
                items.append(
                    Item(
                        n,
                        str(obj.get("custom_id") or obj.get("id") or fallback_key),
                        error=f"line {n} mixes formats: the file started with {'OpenAI Batch' if fmt_openai else 'abqueue request'} lines",
                    )
                )
                continue
            try:
                if is_openai:
                    key, url = str(obj["custom_id"]), obj.get("url")
                    fields = openai_batch.to_request_fields(obj)
                else:
                    # Lines without an id get one derived from their content, so a rerun matches them.
                    key, url = str(obj.get("id") or fallback_key), None
                    fields = {**obj, "id": key}
                    fields.setdefault("routing_key", key)
                fields.setdefault("experiment", experiment.name)
                fields.setdefault("priority", "batch")  # bulk work yields to interactive traffic
                items.append(Item(n, key, InferenceRequest.model_validate(fields), url))
            except openai_batch.UnsupportedLine as e:
                items.append(Item(n, str(obj.get("custom_id")), url=obj.get("url"), error=f"line {n}: {e}"))
            except ValidationError as e:
                items.append(Item(n, key, url=url, error=f"line {n}: {describe(e, whole='(line)')}"))
    seen: dict[str, list[int]] = {}
    for it in items:
        seen.setdefault(it.key, []).append(it.line)
    dupes = {k: v for k, v in seen.items() if len(v) > 1}
    if dupes:
        shown = "; ".join(f"{k!r} on lines {', '.join(map(str, v))}" for k, v in list(dupes.items())[:5])
        more = f" (and {len(dupes) - 5} more)" if len(dupes) > 5 else ""
        raise BatchInputError(f"{path}: duplicate ids: {shown}{more}; every line needs its own id")
    return items, bool(fmt_openai)


def done_keys(*paths: Path) -> set[str]:
    keys: set[str] = set()
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
                    keys.add(str(key))
    return keys


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
    ):
        self.settings, self.experiment = settings, experiment
        self.input_path, self.out_path = Path(input_path), Path(out_path)
        self.errors_path = (
            Path(errors_path) if errors_path else self.out_path.with_name(self.out_path.stem + ".errors.jsonl")
        )
        self.state_path = self.out_path.with_name(self.out_path.name + ".state.json")
        self.rate, self.timeout_s, self.reply_topic = rate, timeout_s, reply_topic
        self.show_progress = progress

    def _load_state(self) -> dict[int, int] | None:
        if not self.state_path.exists():
            return None
        state = json.loads(self.state_path.read_text())
        return {int(p): int(o) for p, o in state.get("start_offsets", {}).items()}

    def run(self) -> BatchSummary:
        t0 = time.monotonic()
        items, openai_fmt = read_items(self.input_path, self.experiment)
        done = done_keys(self.out_path, self.errors_path)
        todo = [it for it in items if it.key not in done]
        skipped = len(items) - len(todo)
        invalid = [it for it in todo if it.error]
        todo = [it for it in todo if not it.error]
        self.out_path.parent.mkdir(parents=True, exist_ok=True)
        out = self.out_path.open("ab")
        err = self.errors_path.open("ab")

        def write(f, obj: dict) -> None:
            f.write(orjson.dumps(obj) + b"\n")
            f.flush()  # a result that arrived is on disk before we move on: nothing to lose on a crash

        def write_invalid(it: Item) -> None:
            line = (
                openai_batch.input_error_line(it.key, "invalid_request", it.error or "")
                if openai_fmt
                else {"key": it.key, "line": it.line, "error": {"code": "invalid_request", "message": it.error}}
            )
            write(err, line)

        for it in invalid:
            write_invalid(it)

        by_id = {it.request.id: it for it in todo if it.request is not None}
        ok = failed = 0

        def on_reply(reply: Reply) -> None:
            nonlocal ok, failed
            it = by_id[reply.response.request_id]
            resp = reply.response
            line = (
                openai_batch.output_line(it.key, resp, it.url or "")
                if openai_fmt
                else resp.model_dump(mode="json", exclude_none=True)
            )
            if resp.ok:
                ok += 1
                write(out, line)
            else:
                failed += 1
                write(err, line)

        pending = set(by_id)
        progress = Progress(len(todo), "batch") if self.show_progress else None
        sent = 0

        def take(reply: Reply) -> None:
            """Write a reply we wait for; the first one per id wins, later duplicates are dropped."""
            if reply.response.request_id in pending:
                pending.discard(reply.response.request_id)
                on_reply(reply)
                if progress:
                    progress.update(ok + failed, f"sent {sent} ok {ok} failed {failed}")

        client = AbqClient(self.settings, self.experiment, self.reply_topic, start_offsets=self._load_state())
        try:
            if not self.state_path.exists():
                # Where the responses topic stood before anything was sent: a rerun reads from here
                # and so collects the responses that arrived while this command was not running.
                self.state_path.write_text(
                    json.dumps({"reply_topic": client.listener.topic, "start_offsets": client.listener.positions()})
                )
            else:
                ends = client.listener.end_offsets()
                while pending and not client.listener.caught_up(ends):
                    for reply in client.listener.poll(timeout_ms=200):
                        take(reply)
                if skipped or len(by_id) != len(pending):
                    log.info(
                        "resuming: %d results already written, %d collected since", skipped, len(by_id) - len(pending)
                    )
            to_send = [by_id[i] for i in by_id if i in pending]
            interval = 1.0 / self.rate if self.rate else 0.0
            next_at = time.monotonic()
            for it in to_send:
                if interval:
                    delay = next_at - time.monotonic()
                    if delay > 0:
                        time.sleep(delay)
                    next_at = max(next_at + interval, time.monotonic() - 1.0)
                assert it.request is not None, "only parsed lines are sent"
                try:
                    client.publisher.publish(it.request)
                    sent += 1
                except RequestTooLarge as e:
                    pending.discard(it.request.id)
                    it.error = f"line {it.line}: {e}"
                    invalid.append(it)
                    write_invalid(it)
                if sent % 64 == 0:  # collect replies while sending, so results stream out during long submits
                    for reply in client.listener.poll(timeout_ms=0):
                        take(reply)
            client.publisher.flush()
            client.wait(set(pending), self.timeout_s, on_reply=take)
        finally:
            client.close()
            out.close()
            err.close()
        if progress:
            progress.finish(ok + failed, f"ok {ok} failed {failed} missing {len(pending)}")
        if not pending:
            self.state_path.unlink(missing_ok=True)
        return BatchSummary(
            total=len(items),
            skipped=skipped,
            submitted=sent,
            ok=ok,
            failed=failed,
            invalid=len(invalid),
            missing=len(pending),
            elapsed_s=time.monotonic() - t0,
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
