"""Running the Batch API's batches. Every gateway replica is a member of one consumer group on the
batches topic; the replica that owns a batch's partition runs it, with `abq batch`'s resumable job
(producers/batch.py): results appended and fsynced as they arrive, each line's result once, a
state file that lets the next owner resume where the last one stopped. A replica killed mid-batch
loses its partitions to the others at the group's next rebalance, and a lock on the batch's
directory keeps two owners from ever writing one batch at once."""

from __future__ import annotations

import fcntl
import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path

import orjson

from abqueue.gateway.files import Storage
from abqueue.gateway.mirror import Mirror
from abqueue.gateway.naming import batch_reply_topic
from abqueue.gateway.records import BATCHES_TOPIC, TERMINAL, BatchRecord, FileRecord, RequestCounts
from abqueue.kafka import KafkaSettings
from abqueue.kafka.acls import GATEWAY_GROUP
from producers import openai_batch
from producers.batch import BatchJob, done_keys
from schemas import ExperimentConfig
from workers.membership import MembershipWatch
from workers.transport.kafka import KafkaConsumerTransport

log = logging.getLogger(__name__)

PROGRESS_EVERY_S = 1.0  # how often a running batch's request_counts are written


class BatchRunner:
    def __init__(
        self,
        settings: KafkaSettings,
        experiments: dict[str, ExperimentConfig],
        storage: Storage,
        batches: Mirror[BatchRecord],
        files: Mirror[FileRecord],
        on_line: Callable[[str], None] = lambda result: None,
    ):
        """on_line(result): called for each line this replica finishes ("completed" or "failed")."""
        self.on_line = on_line
        self.settings, self.experiments, self.storage = settings, experiments, storage
        self.batches, self.files = batches, files
        self._owned: set[int] = set()
        self._running: dict[str, _Running] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._consumer = KafkaConsumerTransport(settings, GATEWAY_GROUP, settings.client_id, max_poll_records=1)
        self._consumer.subscribe(
            [BATCHES_TOPIC], lambda _: self.revoked(), lambda assigned: self.assigned({tp.partition for tp in assigned})
        )
        # As a worker can be (workers/membership.py), a replica left out of the group would leave its
        # share of the batches to no one.
        self.membership = MembershipWatch(self._consumer, GATEWAY_GROUP)
        batches.listen(lambda key, value: self._consider(value) if value is not None else None)
        self._thread = threading.Thread(target=self._member, name="batch-runner", daemon=True)
        self._thread.start()

    def _member(self) -> None:
        """Keeps this replica in the group (records are read by the mirror, not here)."""
        while not self._stop.is_set():
            try:
                self._consumer.poll(timeout_ms=500, max_records=1)
                self.membership.check(time.monotonic())
            except Exception as e:
                log.warning("batch runner: %s; retrying", e)
                time.sleep(1)

    def assigned(self, partitions: set[int]) -> None:
        self._consumer.pause(*self._consumer.assignment())  # membership only: the mirror reads the records
        with self._lock:
            self._owned = partitions
        for b in self.batches.values():
            self._consider(b)

    def revoked(self) -> None:
        with self._lock:
            self._owned = set()
            running = list(self._running.values())
        for r in running:  # the next owner resumes them
            r.halt.set()
        for r in running:
            r.thread.join(timeout=30)

    def _consider(self, b: BatchRecord) -> None:
        """Starts `b` if it is unfinished, in a partition this replica owns, and not running here."""
        if b.status in TERMINAL:
            return
        with self._lock:
            if self.batches.partition_of(b.id) not in self._owned or b.id in self._running:
                return
            run = _Running(self, b.id)
            self._running[b.id] = run
        run.thread.start()

    def ended(self, batch_id: str) -> None:
        with self._lock:
            self._running.pop(batch_id, None)
        # A run halted by a rebalance may end after this replica got the partition back: start it again.
        if (b := self.batches.get(batch_id)) is not None and not self._stop.is_set():
            self._consider(b)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self.revoked()
        self._consumer.close()


