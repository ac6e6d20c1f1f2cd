"""The statistics of variant comparison: Welch's t-test, bootstrap confidence intervals (of means
and of quantiles), the two-proportion z-test, relative lift with a delta-method interval, sample
sizes for a chosen power, an alpha-spending rule so that looking at a running experiment again and
again does not inflate false positives, the sample-ratio check and adjusted p-values.

Distributions and standard tests come from scipy and statsmodels (the `analysis` extra, imported
when first used, so that the worker and the scaling tools, which need only the percentiles here, do
not carry them); what is our own composition is checked against them in the tests."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from statistics import NormalDist, fmean, variance
from typing import Any

from abqueue.errors import UsageError

_N = NormalDist()


def weighted_percentile(values: list[tuple[float, int]], q: float) -> float:
    """Nearest-rank percentile of (value, count) pairs."""
    total = sum(n for _, n in values)
    if not total:
        return 0.0
    rank, seen = math.ceil(q / 100 * total), 0
    for v, n in sorted(values):
        seen += n
        if seen >= rank:
            return float(v)
    return float(max(v for v, _ in values))


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (the smallest value with at least q% at or below it); NaN if empty."""
    return weighted_percentile([(v, 1) for v in values], q) if values else float("nan")


NEEDS_EXTRA = (
    "analysis needs scipy and statsmodels: pip install 'abqueue[analysis]' (the worker image does not need them)"
)


def scipy_stats():
    """scipy.stats, from the `analysis` extra: the distributions and tests are the well-kept library's."""
    try:
        from scipy import stats
    except ImportError:
        raise UsageError(NEEDS_EXTRA) from None
    return stats


ANALYSIS_EXTRA = "scipy and statsmodels (`pip install 'abqueue[analysis]'`)"  # for a line naming several extras


def analysis_missing() -> bool:
    """True where the analysis extra's packages cannot be imported."""
    try:
        import numpy  # noqa: F401
        import scipy.stats  # noqa: F401
        import statsmodels.stats.multitest  # noqa: F401
    except ImportError:
        return True
    return False


def require_extra() -> None:
    """Fail at once, with the install line, where a command will need the analysis extra later."""
    if analysis_missing():
        raise UsageError(NEEDS_EXTRA)


def _numpy():
    try:
        import numpy
    except ImportError:
        raise UsageError(NEEDS_EXTRA) from None
    return numpy


@dataclass
class Summary:
    """What the tests need of one group's values: their count, mean and sample variance, their
    percentiles, and a uniform random sample of at most BOOTSTRAP_CAP of them (all of them where there
    are no more) for the bootstrap. From a list (summary()) or gathered while streaming
    (analysis.tally.Column), so a report never needs the values themselves."""

    count: int
    mean: float
    variance: float
    sample: Any  # numpy array
    percentile: Callable[[float], float]


def summary(values: list[float] | Summary, rng=None) -> Summary:
    """A list's Summary (a Summary as it is); above BOOTSTRAP_CAP values its sample is a random
    subsample, drawn from rng (seeded by the caller, so that reports reproduce)."""
    if isinstance(values, Summary):
        return values
    np = _numpy()
    n = len(values)
    x = np.asarray(values, float)
    if n > BOOTSTRAP_CAP:
        x = (rng or np.random.default_rng(0)).choice(x, BOOTSTRAP_CAP, replace=False)
    return Summary(
        n,
        fmean(values) if n else float("nan"),
        variance(values) if n > 1 else float("nan"),
        x,
        lambda q: percentile(values, q),
    )


