"""What `abq report` keeps of an experiment's responses as they stream past, in memory bounded by the
number of variants, not of responses: per variant, counts, moments (with the prompt-length covariates
for the regression adjustment), a quantile sketch and a fixed-size uniform sample of each measure
for the bootstrap; a sample of units, chosen by hash, for the sample-ratio check; and the recent
requests, to count an at-least-once duplicate once.

A request is known by its caller's tag and its id together (`answer_key`): ids are the callers' own,
and two callers (two batch jobs numbering lines 1..N) may use the same ones.

Values are buffered and folded in a chunk at a time with numpy: per response the Python work is a
few appends."""

from __future__ import annotations

import hashlib
import math
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np

from abqueue.analysis import stats
from schemas import ExperimentConfig, Feedback, InferenceResponse
from schemas.body import NO_BODY

CHUNK = 10_000  # answered requests buffered per group before their values are folded in
SKETCH_ACCURACY = 0.005  # every percentile beyond the exact range is within 0.5% of the true value
UNIT_SAMPLE = 1_000_000  # units kept for the sample-ratio check; beyond, a hash-chosen half at a time
RECENT_IDS = 1_000_000  # request ids remembered to drop duplicates (two generations of this many)


class Sketch:
    """DDSketch (Masson, Rim and Lee, VLDB 2019): counts in logarithmic buckets, so that every
    percentile is within SKETCH_ACCURACY of the true value, relatively, and its size is bounded by
    the range of the values (a few thousand buckets from microseconds to hours), not their number.
    Percentiles are nearest-rank, as stats.percentile's."""

    def __init__(self, accuracy: float = SKETCH_ACCURACY):
        self.gamma = (1 + accuracy) / (1 - accuracy)
        self._log_gamma = math.log(self.gamma)
        self.positive: Counter[int] = Counter()
        self.negative: Counter[int] = Counter()  # clock skew can make a latency negative
        self.zero = 0
        self.count = 0

    def extend(self, values: np.ndarray) -> None:
        tiny = 1e-9
        for store, v in ((self.positive, values[values > tiny]), (self.negative, -values[values < -tiny])):
            if len(v):
                keys, counts = np.unique(np.ceil(np.log(v) / self._log_gamma).astype(np.int64), return_counts=True)
                store.update(dict(zip(keys.tolist(), counts.tolist(), strict=True)))
        self.zero += int(np.count_nonzero(np.abs(values) <= tiny))
        self.count += len(values)

    def percentile(self, q: float) -> float:
        if not self.count:
            return float("nan")
        rank, seen = max(1, math.ceil(q / 100 * self.count)), 0
        mid = lambda k: 2 * self.gamma**k / (self.gamma + 1)  # noqa: E731 the bucket's value within accuracy
        for k in sorted(self.negative, reverse=True):
            seen += self.negative[k]
            if seen >= rank:
                return -mid(k)
        seen += self.zero
        if seen >= rank:
            return 0.0
        for k in sorted(self.positive):
            seen += self.positive[k]
            if seen >= rank:
                return mid(k)
        return mid(max(self.positive))


class Column:
    """One measure of one group (latency of the variant's answers, say): moments against each
    covariate, a sketch for percentiles, and a uniform sample of BOOTSTRAP_CAP values kept by the
    smallest random keys (bottom-k sampling; while no more have come, all of them, and percentiles
    exact)."""

    def __init__(self, rng: np.random.Generator):
        self._rng = rng
        self.by_chars = stats.Moments()  # against the prompt's characters
        self.by_tokens = stats.Moments()  # against its tokens
        self.sketch = Sketch()
        self._keys = np.empty(0)
        self._values = np.empty(0)

    @property
    def count(self) -> int:
        return self.by_chars.n

    def extend(self, y: np.ndarray, chars: np.ndarray, tokens: np.ndarray) -> None:
        if not len(y):
            return
        self.by_chars.add(y, chars)
        self.by_tokens.add(y, tokens)
        self.sketch.extend(y)
        keys, cap = self._rng.random(len(y)), stats.BOOTSTRAP_CAP
        if len(self._keys) >= cap:  # full: only values whose keys beat the largest kept can enter
            enters = keys < self._keys.max()
            keys, y = keys[enters], y[enters]
        keys, values = np.concatenate([self._keys, keys]), np.concatenate([self._values, y])
        if len(keys) > cap:
            keep = np.argpartition(keys, cap - 1)[:cap]
            keys, values = keys[keep], values[keep]
        self._keys, self._values = keys, values

    def percentile(self, q: float) -> float:
        if self.count <= len(self._values):  # every value is in the sample: exact
            return stats.percentile(self._values.tolist(), q)
        return self.sketch.percentile(q)

    def summary(self) -> stats.Summary:
        m = self.by_chars
        return stats.Summary(m.n, m.mean_y if m.n else float("nan"), m.variance, self._values, self.percentile)

    @property
    def mean(self) -> float:
        return self.by_chars.mean_y if self.count else float("nan")


