"""Progressive rollout: move a candidate's weight through stages while guardrails hold, roll back to
0% the moment one breaks, and keep the state in Kafka so the controller survives its own restart.

State lives in a compacted topic (key = experiment). The controller is the only writer of stage
changes; `pause`, `resume` and `abort` write a request the controller acts on at its next tick.
Guardrails are judged on the responses enqueued since the stage began, by always-valid tests
(they are looked at every tick; see `breach`):
  - the candidate's error rate (errors and expirations) at most `max_error_rate`, and at most
    `max_error_increase` above the control's;
  - the candidate's p95 latency at most `max_p95_ratio` x the control's;
  - a stage advances only after `stage_duration_s` and with at least `min_samples` responses of
    each; a breach needs `min_samples` of the candidate too.
"""

from __future__ import annotations

import logging
import math
import os
import random
import socket
import time
from typing import Literal

from kafka import TopicPartition
from pydantic import BaseModel, ConfigDict, Field

from abqueue.analysis import sequential, stats
from abqueue.analysis.stats import percentile
from abqueue.analysis.tally import RecentIds, answer_key
from abqueue.control import live_config
from abqueue.control.store import KeyedStore, StoreTail
from abqueue.kafka import KafkaSettings, consumer
from producers.assignment import weight_shares
from schemas import ConfigError, ExperimentConfig, InferenceResponse

log = logging.getLogger(__name__)

ROLLOUT_TOPIC = "abq.rollouts"
Status = Literal["running", "paused", "completed", "rolled_back", "aborted"]
# What a user reads: a status in words, never the stored name.
IN_WORDS = {"running": "running", "paused": "paused", "completed": "completed", "rolled_back": "rolled back", "aborted": "aborted"}  # fmt: skip


class Guardrails(BaseModel):
    """Each is an always-valid test (abqueue/analysis/sequential.py), checked every tick: together
    they roll back a candidate no worse than its limits with a chance of at most `alpha`, however
    long the stage is watched."""

    model_config = ConfigDict(extra="forbid")

    max_error_rate: float = Field(default=0.05, ge=0, le=1, description="the candidate's error rate, at most")
    max_error_increase: float = Field(
        default=0.02, ge=0, le=1, description="the candidate's error rate over the control's, at most"
    )
    max_p95_ratio: float = Field(default=1.5, gt=0, description="the candidate's p95 latency over the control's")
    min_samples: int = Field(default=200, ge=1)
    alpha: float = Field(default=0.05, gt=0, lt=1, description="false rollback rate, split over the three tests")


class RolloutState(BaseModel):
    model_config = ConfigDict(extra="forbid")

    experiment: str
    candidate: str
    control: str
    stages: list[float]
    stage_duration_s: float
    guardrails: Guardrails
    stage: int = 0  # index into stages
    stage_started_at: float = 0.0
    status: Status = "running"
    requested: Literal["pause", "resume", "abort"] | None = None
    # When the last command acted on was given; a new rollout ignores commands given before it began.
    command_at: float = Field(default_factory=time.time)
    reason: str | None = None
    history: list[str] = Field(default_factory=list)


class RolloutCommand(BaseModel):
    """An operator's pause, resume or abort. Kept under a key of its own, so that the controller's
    saves of its state (stage changes) can never overwrite a command given meanwhile."""

    model_config = ConfigDict(extra="forbid")

    what: Literal["pause", "resume", "abort"]
    at: float


class RolloutHeartbeat(BaseModel):
    """What a running controller sees, put every few seconds under a key of its own: commands and
    `status` know from it whether a controller is alive, and show the stage's numbers."""

    model_config = ConfigDict(extra="forbid")

    at: float
    controller: str  # host-pid
    stage: int
    stage_ends_at: float
    samples: dict[str, int] = Field(default_factory=dict)
    error_rate: dict[str, float] = Field(default_factory=dict)
    p95_s: dict[str, float] = Field(default_factory=dict)


