"""Hooks: the variant's request and response hooks (`hooks:` in its config), run in the worker's
process around the engine, each call under the hook's time limit. A hook that raises, overruns
or returns the wrong thing gives its request an error answer and a dead letter (hook_failed)
naming the hook and what went wrong; the worker serves on. Per-hook time is a metric."""

from __future__ import annotations

import dataclasses
import functools
import importlib
import logging
import queue
import threading
import time
from collections.abc import Callable
from typing import Any

from prometheus_client import Counter, Histogram

from schemas import ConfigError, InferenceRequest
from schemas.body import GENERATE, answer_texts, with_answer_texts
from schemas.experiment import HookConfig
from workers.deadlines import Deadlines
from workers.engines.base import Completion, Refused, Rejection, Result
from workers.middleware import Middleware
from workers.runners import Done, EngineCall

log = logging.getLogger(__name__)

HOOK_BUCKETS = (0.0001, 0.0005, 0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1, 5, 30)
GATHER_S = 0.01  # static batching: hooked requests that return this close together run as one batch
OVERRUNNING_WARN = 64  # hook calls past their limit and still running, beyond which the log says so


def load_hook(path: str) -> Callable[..., Any]:
    """The callable a `module:function` names, or a one-line ConfigError."""
    module, _, name = path.partition(":")
    try:
        fn = getattr(importlib.import_module(module), name)
    except ImportError as e:
        raise ConfigError(
            f"hook {path}: cannot import {module} ({e}); is it installed in the worker's image?"
        ) from None
    except AttributeError:
        raise ConfigError(f"hook {path}: module {module} has no {name}") from None
    if not callable(fn):
        raise ConfigError(f"hook {path}: {name} is not a function")
    return fn


def _same_request(request: InferenceRequest) -> Callable[[Any], str | None]:
    """What a request hook must return: the request, changed or not, with the same id and variant
    (the engine picks a pool variant's adapter and template by the request's variant)."""

    def check(value: Any) -> str | None:
        same = isinstance(value, InferenceRequest) and (value.id, value.variant) == (request.id, request.variant)
        return None if same else "an InferenceRequest, same id and variant"

    return check