@dataclass
class Mark:
    """A request's latest feedback."""

    thumbs: str | None
    score: float | None
    created_at: float


class Group:
    """One variant's responses (all of them, or those randomised): counts, feedback, and the columns
    of its answered requests' latency, TTFT and output tokens."""

    def __init__(self, rng: np.random.Generator):
        self.count = self.errors = self.expired = 0
        self.by_assignment: Counter[str] = Counter()
        self.thumbs_up = self.rated = self.scores = 0
        self.score_sum = 0.0
        self.tokens_sum = 0
        self.engine_s = 0.0
        self.without_chars = 0  # answered requests whose prompt length in characters is unknown
        self.models: set[str] = set()
        # Token log probabilities, where requests asked for them: their mean is a confidence signal.
        self.logprob_sum, self.logprob_tokens = 0.0, 0
        self.latency, self.ttft, self.tokens = Column(rng), Column(rng), Column(rng)
        self._rows: list[tuple[float, float, float, float, float]] = []

    def add(self, r: InferenceResponse, mark: Mark | None) -> None:
        self.count += 1
        self.by_assignment[r.assigned_by or "weights"] += 1
        if r.error:
            if r.error.code == "expired":
                self.expired += 1
            else:
                self.errors += 1
        if mark is not None:
            if mark.thumbs:
                self.rated += 1
                self.thumbs_up += mark.thumbs == "up"
            if mark.score is not None:
                self.scores += 1
                self.score_sum += mark.score
        if not r.ok:
            return
        t, u = r.timings, r.usage
        self.tokens_sum += u.completion_tokens
        if t.started:
            self.engine_s += t.finished - t.started
        if u.prompt_chars is None:
            self.without_chars += 1
        self.models.add(r.model)
        if r.logprobs:
            for sample in r.logprobs:
                self.logprob_sum += sum(tok.logprob for tok in sample)
                self.logprob_tokens += len(sample)
        ttft = t.ttft_s if t.ttft_s is not None else math.nan
        self._rows.append((t.finished - t.enqueued, ttft, u.completion_tokens, u.prompt_chars or 0, u.prompt_tokens))
        if len(self._rows) >= CHUNK:
            self.flush()

    def flush(self) -> None:
        if not self._rows:
            return
        latency, ttft, tokens, chars, prompt = np.array(self._rows, float).T
        self._rows.clear()
        self.latency.extend(latency, chars, prompt)
        self.tokens.extend(tokens, chars, prompt)
        has = ~np.isnan(ttft)
        self.ttft.extend(ttft[has], chars[has], prompt[has])


AnswerKey = tuple[str | None, str]  # (caller_tag, request_id)


def endpoint_of(r: InferenceResponse) -> str:
    """The endpoint a response answers, for the report's endpoint column and --endpoint."""
    return r.endpoint or NO_BODY


def answer_key(r: InferenceResponse) -> AnswerKey:
    """Which request r answers, across callers: the same request answered twice has the same key,
    two callers' requests that share an id do not."""
    return r.caller_tag, r.request_id


class RecentIds:
    """The requests of the last RECENT_IDS to 2 x RECENT_IDS responses, in two generations: a
    redelivered request's second response comes within one worker's uncommitted window (seconds of
    traffic), far inside it; duplicates further apart than that would be counted twice."""

    def __init__(self, size: int | None = None):
        self.size = size or RECENT_IDS
        self._now: set[int] = set()
        self._before: set[int] = set()

    def first(self, key: tuple) -> bool:
        h = hash(key)
        if h in self._now or h in self._before:
            return False
        self._now.add(h)
        if len(self._now) >= self.size:
            self._before, self._now = self._now, set()
        return True