@dataclass
class Moments:
    """Count, mean and sum of squared deviations of y and of a covariate x, and their co-moment,
    merged a chunk at a time (Chan, Golub and LeVeque's pairwise update, stable where a running sum
    of squares is not): the means, variances and regression adjustment of any number of values in a
    few floats."""

    n: int = 0
    mean_y: float = 0.0
    ss_y: float = 0.0
    mean_x: float = 0.0
    ss_x: float = 0.0
    sxy: float = 0.0

    @classmethod
    def of(cls, y, x=None) -> Moments:
        m = cls()
        m.add(y, x)
        return m

    def add(self, y, x=None) -> None:
        """Adds values y (and their covariates x; zeros without)."""
        np = _numpy()
        y = np.asarray(y, float)
        x = np.zeros_like(y) if x is None else np.asarray(x, float)
        if len(y):
            dy, dx = y - y.mean(), x - x.mean()
            self.merge(
                Moments(len(y), float(y.mean()), float(dy @ dy), float(x.mean()), float(dx @ dx), float(dx @ dy))
            )

    def merge(self, o: Moments) -> None:
        if not o.n:
            return
        n = self.n + o.n
        d_y, d_x, f = o.mean_y - self.mean_y, o.mean_x - self.mean_x, self.n * o.n / n
        self.ss_y += o.ss_y + d_y * d_y * f
        self.ss_x += o.ss_x + d_x * d_x * f
        self.sxy += o.sxy + d_x * d_y * f
        self.mean_y += d_y * o.n / n
        self.mean_x += d_x * o.n / n
        self.n = n

    @property
    def variance(self) -> float:
        return self.ss_y / (self.n - 1) if self.n > 1 else float("nan")


@dataclass
class TestResult:
    statistic: float
    p_value: float
    df: float | None = None
    difference: float = 0.0  # treatment minus control
    ci: tuple[float, float] = (float("nan"), float("nan"))


def welch(control: list[float] | Summary, treatment: list[float] | Summary, alpha: float = 0.05) -> TestResult:
    """Welch's unequal-variances t-test of the means; CI of the difference (treatment - control)."""
    c, t = summary(control), summary(treatment)
    return welch_from(c.mean, c.variance, c.count, t.mean, t.variance, t.count, alpha)


def welch_from(m1: float, var1: float, n1: int, m2: float, var2: float, n2: int, alpha: float = 0.05) -> TestResult:
    """Welch's test from each group's mean, sample variance and count (all it needs)."""
    if n1 < 2 or n2 < 2:
        return TestResult(float("nan"), float("nan"))
    v1, v2 = var1 / n1, var2 / n2
    se = math.sqrt(v1 + v2)
    if se == 0:
        return TestResult(0.0 if m1 == m2 else math.inf, 1.0 if m1 == m2 else 0.0, None, m2 - m1, (m2 - m1, m2 - m1))
    t = (m2 - m1) / se
    df = (v1 + v2) ** 2 / (v1**2 / (n1 - 1) + v2**2 / (n2 - 1))
    dist = scipy_stats().t(df)
    half = float(dist.ppf(1 - alpha / 2)) * se
    return TestResult(t, float(2 * dist.sf(abs(t))), df, m2 - m1, (m2 - m1 - half, m2 - m1 + half))


def bootstrap_mean_diff(
    control: list[float] | Summary,
    treatment: list[float] | Summary,
    alpha: float = 0.05,
    rounds: int = 2000,
    seed: int = 0,
) -> tuple[float, float]:
    """Percentile bootstrap CI of mean(treatment) - mean(control); seeded, so reports reproduce.
    Above BOOTSTRAP_CAP values per group the resamples come from a uniform random sample of them, their
    spread scaled to the whole sample's (see _boot_means): the cost stays fixed whatever the sample."""
    np = _numpy()

    rng = np.random.default_rng(seed)
    c, t = summary(control, rng), summary(treatment, rng)
    if not c.count or not t.count:
        return (float("nan"), float("nan"))
    diffs = _boot_means(t, rounds, rng) - _boot_means(c, rounds, rng)
    return float(np.percentile(diffs, 100 * alpha / 2)), float(np.percentile(diffs, 100 * (1 - alpha / 2)))