ROLLOUTS: KeyedStore[RolloutState] = KeyedStore(ROLLOUT_TOPIC, RolloutState)
COMMANDS: KeyedStore[RolloutCommand] = KeyedStore(ROLLOUT_TOPIC, RolloutCommand)
HEARTBEATS: KeyedStore[RolloutHeartbeat] = KeyedStore(ROLLOUT_TOPIC, RolloutHeartbeat)
HEARTBEAT_EVERY_S = 5.0
HEARTBEAT_STALE_S = 20.0  # a controller not heard from for this long is taken for gone


def _command_key(experiment: str) -> str:
    return f"{experiment}/command"


def _heartbeat_key(experiment: str) -> str:
    return f"{experiment}/heartbeat"


def heartbeat(settings: KafkaSettings, experiment: str) -> RolloutHeartbeat | None:
    return HEARTBEATS.latest(settings, _heartbeat_key(experiment))


def alive(beat: RolloutHeartbeat | None, now: float | None = None) -> bool:
    return beat is not None and (now or time.time()) - beat.at < HEARTBEAT_STALE_S


def load_state(settings: KafkaSettings, experiment: str) -> RolloutState | None:
    return ROLLOUTS.latest(settings, experiment)  # no topic yet reads as no rollout


def save_state(settings: KafkaSettings, state: RolloutState) -> None:
    ROLLOUTS.put(settings, state.experiment, state)


def with_weight(exp: ExperimentConfig, candidate: str, control: str, percent: float) -> ExperimentConfig:
    """The candidate at `percent`, the control absorbing the difference, other variants untouched."""
    others = sum(v.weight for v in exp.variants if v.name not in (candidate, control))
    if percent + others > 100:
        raise ConfigError(f"stage {percent}% plus the other variants' {others}% exceeds 100%")
    weights = {candidate: round(percent, 2), control: round(100 - others - percent, 2)}
    return ExperimentConfig.model_validate(
        {
            **exp.model_dump(),
            "variants": [{**v.model_dump(), "weight": weights.get(v.name, v.weight)} for v in exp.variants],
        }
    )


# Beyond the slowest answer seen (twice it), how long a user's answers may take to reach the controller.
SETTLE_S = 1.0
# Latencies kept per variant and stage: the p95 guardrail's test on a uniform sample this large is
# valid and about as strong as on all of them, and a long stage's memory does not grow.
LATENCY_SAMPLE = 50_000


