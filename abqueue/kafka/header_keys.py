"""Header keys that are not UTF-8, read as Kafka's Java client reads them instead of failing the poll.

kafka-python (3.0.x) decodes every header key strictly while it unpacks a fetched batch, inside
`poll()`. One record with such a key makes every poll raise at the same offset: a worker stops, and
its replacement stops at the same place. The Java client decodes leniently, so any producer can
write such a record. Here a key that does not decode is read with backslash escapes, and the record
gains a header UNREADABLE_HEADER_KEY holding the raw bytes, so that whoever reads it can refuse it
(the worker dead-letters it) rather than crash.
"""

from __future__ import annotations

import functools

from kafka.record.default_records import DefaultRecordBatch

UNREADABLE_HEADER_KEY = "abq-unreadable-header-key"


class _LenientSlice(bytearray):
    unreadable: list[bytes]

    def decode(self, encoding: str = "utf-8", errors: str = "strict") -> str:
        try:
            return super().decode(encoding, errors)
        except UnicodeDecodeError:
            self.unreadable.append(bytes(self))
            return super().decode(encoding, "backslashreplace")


class _LenientBuffer(bytearray):
    """A batch's bytes whose slices decode leniently and note the ones that did not decode."""

    def __init__(self, data) -> None:
        super().__init__(data)
        self.unreadable: list[bytes] = []

    def __getitem__(self, index):
        got = super().__getitem__(index)
        if not isinstance(index, slice):
            return got
        piece = _LenientSlice(got)
        piece.unreadable = self.unreadable
        return piece


def _read_msg_leniently(read_msg):
    @functools.wraps(read_msg)
    def read(self, *args, **kwargs):
        try:
            return read_msg(self, *args, **kwargs)
        except UnicodeDecodeError:
            pass
        # Rare: read this one record again from a lenient copy of the buffer (its position is unchanged).
        strict, self._buffer = self._buffer, _LenientBuffer(self._buffer)
        try:
            record = read_msg(self, *args, **kwargs)
            unreadable = self._buffer.unreadable
        finally:
            self._buffer = strict
        record.headers.extend((UNREADABLE_HEADER_KEY, raw) for raw in unreadable)
        return record

    read.abq_lenient = True
    return read


def read_unreadable_header_keys() -> None:
    """Install the lenient reading of header keys (once per process; idempotent)."""
    if not getattr(DefaultRecordBatch._read_msg, "abq_lenient", False):
        DefaultRecordBatch._read_msg = _read_msg_leniently(DefaultRecordBatch._read_msg)


def unreadable_header_keys(headers) -> list[bytes]:
    return [raw for key, raw in headers or () if key == UNREADABLE_HEADER_KEY]