def _boot_means(x: Summary, rounds: int, rng):
    """Bootstrap replicates of the mean of x's values; where x holds a sample of m of its n values,
    of the sample's, their spread around its mean scaled by sqrt(m / n) and centred on the whole mean."""
    np = _numpy()

    sub, n = x.sample, x.count
    m = len(sub)
    reps = np.concatenate(
        [sub[rng.integers(0, m, (min(_CHUNK, rounds - i), m))].mean(axis=1) for i in range(0, rounds, _CHUNK)]
    )
    return reps if m == n else x.mean + (reps - sub.mean()) * math.sqrt(m / n)


def two_proportions(x1: int, n1: int, x2: int, n2: int, alpha: float = 0.05) -> TestResult:
    """Two-sided z-test with the pooled proportion (as statsmodels' proportions_ztest); CI of
    p2 - p1 with unpooled (Wald) standard error."""
    if not n1 or not n2:
        return TestResult(float("nan"), float("nan"))
    p1, p2 = x1 / n1, x2 / n2
    pooled = (x1 + x2) / (n1 + n2)
    se0 = math.sqrt(pooled * (1 - pooled) * (1 / n1 + 1 / n2))
    z = (p2 - p1) / se0 if se0 else 0.0
    p = 2 * (1 - _N.cdf(abs(z))) if se0 else 1.0
    se = math.sqrt(p1 * (1 - p1) / n1 + p2 * (1 - p2) / n2)
    zc = _N.inv_cdf(1 - alpha / 2)
    return TestResult(z, p, None, p2 - p1, (p2 - p1 - zc * se, p2 - p1 + zc * se))


def relative_lift(m1: float, var1: float, n1: int, m2: float, var2: float, n2: int, alpha: float = 0.05):
    """(m2 - m1) / m1 with a delta-method CI; var are the sample variances."""
    if not m1 or not n1 or not n2:
        return float("nan"), (float("nan"), float("nan"))
    lift = m2 / m1 - 1
    se = math.sqrt(var2 / n2 / m1**2 + m2**2 * var1 / n1 / m1**4)
    zc = _N.inv_cdf(1 - alpha / 2)
    return lift, (lift - zc * se, lift + zc * se)


def lift_of_difference(
    m1: float, var1: float, n1: int, difference: float, ci: tuple[float, float], alpha: float = 0.05
):
    """difference / m1 with a delta-method CI, for a difference estimated otherwise than as the
    means' (regression-adjusted, say): its standard error is read from its own interval, so the
    lift and the difference on one line are one estimate."""
    if not m1 or not n1 or math.isnan(difference):
        return float("nan"), (float("nan"), float("nan"))
    zc = _N.inv_cdf(1 - alpha / 2)
    se_diff = (ci[1] - ci[0]) / (2 * zc)
    lift = difference / m1
    se = math.sqrt(se_diff**2 / m1**2 + difference**2 * var1 / n1 / m1**4)
    return lift, (lift - zc * se, lift + zc * se)


def sample_size_proportions(p1: float, p2: float, alpha: float = 0.05, power: float = 0.8) -> int:
    """Per group, to detect p1 vs p2 (Cohen's h, as statsmodels' NormalIndPower with ratio 1)."""
    h = abs(2 * math.asin(math.sqrt(p2)) - 2 * math.asin(math.sqrt(p1)))
    if h == 0:
        return 0
    return math.ceil(2 * ((_N.inv_cdf(1 - alpha / 2) + _N.inv_cdf(power)) / h) ** 2)


def sample_size_means(sd: float, delta: float, alpha: float = 0.05, power: float = 0.8) -> int:
    """Per group, to detect a difference `delta` of means with standard deviation `sd` (normal approx.)."""
    if not delta or not sd:
        return 0
    return math.ceil(2 * ((_N.inv_cdf(1 - alpha / 2) + _N.inv_cdf(power)) * sd / delta) ** 2)