class StageStats:
    """Responses of the current stage, read from the responses topic as they come."""

    def __init__(self, settings: KafkaSettings, exp: ExperimentConfig, since: float, version: int | None = None):
        """version: the live config version the stage set; its weights-assigned users are counted
        per variant for the sample-ratio check."""
        self._counting(since, version)
        self._c = consumer(settings, group_id=None, isolation_level="read_committed")
        tps = [
            TopicPartition(exp.response_topic, p)
            for p in sorted(self._c.partitions_for_topic(exp.response_topic) or ())
        ]
        self._c.assign(tps)
        starts = self._c.offsets_for_times({tp: int(since * 1000) for tp in tps})
        for tp in tps:
            if starts.get(tp) is not None:
                self._c.seek(tp, starts[tp].offset)
            else:
                self._c.seek_to_end(tp)

    def _counting(self, since: float, version: int | None) -> None:
        """Memory stays bounded however long the stage runs: latencies are a uniform sample of
        LATENCY_SAMPLE per variant beside exact counts, and requests are remembered for the
        duplicate check as a report's are (two generations)."""
        self.since, self.version = since, version
        self.latency: dict[str, list[float]] = {}  # per variant: a uniform sample of the answered requests' latencies
        self.answered: dict[str, int] = {}
        self.errors: dict[str, int] = {}
        self.units: dict[str, dict[str, float]] = {}  # variant -> unit -> when its first request was published
        self.slowest_s = 0.0  # the longest a stage's request took to be answered, so far
        self._seen = RecentIds()
        self._rng = random.Random(0)

    def poll(self, most_s: float = 5.0) -> None:
        """Reads every response that has arrived (a poll brings at most 500; above 500 responses a
        second one poll per tick would fall ever further behind), for at most `most_s` a tick."""
        until, wait_ms = time.monotonic() + most_s, 100
        while batch := self._c.poll(timeout_ms=wait_ms):
            self._take([r for recs in batch.values() for r in recs])
            if time.monotonic() > until:
                break
            wait_ms = 0

    def _take(self, records) -> None:
        for r in records:
            try:
                resp = InferenceResponse.model_validate_json(r.value)
            except ValueError:
                continue
            if resp.timings.enqueued < self.since or not resp.counts_for_variant:
                continue
            if not self._seen.first((*answer_key(resp), resp.variant)):  # the same request answered again
                continue
            t = resp.timings
            self.slowest_s = max(self.slowest_s, t.finished - t.enqueued)
            if self.version is not None and resp.config_version == self.version and resp.assigned_by == "weights":
                units = self.units.setdefault(resp.variant, {})
                unit = resp.unit or resp.request_id
                units[unit] = min(units.get(unit, t.enqueued), t.enqueued)
            sample = self.latency.setdefault(resp.variant, [])
            if resp.ok:
                n = self.answered[resp.variant] = self.answered.get(resp.variant, 0) + 1
                latency = resp.timings.finished - resp.timings.enqueued
                if len(sample) < LATENCY_SAMPLE:
                    sample.append(latency)
                elif (i := self._rng.randrange(n)) < LATENCY_SAMPLE:  # reservoir sampling (Algorithm R)
                    sample[i] = latency
            else:
                self.errors[resp.variant] = self.errors.get(resp.variant, 0) + 1

    def settled_units(self, now: float) -> dict[str, int]:
        """Users per variant whose first request came long enough ago for every variant to have
        answered it: counted as their answers arrived, a slow variant's users would fall short of its
        share while on their way, and look like requests it drops."""
        cutoff = now - SETTLE_S - 2 * self.slowest_s
        return {name: sum(at <= cutoff for at in units.values()) for name, units in self.units.items()}

    def count(self, variant: str) -> int:
        return self.answered.get(variant, 0) + self.errors.get(variant, 0)

    def error_rate(self, variant: str) -> float:
        n = self.count(variant)
        return self.errors.get(variant, 0) / n if n else 0.0

    def p95(self, variant: str) -> float:
        return percentile(self.latency.get(variant, []), 95)

    def close(self) -> None:
        self._c.close()


P95_SHARE = 0.05  # of the control's requests are slower than its p95, by definition


def breach(
    g: Guardrails,
    cand_lat: list[float],
    cand_err: int,
    ctl_lat: list[float],
    ctl_err: int,
    stage: str = "",
    counts: tuple[int, int] | None = None,
) -> str | None:
    """Why the candidate breaks a guardrail, or None while the evidence allows that it does not.
    Three always-valid tests at alpha/3 each: its error rate above `max_error_rate`; its error rate
    above the control's by more than `max_error_increase`; and its p95 above `max_p95_ratio` times
    the control's, which is tested as the share of its requests slower than that: more than 5%
    exactly when its p95 is beyond it. counts: the candidate's and control's responses, where the
    latencies are a sample of their answers (else all of them)."""
    n_c, n_k = counts or (len(cand_lat) + cand_err, len(ctl_lat) + ctl_err)
    if n_c < g.min_samples:
        return None
    a = g.alpha / 3
    rate = cand_err / n_c
    if sequential.above(rate, sequential.rate_se(cand_err, n_c, g.max_error_rate), g.max_error_rate, a, tau=0.05):
        return f"error rate {rate:.1%} over {n_c} responses is above the guardrail {g.max_error_rate:.1%}{stage}"
    if n_k < g.min_samples:
        return None
    ctl_rate = ctl_err / n_k
    floor = min(0.5, ctl_rate + g.max_error_increase)
    se = math.sqrt(sequential.rate_se(cand_err, n_c, floor) ** 2 + sequential.rate_se(ctl_err, n_k, ctl_rate) ** 2)
    if sequential.above(rate - ctl_rate, se, g.max_error_increase, a, tau=0.05):
        return (
            f"error rate {rate:.1%} is above the control's {ctl_rate:.1%} by more than the guardrail "
            f"{g.max_error_increase:.1%} (over {n_c} and {n_k} responses){stage}"
        )
    if cand_lat and len(ctl_lat) >= g.min_samples:
        limit = g.max_p95_ratio * percentile(ctl_lat, 95)
        slow = sum(1 for x in cand_lat if x > limit)
        share = slow / len(cand_lat)
        if sequential.above(share, sequential.rate_se(slow, len(cand_lat), P95_SHARE), P95_SHARE, a, tau=0.05):
            return (
                f"p95 latency of {percentile(cand_lat, 95):.3f}s is above {g.max_p95_ratio:g}x the control's "
                f"{percentile(ctl_lat, 95):.3f}s ({share:.1%} of its requests slower than {limit:.3f}s){stage}"
            )
    return None


