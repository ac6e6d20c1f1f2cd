"""A progress line on stderr for long work: redrawn in place on a terminal, a line every few seconds otherwise."""

from __future__ import annotations

import sys
import time


class Progress:
    def __init__(self, total: int, label: str, stream=None, every_s: float | None = None):
        self.total, self.label = total, label
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()
        self.every_s = every_s if every_s is not None else (0.2 if self.tty else 5.0)
        self.start = time.monotonic()
        self._last = 0.0

    def update(self, done: int, detail: str = "", force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._last < self.every_s:
            return
        self._last = now
        elapsed = now - self.start
        pct = 100.0 * done / self.total if self.total else 100.0
        width = 24
        filled = int(width * pct / 100)
        bar = "#" * filled + "-" * (width - filled)
        rate = done / elapsed if elapsed > 0 else 0.0
        line = f"{self.label} [{bar}] {done}/{self.total} {pct:5.1f}% {rate:7.1f}/s {elapsed:6.1f}s {detail}"
        if self.tty:
            self.stream.write("\r" + line.ljust(100))
        else:
            self.stream.write(line + "\n")
        self.stream.flush()

    def finish(self, done: int, detail: str = "") -> None:
        self.update(done, detail, force=True)
        if self.tty:
            self.stream.write("\n")