def obrien_fleming_alpha(information: float, alpha: float = 0.05) -> float:
    """Lan-DeMets O'Brien-Fleming-type spending: the two-sided alpha that may be spent by the time
    a fraction `information` (samples so far / planned) of the experiment has run. Early looks get
    almost nothing, the final look nearly all of alpha, so peeking cannot manufacture a winner."""
    t = min(1.0, max(0.0, information))
    if t == 0:
        return 0.0
    return 2 * (1 - _N.cdf(_N.inv_cdf(1 - alpha / 2) / math.sqrt(t)))


SRM_ALPHA = 0.001  # GrowthBook's default: an SRM alarm should almost never be noise


@dataclass
class SampleRatio:
    observed: dict[str, int]
    expected: dict[str, float]
    chi2: float
    p_value: float

    @property
    def mismatch(self) -> bool:
        return self.p_value < SRM_ALPHA


def sample_ratio(observed: dict[str, int], shares: dict[str, float]) -> SampleRatio | None:
    """Pearson's chi-squared test of observed counts against the shares the weights promise
    (variants without a share get none expected and are left out). None with fewer than two
    variants to compare or nothing observed."""
    names = [n for n, share in shares.items() if share > 0]
    total = sum(observed.get(n, 0) for n in names)
    if len(names) < 2 or not total:
        return None
    whole = sum(shares[n] for n in names)
    f_obs = [observed.get(n, 0) for n in names]
    f_exp = [total * shares[n] / whole for n in names]
    chi2, p = scipy_stats().chisquare(f_obs, f_exp)
    return SampleRatio(
        dict(zip(names, f_obs, strict=True)), dict(zip(names, f_exp, strict=True)), float(chi2), float(p)
    )


CORRECTIONS = {"holm": "holm", "bh": "fdr_bh", "none": None}


def adjust(p_values: list[float], method: str, alpha: float = 0.05) -> list[float]:
    """p-values adjusted for testing them together: Holm (family-wise error) or Benjamini-Hochberg
    (false discovery rate), by statsmodels' multipletests; NaN stays NaN and takes no part."""
    if method not in CORRECTIONS:
        raise UsageError(f"--correction {method!r} is not one of {', '.join(CORRECTIONS)}")
    name = CORRECTIONS[method]
    present = [i for i, p in enumerate(p_values) if not math.isnan(p)]
    out = list(p_values)
    if name is None or not present:
        return out
    try:
        from statsmodels.stats.multitest import multipletests
    except ImportError:
        raise UsageError(NEEDS_EXTRA) from None
    adjusted = multipletests([p_values[i] for i in present], alpha=alpha, method=name)[1]
    for i, p in zip(present, adjusted, strict=True):
        out[i] = float(p)
    return out


BOOTSTRAP_CAP = 20_000  # values per group resampled; beyond it, a random subsample (see quantile_diffs)
_CHUNK = 100  # bootstrap rounds per array, so memory stays at a few MB whatever the rounds


def _boot_quantiles(x: Summary, qs, rounds: int, rng):
    """Bootstrap replicates of the qs-th percentiles of x's values, shape (rounds, len(qs)). Where x
    holds a sample of m of its n values they are the sample's, their spread around the sample's own
    percentiles scaled by sqrt(m / n), as a quantile's standard error shrinks with the square root of
    the sample, and centred on the whole's percentiles."""
    np = _numpy()

    sub, n = x.sample, x.count
    m = len(sub)
    qf = [q / 100 for q in qs]
    reps = np.concatenate(
        [
            np.quantile(sub[rng.integers(0, m, (min(_CHUNK, rounds - i), m))], qf, axis=1, method="inverted_cdf").T
            for i in range(0, rounds, _CHUNK)
        ]
    )
    if m == n:
        return reps
    whole = np.array([x.percentile(q) for q in qs])
    return whole + (reps - np.quantile(sub, qf, method="inverted_cdf")) * math.sqrt(m / n)