def sample_ratio_halt(
    state: RolloutState, st: StageStats, weights: ExperimentConfig, now: float | None = None
) -> str | None:
    """Why the stage must halt on a sample-ratio mismatch, or None: the users its config version
    assigned by the weights do not split as those weights say (p < 0.001), once the candidate's
    share should hold at least `min_samples` of them. The guardrails cannot see this: a variant
    that drops requests loses them without a single error."""
    shares = weight_shares(weights)
    observed = st.settled_units(time.time() if now is None else now)
    if sum(observed.values()) * shares.get(state.candidate, 0) < state.guardrails.min_samples:
        return None
    stray = {name: n for name, n in observed.items() if shares.get(name, 0) == 0}
    result = stats.sample_ratio(observed, shares)
    if not stray and (result is None or not result.mismatch):
        return None
    expected = {k: round(v) for k, v in (result.expected if result else {}).items()}
    return (
        f"sample ratio mismatch at stage {state.stages[state.stage]:g}%: users {observed}, the weights expect "
        f"{expected} (p={result.p_value if result else 0:.2g}); a variant may be dropping requests or the "
        "assignment is broken. Find the cause, then `abq rollout resume` (or abort)"
    )


def beyond(g: Guardrails, st: StageStats, cand: str, ctl: str) -> str | None:
    """Which guardrail the candidate's point estimates are beyond, if any: a stage does not advance
    on them, though only the always-valid tests roll it back."""
    rate, ctl_rate = st.error_rate(cand), st.error_rate(ctl)
    if rate > g.max_error_rate:
        return f"error rate {rate:.1%} above {g.max_error_rate:.1%}"
    if st.count(ctl) and rate - ctl_rate > g.max_error_increase:
        return f"error rate {rate:.1%} above the control's {ctl_rate:.1%} by more than {g.max_error_increase:.1%}"
    if st.latency.get(cand) and st.latency.get(ctl) and st.p95(cand) > g.max_p95_ratio * st.p95(ctl):
        return f"p95 ratio {st.p95(cand) / st.p95(ctl):.2f} above {g.max_p95_ratio:g}"
    return None


def verdict(state: RolloutState, st: StageStats, now: float) -> tuple[str, str]:
    """('advance' | 'rollback' | 'wait', why)."""
    g, cand, ctl = state.guardrails, state.candidate, state.control
    n_c, n_k = st.count(cand), st.count(ctl)
    stage = f" at stage {state.stages[state.stage]:g}%"
    why = breach(
        g, st.latency.get(cand, []), st.errors.get(cand, 0), st.latency.get(ctl, []), st.errors.get(ctl, 0), stage,
        counts=(n_c, n_k),
    )  # fmt: skip
    if why is not None:
        return "rollback", f"{cand}: {why}"
    if now - state.stage_started_at < state.stage_duration_s:
        return "wait", "stage time not over"
    if n_c < g.min_samples or (n_k < g.min_samples and state.stages[state.stage] < 100):
        return "wait", f"{n_c} candidate and {n_k} control responses; {g.min_samples} of each needed"
    if (doubt := beyond(g, st, cand, ctl)) is not None:
        # Not evidence enough to roll back, but no reason to give it more traffic either.
        return "wait", f"{doubt}, not yet conclusive over {n_c} responses: the stage waits for more"
    return "advance", (
        f"guardrails held over {n_c} candidate responses (error rate {st.error_rate(cand):.1%}, "
        f"p95 ratio {st.p95(cand) / st.p95(ctl) if n_k else float('nan'):.2f})"
    )


