"""One engine call's requests, each answered exactly once, by the engine or by whoever answers first
in its stead (the engine's time limit, a cancel)."""

from __future__ import annotations

import threading

from workers.runners import Done


class CallAnswers:
    """One engine call's requests until each is answered once (by the engine or by the deadline).
    Once all are, it lets go of them and of the runner's callback, which holds the call's messages:
    the deadline waiting in the heap holds nothing large."""

    def __init__(self, requests: list, done: Done):
        self.requests: list | None = requests
        self.answered = [False] * len(requests)
        self.left = len(requests)
        self._done: Done | None = done
        self._lock = threading.Lock()

    def answer(self, i: int, result) -> bool:
        with self._lock:
            if self.answered[i]:
                return False
            self.answered[i] = True
            self.left -= 1
            done = self._done
            if not self.left:
                self.requests, self._done = None, None
        assert done is not None, "a call with a request unanswered keeps its callback"
        done(i, result)
        return True