def quantile_diffs(
    control: list[float] | Summary,
    treatment: list[float] | Summary,
    qs: tuple[float, ...] = (50, 95),
    alpha: float = 0.05,
    rounds: int = 2000,
    seed: int = 0,
) -> dict[float, dict]:
    """Per q: the q-th percentile of treatment minus control's, and treatment's over control's minus
    one, each with a normal interval whose standard error is the bootstrap's (seeded: reports
    reproduce), and the matching two-sided p-value. The plain percentile interval over-covers at the
    p95 (97% for a nominal 95% in tests/test_report.py's simulation); this one keeps to 94-96%."""
    np = _numpy()

    nan = float("nan")
    rng = np.random.default_rng(seed)
    c, t = summary(control, rng), summary(treatment, rng)
    if c.count < 2 or t.count < 2:
        empty = {"control": nan, "treatment": nan, "difference": nan, "ci": [nan, nan], "lift": nan,
                 "lift_ci": [nan, nan], "p_value": nan}  # fmt: skip
        return {q: dict(empty) for q in qs}
    qc, qt = _boot_quantiles(c, qs, rounds, rng), _boot_quantiles(t, qs, rounds, rng)
    z = _N.inv_cdf(1 - alpha / 2)
    out = {}
    for j, q in enumerate(qs):
        c_q, t_q = c.percentile(q), t.percentile(q)
        diff, se = t_q - c_q, float(np.std(qt[:, j] - qc[:, j], ddof=1))
        ratios = np.divide(qt[:, j], qc[:, j], out=np.full(rounds, np.nan), where=qc[:, j] != 0)
        lift, lift_se = (t_q / c_q - 1, float(np.nanstd(ratios, ddof=1))) if c_q else (nan, nan)
        p = 2 * (1 - _N.cdf(abs(diff) / se)) if se > 0 else (1.0 if diff == 0 else 0.0)
        out[q] = {
            "control": c_q,
            "treatment": t_q,
            "difference": diff,
            "ci": [diff - z * se, diff + z * se],
            "lift": lift,
            "lift_ci": [lift - z * lift_se, lift + z * lift_se],
            "p_value": p,
        }
    return out


CUPED_MIN_REDUCTION = 0.01  # below this the adjustment is not worth its own estimation noise


def cuped(
    control: list[float],
    x_control: list[float],
    treatment: list[float],
    x_treatment: list[float],
    alpha: float = 0.05,
) -> dict:
    """cuped_from on lists of values and their covariates."""
    if len(x_control) != len(control) or len(x_treatment) != len(treatment):
        return {"variance_reduction": float("nan"), "theta": float("nan")}
    return cuped_from(Moments.of(control, x_control), Moments.of(treatment, x_treatment), alpha)


def cuped_from(c: Moments, t: Moments, alpha: float = 0.05) -> dict:
    """Regression adjustment on a pre-treatment covariate (CUPED: Deng, Xu, Kohavi and Walker,
    2013): y - theta (x - mean x), theta = cov(y, x) / var(x) pooled over both groups, removes the
    part of y's variance that x explains without biasing the difference, because x cannot depend
    on the variant. Returns Welch's test of the adjusted values and the share of variance removed;
    from each group's moments alone (the adjusted values' mean and variance follow from them)."""
    if c.n < 2 or t.n < 2:
        return {"variance_reduction": float("nan"), "theta": float("nan")}
    pooled = Moments()
    pooled.merge(c)
    pooled.merge(t)
    theta = pooled.sxy / pooled.ss_x if pooled.ss_x else 0.0

    def adjusted(g: Moments) -> tuple[float, float]:
        """The adjusted values' mean and sum of squared deviations."""
        return g.mean_y - theta * (g.mean_x - pooled.mean_x), g.ss_y - 2 * theta * g.sxy + theta**2 * g.ss_x

    (mc, ssc), (mt, sst) = adjusted(c), adjusted(t)
    within = c.ss_y + t.ss_y
    w = welch_from(mc, ssc / (c.n - 1), c.n, mt, sst / (t.n - 1), t.n, alpha)
    return {
        "theta": theta,
        "variance_reduction": 1 - (ssc + sst) / within if within else 0.0,
        "difference": w.difference,
        "ci": list(w.ci),
        "p_value": w.p_value,
    }