class RolloutController:
    def __init__(
        self,
        settings: KafkaSettings,
        state: RolloutState,
        base: ExperimentConfig,
        tick_s: float = 1.0,
        progress=None,
        progress_every_s: float = 10.0,
    ):
        """progress: called with one line about the stage at its first check and every
        `progress_every_s` after (`abq rollout start` prints it)."""
        self.settings, self.state, self.base, self.tick_s = settings, state, base, tick_s
        self._stats: StageStats | None = None
        self._weights: ExperimentConfig | None = None  # what the stage set, and its config version
        self._version: int | None = None
        self._progress, self._progress_every_s = progress, progress_every_s
        self._said_at = self._beat_at = float("-inf")
        self._name = f"{socket.gethostname()}-{os.getpid()}"
        self._commands: StoreTail[RolloutCommand] | None = None

    def _report(self, now: float, why: str) -> None:
        st, state = self._stats, self.state
        if st is None:
            return
        variants = (state.candidate, state.control)
        beat = RolloutHeartbeat(
            at=now, controller=self._name, stage=state.stage,
            stage_ends_at=state.stage_started_at + state.stage_duration_s,
            samples={v: st.count(v) for v in variants},
            error_rate={v: st.error_rate(v) for v in variants},
            p95_s={v: p for v in variants if (p := st.p95(v)) == p},  # nan (no samples) left out
        )  # fmt: skip
        if now - self._beat_at >= HEARTBEAT_EVERY_S:
            self._beat_at = now
            HEARTBEATS.put(self.settings, _heartbeat_key(state.experiment), beat)
        if self._progress and now - self._said_at >= self._progress_every_s:
            self._said_at = now
            stage = f"stage {state.stage + 1}/{len(state.stages)} ({state.stages[state.stage]:g}%): "
            self._progress(
                stage + stage_numbers(state, beat, now) + ("" if why == "stage time not over" else f"; {why}")
            )

    def _set_weight(self, percent: float, why: str) -> None:
        live = live_config.current(self.settings, self.base.name)
        exp = live.experiment if live else self.base
        weights = with_weight(exp, self.state.candidate, self.state.control, percent)
        record = live_config.apply(self.settings, weights, comment=why)
        self._weights, self._version = weights, record.version

    def _enter_stage(self, now: float) -> None:
        pct = self.state.stages[self.state.stage]
        self._set_weight(
            pct, f"rollout stage {self.state.stage + 1}/{len(self.state.stages)}: {self.state.candidate} at {pct:g}%"
        )
        self.state.stage_started_at = now
        self.state.history.append(f"{time.strftime('%H:%M:%S')} stage {pct:g}%")
        save_state(self.settings, self.state)
        self._restart_stats()

    def _restart_stats(self) -> None:
        if self._stats:
            self._stats.close()
        if self._weights is None:  # resumed after a restart: the stage's weights are the live ones
            live = live_config.current(self.settings, self.base.name)
            if live is not None:
                self._weights, self._version = live.experiment, live.version
        self._stats = StageStats(self.settings, self.base, self.state.stage_started_at, self._version)

    def _finish(self, status: Status, reason: str, percent: float | None) -> None:
        if percent is not None:
            self._set_weight(percent, f"rollout {IN_WORDS[status]}: {reason}")
        self.state.status, self.state.reason = status, reason
        self.state.history.append(f"{time.strftime('%H:%M:%S')} {IN_WORDS[status]}: {reason}")
        save_state(self.settings, self.state)
        log.warning(
            "rollout of %s %s: %s", self.state.candidate, IN_WORDS[status], reason
        ) if status != "completed" else log.info("rollout of %s completed", self.state.candidate)

    def run(self, until=lambda: False) -> RolloutState:
        if self.state.stage_started_at == 0:
            self._enter_stage(time.time())
        else:
            self._restart_stats()  # resumed after a restart: the stage's responses are read again
        key = _command_key(self.state.experiment)
        self._commands = COMMANDS.tail(self.settings, {key})
        try:
            return self._run(until, key)
        finally:
            self._commands.close()
            if self._stats:
                self._stats.close()

    def _run(self, until, key: str) -> RolloutState:
        assert self._commands is not None
        while self.state.status in ("running", "paused") and not until():
            time.sleep(self.tick_s)
            command = self._commands.latest(key)
            if command is not None and command.at > self.state.command_at:
                self.state.requested, self.state.command_at = command.what, command.at
            req = self.state.requested
            if req == "abort":
                self._finish("aborted", "aborted by an operator", 0.0)
                break
            if req == "pause" and self.state.status == "running":
                self.state.status = "paused"
                save_state(self.settings, self.state)
            if req == "resume" and self.state.status == "paused":
                self.state.status, self.state.requested = "running", None
                self.state.stage_started_at = time.time()  # the stage's clock starts again
                save_state(self.settings, self.state)
                self._restart_stats()
            assert self._stats is not None
            self._stats.poll()
            if self.state.status == "paused":
                self._report(time.time(), "paused")
                continue
            if self._weights is not None and (halt := sample_ratio_halt(self.state, self._stats, self._weights)):
                self.state.status, self.state.requested, self.state.reason = "paused", None, halt
                self.state.history.append(f"{time.strftime('%H:%M:%S')} halted: {halt}")
                save_state(self.settings, self.state)
                log.warning("rollout of %s halted: %s", self.state.candidate, halt)
                if self._progress:
                    self._progress(f"halted: {halt}")
                continue
            action, why = verdict(self.state, self._stats, time.time())
            self._report(time.time(), why)
            if action == "rollback":
                self._finish("rolled_back", why, 0.0)
            elif action == "advance":
                if self.state.stage + 1 >= len(self.state.stages):
                    self._finish("completed", why, None)
                else:
                    self.state.history.append(f"{time.strftime('%H:%M:%S')} advance: {why}")
                    self.state.stage += 1
                    self._enter_stage(time.time())
        return self.state