class UnitSample:
    """The distinct units (per config version and variant) whose hash falls under a threshold that
    halves whenever more than UNIT_SAMPLE are kept. The hash is not the assignment's, so which units
    are kept is independent of their variant and the kept counts split as the whole would: the
    chi-squared test on them is the sample-ratio check on a uniform random sample of units, exact
    (every unit) until there are more than UNIT_SAMPLE."""

    def __init__(self, size: int | None = None):
        self.size = size or UNIT_SAMPLE
        self.levels = 0  # units kept: those whose hash is divisible by 2 ** levels
        self.kept = 0
        self._units: dict[tuple[int | None, str], set[int]] = {}  # (config version, variant): unit hashes

    def add(self, version: int | None, variant: str, unit: str) -> None:
        h = int.from_bytes(hashlib.blake2b(unit.encode(), digest_size=8, person=b"abq-srm").digest(), "little")
        if h & ((1 << self.levels) - 1):
            return
        units = self._units.setdefault((version, variant), set())
        if h not in units:
            units.add(h)
            self.kept += 1
        if self.kept > self.size:
            self.levels += 1
            mask = (1 << self.levels) - 1
            self._units = {k: {u for u in hs if not u & mask} for k, hs in self._units.items()}
            self.kept = sum(len(hs) for hs in self._units.values())

    def counts(self) -> dict[int | None, dict[str, int]]:
        out: dict[int | None, dict[str, int]] = {}
        for (version, variant), hs in self._units.items():
            out.setdefault(version, {})[variant] = len(hs)
        return out


@dataclass
class Tally:
    """Everything a report needs of an experiment's responses. Feedback is joined by request id as
    each response arrives, so it is given first; versions: the live config versions' experiments
    (their weights, for the sample-ratio check)."""

    feedback: dict[AnswerKey, Mark] = field(default_factory=dict)
    versions: dict[int, ExperimentConfig] = field(default_factory=dict)
    all: dict[str, Group] = field(default_factory=dict)  # per variant
    randomised: dict[str, Group] = field(default_factory=dict)  # per variant: weights and shadows
    units: UnitSample = field(default_factory=UnitSample)
    timeline: Counter[tuple[str, int, bool]] = field(default_factory=Counter)  # (variant, minute, failed)
    endpoints: Counter[tuple[str, str]] = field(default_factory=Counter)  # (variant, endpoint_of)
    duplicates: int = 0
    cancelled: Counter[str] = field(default_factory=Counter)  # per variant: cancelled by their callers, counted apart
    _seen: RecentIds = field(default_factory=RecentIds)
    _rng: np.random.Generator = field(default_factory=lambda: np.random.default_rng(0))  # seeded: reports reproduce

    @classmethod
    def of(
        cls,
        responses: Iterable[InferenceResponse],
        feedback: Iterable[Feedback] = (),
        versions: dict[int, ExperimentConfig] | None = None,
    ) -> Tally:
        t = cls(marks(feedback), versions or {})
        for r in responses:
            t.add(r)
        return t.done()

    def left_out(self, r: InferenceResponse) -> None:
        """A response that does not count for its variant (refused input, or cancelled by its caller):
        cancels are counted apart, per variant."""
        if r.error is not None and r.error.code == "cancelled":
            self.cancelled[r.variant] += 1

    def add(self, r: InferenceResponse) -> None:
        """Counts r, unless it is a second response to the same request from the same variant
        (at-least-once delivery: the first counts)."""
        key = answer_key(r)
        if not self._seen.first((*key, r.variant)):
            self.duplicates += 1
            return
        mark = self.feedback.get(key)
        how = r.assigned_by or "weights"
        self._group(self.all, r.variant).add(r, mark)
        # Shadow copies are a random sample (by key) of their source variant's traffic, so they compare too.
        if how == "weights" or how.startswith("shadow:"):
            self._group(self.randomised, r.variant).add(r, mark)
        if how == "weights":
            self.units.add(r.config_version, r.variant, r.unit or r.request_id)
        self.timeline[(r.variant, int(r.timings.enqueued // 60), bool(r.error and r.error.code != "expired"))] += 1
        self.endpoints[(r.variant, endpoint_of(r))] += 1

    def done(self) -> Tally:
        for groups in (self.all, self.randomised):
            for g in groups.values():
                g.flush()
        return self

    @property
    def count(self) -> int:
        return sum(g.count for g in self.all.values())

    def _group(self, groups: dict[str, Group], variant: str) -> Group:
        if variant not in groups:
            groups[variant] = Group(self._rng)
        return groups[variant]


def marks(feedback: Iterable[Feedback]) -> dict[AnswerKey, Mark]:
    """Each answer's latest feedback, by the caller's tag and request id (as answer_key)."""
    out: dict[AnswerKey, Mark] = {}
    for f in feedback:
        key = (f.caller_tag, f.request_id)
        now = out.get(key)
        if now is None or f.created_at >= now.created_at:
            out[key] = Mark(f.thumbs, f.score, f.created_at)
    return out
