"""How many requests a continuous-batching engine is handed: sized from the engine itself.

A fixed cap far below what the engine can run leaves a GPU idle (a queue-fed vLLM on one H100
serves 4.2 req/s at 8 in flight and 40.4 at 192); a cap far above it parks requests inside the
engine, where priorities, deadlines and drains cannot reach them. So the limit follows the engine:

    limit = running + headroom,  clamped to [1, upper]

- running: what the engine's scheduler runs now (vLLM's num_running_reqs); it stops growing at
  max_num_seqs (`capacity`, which also caps the limit) or when the KV cache is full, so the limit
  stops there too;
- headroom: what the engine will take before the worker's loop comes round again, so that its
  waiting queue never runs dry while a backlog exists: twice the completions per loop period (a fast
  engine gets more), at least `min_headroom` (a slow one gets few);
- upper: --max-inflight, the bound on memory whatever the engine says.

The limit starts at `start` and, while the engine takes everything it is given and asks for more
(nothing waiting in it), doubles at each update, so a 256-slot engine is full within a few updates.
An engine that reports no queue of its own (echo) gets `upper`: there is nothing to size it from.
"""

from __future__ import annotations

import math
from collections.abc import Callable


class InflightLimit:
    def __init__(self, upper: int, min_headroom: int = 4, every_s: float = 0.02, start: int | None = None):
        self.upper = upper
        self.min_headroom = min_headroom
        self.every_s = every_s
        self.current = min(upper, start or max(min_headroom, 16))
        self.headroom = min_headroom
        self._last_at: float | None = None
        self._last_done = 0
        self._rate = 0.0  # completions per second, smoothed
        self._period = every_s  # seconds between the worker's loop iterations, smoothed
        self._loop_at: float | None = None

    def loop(self, now: float, busy: bool = True) -> None:
        """Called once per worker loop iteration: how often the worker can refill the engine. busy:
        the engine had work; a loop that waited with nothing for it is no sample of the period."""
        if self._loop_at is not None and busy:
            self._period += 0.1 * ((now - self._loop_at) - self._period)
        self._loop_at = now

    def update(self, stats: Callable[[], dict[str, float]], handed: int, completed: int, now: float) -> int:
        """The limit for now. stats: reads the engine's (running, waiting), at most every `every_s`;
        handed: requests with the engine; completed: requests it has finished since the worker started."""
        if self._last_at is not None and now - self._last_at < self.every_s:
            return self.current
        figures = stats()
        if self._last_at is not None:
            rate = (completed - self._last_done) / (now - self._last_at)
            self._rate += 0.3 * (rate - self._rate)
        self._last_at, self._last_done = now, completed
        if "running" not in figures or "waiting" not in figures:
            self.current = self.upper
            return self.current
        running = min(handed, int(figures["running"]))  # a stale figure may count requests finished since
        self.headroom = max(self.min_headroom, math.ceil(2 * self._rate * self._period))
        target = running + self.headroom
        if handed >= self.current and not figures["waiting"]:
            target = max(target, 2 * self.current)  # it took all it was given: more
        elif handed < self.current and figures["waiting"] <= self.headroom:
            target = max(target, self.current)  # not at the limit: nothing says it is too high
        if figures.get("capacity"):  # never more than it can run, and its queue
            target = min(target, int(figures["capacity"]) + self.headroom)
        self.current = max(1, min(self.upper, target))
        return self.current