class _Running:
    """One batch running on this replica, in its own thread."""

    def __init__(self, runner: BatchRunner, batch_id: str):
        self.runner, self.id = runner, batch_id
        self.halt = threading.Event()  # this replica no longer owns the batch, or is stopping
        self.thread = threading.Thread(target=self._run, name=f"batch-{batch_id}", daemon=True)

    def _run(self) -> None:
        try:
            with _exclusive(self.runner.storage.batch_dir(self.id) / "lock", self.halt):
                while not self.halt.is_set():
                    try:
                        if self._serve():
                            break
                    except Exception:  # Kafka away, a full disk: the state file keeps the place
                        log.exception("batch %s stopped on an error; resuming in 5 s", self.id)
                    self.halt.wait(5)
        finally:
            self.runner.ended(self.id)

    def _record(self) -> BatchRecord:
        b = self.runner.batches.get(self.id)
        assert b is not None, f"batch {self.id} is in the mirror"
        return b

    def _put(self, **update) -> BatchRecord:
        kept = self.runner.batches.put(self.id, self._record().model_copy(update=update))
        assert kept is not None
        return kept

    def _serve(self) -> bool:
        """Runs the batch to its end; False where it must be resumed (this replica lost it, or the
        job stopped before its lines were done)."""
        b = self._record()
        if b.status in TERMINAL:
            return True
        now = int(time.time())
        source = self.runner.files.get(b.input_file_id)
        exp = self.runner.experiments.get(b.model or "")
        if source is None or exp is None:
            why = "its input file was deleted" if source is None else f"this gateway does not serve {b.model}"
            self._put(status="failed", failed_at=now, errors={"object": "list", "data": [{"code": "invalid_batch", "message": why}]})  # fmt: skip
            return True
        if b.status == "validating":
            b = self._put(status="in_progress", in_progress_at=now)
        d = self.runner.storage.batch_dir(self.id)
        out, err = d / "output.jsonl", d / "errors.jsonl"
        expires_at = b.expires_at or now
        if b.status == "finalizing":  # the last owner stopped while finalizing: finish what it began
            ended = "cancelled" if b.cancelling_at else "expired" if time.time() >= expires_at else "completed"
            self._finish(b, source, out, err, ended)
            return True
        last, seen = [0.0], [0, 0]
        before = _count(out), _count(err)  # lines an earlier run finished; this run's job counts its own

        def counts(ok: int, failed: int) -> None:
            for i, (now_n, result) in enumerate(((ok, "completed"), (failed, "failed"))):
                if now_n > seen[i]:
                    seen[i] = now_n
                    self.runner.on_line(result)
            if time.monotonic() - last[0] >= PROGRESS_EVERY_S:
                last[0] = time.monotonic()
                self._put(
                    request_counts=RequestCounts(
                        total=source.lines, completed=before[0] + ok, failed=before[1] + failed
                    )
                )

        def stop() -> bool:
            return self.halt.is_set() or self._record().status == "cancelling" or time.time() >= expires_at

        missing = True
        if not stop():
            summary = BatchJob(
                self.runner.settings, exp, self.runner.storage.path(source.path), out, err,
                timeout_s=max(1.0, expires_at - time.time()), progress=False, stop=stop, on_counts=counts,
                deadline=float(expires_at), reply_topic=batch_reply_topic(exp),
            ).run()  # fmt: skip
            missing = summary.missing > 0
        if self.halt.is_set():
            return False  # not ours any more: the next owner resumes from the state file
        b = self._record()
        if b.status == "cancelling":
            self._finish(b, source, out, err, "cancelled")
        elif not missing:
            self._finish(b, source, out, err, "completed")
        elif time.time() >= expires_at:
            _list_expired(self.runner.storage.path(source.path), out, err)
            self._finish(b, source, out, err, "expired")
        else:
            return False
        return True

    def _finish(self, b: BatchRecord, source: FileRecord, out: Path, err: Path, status: str) -> None:
        now = int(time.time())
        self._put(status="finalizing", finalizing_at=b.finalizing_at or now)
        ids = {}
        for kind, path in (("output", out), ("errors", err)):
            if not path.exists() or not path.stat().st_size:
                continue
            fid = f"file-{self.id}-{kind}"  # the same on a retry: finalizing twice registers nothing twice
            rel = str(path.relative_to(self.runner.storage.root))
            self.runner.files.put(
                fid,
                FileRecord(
                    id=fid, bytes=path.stat().st_size, created_at=now, filename=f"{self.id}_{kind}.jsonl",
                    purpose="batch_output", tenant=b.tenant, path=rel, lines=_count(path),
                ),
            )  # fmt: skip
            ids[kind] = fid
        (out.parent / "output.jsonl.state.json").unlink(missing_ok=True)
        self._put(
            status=status, output_file_id=ids.get("output"), error_file_id=ids.get("errors"),
            request_counts=RequestCounts(total=source.lines, completed=_count(out), failed=_count(err)),
            **{f"{status}_at": now},
        )  # fmt: skip
        log.info("batch %s %s", self.id, status)


def _count(path: Path) -> int:
    if not path.exists():
        return 0
    with path.open("rb") as f:
        return sum(1 for line in f if line.strip())


def _missing(source: Path, out: Path, err: Path) -> bool:
    done = done_keys(out, err)
    return any(_key(raw) not in done for raw in _lines(source))


def _list_expired(source: Path, out: Path, err: Path) -> None:
    """Every line without a result goes to the error file as batch_expired, as OpenAI's does."""
    done = done_keys(out, err)
    with err.open("ab") as f:
        for raw in _lines(source):
            if _key(raw) not in done:
                cid = orjson.loads(raw)["custom_id"]
                line = openai_batch.input_error_line(cid, "batch_expired", "This request could not be executed before the completion window expired.")  # fmt: skip
                f.write(orjson.dumps(line) + b"\n")
        f.flush()


def _lines(path: Path):
    with path.open("rb") as f:
        yield from (raw for raw in f if raw.strip())


def _key(raw: bytes) -> int:
    from producers.batch import _fingerprint

    return _fingerprint(str(orjson.loads(raw)["custom_id"]))


class _exclusive:
    """An exclusive lock on `path` (flock: released by the kernel if the process dies), waited for
    while `halt` is not set."""

    def __init__(self, path: Path, halt: threading.Event, every_s: float = 0.5):
        self.path, self.halt, self.every_s = path, halt, every_s

    def __enter__(self):
        self.f = self.path.open("a")
        while not self.halt.is_set():
            try:
                fcntl.flock(self.f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return self
            except BlockingIOError:
                self.halt.wait(self.every_s)
        return self

    def __exit__(self, *exc):
        self.f.close()  # releases the lock
