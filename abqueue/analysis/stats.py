"""The statistics of variant comparison, in plain Python (checked against scipy and statsmodels in
the tests): Welch's t-test, bootstrap confidence intervals, the two-proportion z-test, relative lift
with a delta-method interval, sample sizes for a chosen power, and an alpha-spending rule so that
looking at a running experiment again and again does not inflate false positives."""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from statistics import NormalDist, fmean, variance

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


def _betacf(a: float, b: float, x: float) -> float:
    # Continued fraction of the incomplete beta function (Lentz's method).
    tiny, qab, qap, qam = 1e-300, a + b, a + 1, a - 1
    c, d = 1.0, 1 - qab * x / qap
    d = 1 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 400):
        m2 = 2 * m
        aa = m * (b - m) * x / ((qam + m2) * (a + m2))
        d = 1 + aa * d
        d = 1 / (d if abs(d) > tiny else tiny)
        c = 1 + aa / c
        c = c if abs(c) > tiny else tiny
        h *= d * c
        aa = -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))
        d = 1 + aa * d
        d = 1 / (d if abs(d) > tiny else tiny)
        c = 1 + aa / c
        c = c if abs(c) > tiny else tiny
        delta = d * c
        h *= delta
        if abs(delta - 1) < 1e-15:
            break
    return h


def betainc(a: float, b: float, x: float) -> float:
    """Regularized incomplete beta I_x(a, b)."""
    if x <= 0:
        return 0.0
    if x >= 1:
        return 1.0
    front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x))
    if x < (a + 1) / (a + b + 2):
        return front * _betacf(a, b, x) / a
    return 1 - front * _betacf(b, a, 1 - x) / b


def t_two_sided_p(t: float, df: float) -> float:
    return betainc(df / 2, 0.5, df / (df + t * t)) if df > 0 else float("nan")


def t_ppf(q: float, df: float) -> float:
    """Quantile of Student's t (bisection on the CDF; used for confidence intervals)."""
    lo, hi = -1e3, 1e3
    for _ in range(200):
        mid = (lo + hi) / 2
        cdf = 1 - t_two_sided_p(mid, df) / 2 if mid >= 0 else t_two_sided_p(mid, df) / 2
        lo, hi = (mid, hi) if cdf < q else (lo, mid)
    return (lo + hi) / 2


@dataclass
class TestResult:
    statistic: float
    p_value: float
    df: float | None = None
    difference: float = 0.0  # treatment minus control
    ci: tuple[float, float] = (float("nan"), float("nan"))


def welch(control: list[float], treatment: list[float], alpha: float = 0.05) -> TestResult:
    """Welch's unequal-variances t-test of the means; CI of the difference (treatment - control)."""
    n1, n2 = len(control), len(treatment)
    if n1 < 2 or n2 < 2:
        return TestResult(float("nan"), float("nan"))
    m1, m2 = fmean(control), fmean(treatment)
    v1, v2 = variance(control) / n1, variance(treatment) / n2
    se = math.sqrt(v1 + v2)
    if se == 0:
        return TestResult(0.0 if m1 == m2 else math.inf, 1.0 if m1 == m2 else 0.0, None, m2 - m1, (m2 - m1, m2 - m1))
    t = (m2 - m1) / se
    df = (v1 + v2) ** 2 / (v1**2 / (n1 - 1) + v2**2 / (n2 - 1))
    half = t_ppf(1 - alpha / 2, df) * se
    return TestResult(t, t_two_sided_p(t, df), df, m2 - m1, (m2 - m1 - half, m2 - m1 + half))


def bootstrap_mean_diff(
    control: list[float], treatment: list[float], alpha: float = 0.05, rounds: int = 2000, seed: int = 0
) -> tuple[float, float]:
    """Percentile bootstrap CI of mean(treatment) - mean(control); seeded, so reports reproduce."""
    if not control or not treatment:
        return (float("nan"), float("nan"))
    rnd = random.Random(seed)
    n1, n2 = len(control), len(treatment)
    diffs = sorted(fmean(rnd.choices(treatment, k=n2)) - fmean(rnd.choices(control, k=n1)) for _ in range(rounds))
    return diffs[int(alpha / 2 * rounds)], diffs[min(rounds - 1, int((1 - alpha / 2) * rounds))]


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
