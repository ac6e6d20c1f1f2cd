"""Always-valid tests, for guardrails that are looked at every second.

A fixed-sample test checked after every response rolls back on noise sooner or later: its false
alarm rate grows with the number of looks. A confidence sequence holds at every look at once: the
chance that it ever excludes the true value, however long it is watched, is at most alpha. Here it
is the normal-mixture one (the mixture sequential probability ratio test of Robbins, in the form
Johari, Pekelis and Walsh give for A/B tests, "Always valid inference", 2017; GrowthBook's
sequential testing uses the same boundary): for an estimate with standard error s and a normal
mixture of scale tau over the effect, the estimate is at least

    radius(s) = sqrt( 2 s^2 (s^2 + tau^2) / tau^2 * ( log(1/alpha) + log((s^2 + tau^2) / s^2) / 2 ) )

away from any value the sequence excludes. The standard errors are plug-in (asymptotic, as in
Howard et al.'s asymptotic confidence sequences), floored at the null's, so a run of zero errors
cannot make a breach look certain. tau is the size of effect the test is tuned to find fastest.
"""

from __future__ import annotations

import math


def radius(se: float, alpha: float, tau: float) -> float:
    """Half-width of the (two-sided) normal-mixture confidence sequence at standard error `se`."""
    if se <= 0:
        return 0.0
    s2, t2 = se * se, tau * tau
    return math.sqrt(2 * s2 * (s2 + t2) / t2 * (math.log(1 / alpha) + 0.5 * math.log((s2 + t2) / s2)))


def above(estimate: float, se: float, bound: float, alpha: float, tau: float) -> bool:
    """True once the confidence sequence lies wholly above `bound`: the true value exceeds it, with
    a chance of at most alpha/2 of ever saying so wrongly however often this is asked."""
    return estimate - radius(se, alpha, tau) > bound


def rate_se(successes: int, n: int, null: float) -> float:
    """Standard error of a rate, with the variance floored at the null rate's."""
    p = successes / n
    return math.sqrt(max(p * (1 - p), null * (1 - null)) / n)