def stage_numbers(state: RolloutState, beat: RolloutHeartbeat, now: float) -> str:
    """The stage as a controller sees it: samples, guardrail values and time left (for `start`'s
    progress lines and `status`)."""
    g, cand, ctl, p95 = state.guardrails, state.candidate, state.control, beat.p95_s
    ratio = f"{p95[cand] / p95[ctl]:.2f}" if cand in p95 and ctl in p95 and p95[ctl] else "n/a"
    return (
        f"{cand} {beat.samples.get(cand, 0)}/{g.min_samples} samples, {ctl} {beat.samples.get(ctl, 0)}; "
        f"error rate {beat.error_rate.get(cand, 0.0):.1%} (max {g.max_error_rate:.1%}), p95 ratio {ratio} "
        f"(max {g.max_p95_ratio:g}); {human_duration(max(0.0, beat.stage_ends_at - now))} left in the stage"
    )


def human_duration(seconds: float) -> str:
    m, s = divmod(int(seconds), 60)
    return f"{m // 60}h{m % 60:02d}m" if m >= 60 else f"{m}m{s:02d}s"


def request(settings: KafkaSettings, experiment: str, what: Literal["pause", "resume", "abort"]) -> RolloutState:
    state = load_state(settings, experiment)
    if state is None or state.status not in ("running", "paused"):
        raise ConfigError(f"no rollout of {experiment} is running; `abq rollout start` begins one")
    COMMANDS.put(settings, _command_key(experiment), RolloutCommand(what=what, at=time.time()))
    return state


def abort_here(settings: KafkaSettings, state: RolloutState, reason: str) -> RolloutState:
    """Abort with no controller alive to do it: the candidate back to 0% and the state aborted."""
    live = live_config.current(settings, state.experiment)
    if live is not None:
        live_config.apply(
            settings,
            with_weight(live.experiment, state.candidate, state.control, 0.0),
            comment=f"rollout aborted: {reason}",
        )
    state = state.model_copy(update={"status": "aborted", "reason": reason, "requested": None})
    state.history.append(f"{time.strftime('%H:%M:%S')} aborted: {reason}")
    save_state(settings, state)
    return state