class Hooks(Middleware):
    """Runs each hook call in a thread of its own, off the worker's loop: a request enters the engine
    when its request hook returns, and is answered when its response hook returns, so a slow or
    hanging hook costs its own requests and no one else's (run one at a time on the loop, twelve
    hanging calls held another variant's request 6 s). Innermost of the middleware around the engine
    call: what the engine checks and prepares is the hooked request."""

    def __init__(self, configs: dict[str, HookConfig]):
        """configs: variant -> its hooks (a pool's variants may each have their own)."""
        self.configs = configs
        self.request_hooks = {v: load_hook(c.request) for v, c in configs.items() if c.request}
        self.response_hooks = {v: load_hook(c.response) for v, c in configs.items() if c.response}
        self._deadlines = Deadlines("abq-hook-deadlines", "a hook's time limit")
        self._lock = threading.Lock()
        self.overrunning = 0  # calls past their limit that have not returned

    def before_start(self, worker) -> None:
        self._experiment = worker.experiment.name
        labels = ("experiment", "variant", "hook")
        self.seconds = Histogram(
            "abq_hook_seconds", "Time in each hook call", labels, buckets=HOOK_BUCKETS, registry=worker.registry
        )
        self.failures = Counter(
            "abq_hook_failures",
            "Hook calls that raised, overran or returned the wrong type",
            labels,
            registry=worker.registry,
        )

    def wrap_engine(self, worker, call: EngineCall) -> EngineCall:
        engine = worker.engine
        static = engine.batching == "static"

        def hooked(requests: list[InferenceRequest], done: Done) -> None:
            done = self._answering(requests, done)
            plain = [i for i, r in enumerate(requests) if r.variant not in self.request_hooks]
            waiting = [i for i, r in enumerate(requests) if r.variant in self.request_hooks]
            if static:  # in the runner's thread: what is ready runs as a batch, the rest as their hooks return
                settled: queue.SimpleQueue[tuple[int, InferenceRequest | None]] = queue.SimpleQueue()

                def failed(i: int, e: Refused) -> None:
                    done(i, e)
                    settled.put((i, None))

                for i in waiting:
                    self._request_hook(engine, requests[i], lambda r, i=i: settled.put((i, r)),
                                       functools.partial(failed, i))  # fmt: skip
                ready, left = {i: requests[i] for i in plain}, len(waiting)
                while ready or left:
                    if not ready:  # wait for the first, then gather what settles with it
                        i, r = settled.get()
                        left -= 1
                        ready = {i: r} if r is not None else {}
                        until = time.monotonic() + GATHER_S
                        while left and (wait := until - time.monotonic()) > 0:
                            try:
                                i, r = settled.get(timeout=wait)
                            except queue.Empty:
                                break
                            left -= 1
                            if r is not None:
                                ready[i] = r
                    if ready:
                        run = sorted(ready)
                        call([ready[i] for i in run], _remap(done, run))
                        ready = {}
                return
            if plain:
                call([requests[i] for i in plain], _remap(done, plain))
            for i in waiting:  # each enters the engine when its hook returns
                self._request_hook(engine, requests[i], lambda new, i=i: call([new], _remap(done, [i])),
                                   lambda e, i=i: done(i, e))  # fmt: skip

        return hooked

    def _request_hook(self, engine, request: InferenceRequest, run, fail) -> None:
        """Calls the request's hook; run(hooked request), or fail(Refused) where it failed or the
        engine refuses what it made."""
        variant = request.variant or ""
        path = self.configs[variant].request

        def settle(ok: bool, value: Any) -> None:
            if not ok:
                fail(Refused(Rejection("hook_failed", f"request hook {path} {value}")))
            elif value is request:
                run(value)
            elif (refused := _engine_check(engine, value)) is not None:
                fail(Refused(refused))
            else:
                forget = getattr(engine, "forget", None)
                if forget is not None:
                    forget(request)  # prepared before the hook changed it: not what runs
                run(value)

        self._call(variant, "request", self.request_hooks[variant], (request,), _same_request(request), settle)

    def _answering(self, requests: list[InferenceRequest], done: Done) -> Done:
        """`done`, with each completion passed through its variant's response hook first."""
        if not self.response_hooks:
            return done

        def one(i: int, result: Result) -> None:
            r = requests[i]
            hook = self.response_hooks.get(r.variant or "")
            if hook is None or not isinstance(result, Completion) or result.error is not None or result.refused:
                done(i, result)
                return
            path = self.configs[r.variant or ""].response
            endpoint = r.endpoint or ""
            if result.body is not None and endpoint not in GENERATE:
                done(i, result)  # embeddings and scores have no text for a response hook
                return
            # An answer the engine made as an OpenAI body: the hook reads and replaces its choices' texts.
            texts = answer_texts(endpoint, result.body) if result.body is not None else list(result.outputs)

            def settle(ok: bool, value: Any) -> None:
                if ok and result.body is not None and len(value) != len(texts):
                    ok, value = False, f"returned {len(value)} texts for {len(texts)} outputs"
                if not ok:
                    done(i, Refused(Rejection("hook_failed", f"response hook {path} {value}")))
                elif result.body is not None:
                    done(i, dataclasses.replace(result, body=with_answer_texts(endpoint, result.body, value)))
                else:
                    done(i, dataclasses.replace(result, outputs=value))

            self._call(r.variant or "", "response", hook, (r, texts), _strings, settle)

        return one

    def _call(
        self,
        variant: str,
        kind: str,
        fn: Callable[..., Any],
        args: tuple,
        expected: Callable[[Any], str | None],
        settle: Callable[[bool, Any], None],
    ) -> None:
        """Runs fn(*args) in a thread of its own and settles once: (True, what it returned), or
        (False, why it failed: raised, returned the wrong thing, or overran its time limit).
        expected(value): None where the value is what the hook must return, else what that is."""
        labels, limit = (self._experiment, variant, kind), self.configs[variant].timeout_s
        t0 = time.perf_counter()
        lock = threading.Lock()
        state = {"settled": False, "overran": False}

        def once(ok: bool, value: Any) -> None:
            with lock:
                if state["settled"]:
                    return
                state["settled"] = True
            self.seconds.labels(*labels).observe(time.perf_counter() - t0)
            if not ok:
                self.failures.labels(*labels).inc()
            settle(ok, value)

        def run() -> None:
            try:
                value = fn(*args)
            except Exception as e:
                once(False, f"raised {type(e).__name__}: {str(e)[:300]}")
            else:
                want = expected(value)
                once(want is None, value if want is None else f"returned {type(value).__name__}, not {want}")
            with lock:
                returned_late = state["overran"]
            if returned_late:
                with self._lock:
                    self.overrunning -= 1

        def overrun() -> None:
            with lock:
                if state["settled"]:
                    return
                state["overran"] = True
            with self._lock:
                self.overrunning += 1
                if self.overrunning == OVERRUNNING_WARN:
                    log.error("%d hook calls ran past their time limit and have not returned", self.overrunning)
            once(False, f"took longer than {limit:g}s")

        threading.Thread(target=run, name=f"abq-hook-{kind}", daemon=True).start()
        self._deadlines.at(time.monotonic() + limit, overrun, lambda: not state["settled"])


def _strings(value: Any) -> str | None:
    return None if isinstance(value, list) and all(isinstance(x, str) for x in value) else "a list of str"


def _engine_check(engine, request: InferenceRequest) -> Rejection | None:
    try:
        return engine.check(request)
    except Exception as e:  # as EngineCheck: a tokenizer choking on one input fails that request only
        return Rejection("unsupported", f"the engine could not prepare this request: {type(e).__name__}: {e}"[:1000])


def _remap(done: Done, indices: list[int]) -> Done:
    return lambda j, result: done(indices[j], result)
