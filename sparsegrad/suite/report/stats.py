"""Small statistics for the findings table: paired differences, t intervals and the verdict rule.

Everything here is a pure function of plain numbers (no records, no I/O), so the tests check it
against hand-computed answers.

* :func:`paired_differences` pairs two methods' per-seed values by seed (only seeds both have).
* :func:`t_interval` is the two-sided Student t confidence interval of a mean:
  ``mean ± t_{1-α/2, n-1} · sd / √n`` with the sample standard deviation (n - 1 in the
  denominator). With one value there is no interval (``lo = hi = None``); with identical values
  the interval collapses to the point.
* :func:`verdict` turns an interval of a difference into confirmed / contradicted / inconclusive
  against a margin: a claim "difference > margin" is *confirmed* when the whole interval lies above
  the margin, *contradicted* when the whole interval lies below it, and *inconclusive* when the
  interval straddles the margin or does not exist.
* :func:`detectable_difference` is the power of the paired design: the smallest true difference that
  the two-sided level-``LEVEL`` t test of ``n`` paired differences with standard deviation ``sd``
  detects with probability ``POWER``,
  ``MDE = (t_{1-α/2, n-1} + t_{power, n-1}) · sd / √n`` (α = 1 - level; the usual approximation
  that ignores the far tail and the noncentrality of the t distribution).
* :func:`seeds_needed` solves that for ``n``: the smallest ``n ≥ 2`` whose MDE, with the observed
  ``sd`` and the t quantiles of ``n - 1`` degrees of freedom, is no larger than a given difference.
* :func:`percentile_interval` is the central interval of bootstrap replicates (the percentile
  bootstrap), used for the test split's own sampling error.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

CONFIRMED, CONTRADICTED, INCONCLUSIVE = "confirmed", "contradicted", "inconclusive"
LEVEL = 0.95
POWER = 0.80
MAX_SEEDS = 1000  # seeds_needed gives up beyond this


@dataclass(frozen=True)
class Interval:
    """Mean of ``n`` values with its two-sided confidence interval (``lo``/``hi`` None when n < 2)."""

    mean: float | None
    lo: float | None
    hi: float | None
    n: int
    level: float = LEVEL
    sd: float | None = None  # sample standard deviation of the values (n - 1 in the denominator)

    @property
    def exists(self) -> bool:
        return self.lo is not None and self.hi is not None

    def scaled(self, factor: float) -> Interval:
        """The same interval in other units (factor > 0), e.g. a share as percentage points."""
        def s(x):
            return None if x is None else x * factor
        return Interval(s(self.mean), s(self.lo), s(self.hi), self.n, self.level, s(self.sd))

    def negated(self) -> Interval:
        """The interval of minus the quantity (B - A from A - B)."""
        def s(x):
            return None if x is None else -x
        return Interval(s(self.mean), s(self.hi), s(self.lo), self.n, self.level, self.sd)


def t_quantile(df: int, level: float = LEVEL) -> float:
    """The two-sided ``level`` quantile of Student's t with ``df`` degrees of freedom."""
    return t_ppf(0.5 + level / 2, df)


def t_ppf(q: float, df: int) -> float:
    """The one-sided ``q`` quantile of Student's t with ``df`` degrees of freedom."""
    from scipy import stats

    return float(stats.t.ppf(q, df))


def detectable_difference(sd: float | None, n: int, level: float = LEVEL, power: float = POWER) -> float | None:
    """MDE = (t_{1-α/2, n-1} + t_{power, n-1}) · sd / √n (see the module docstring); None below 2 values."""
    if sd is None or n < 2:
        return None
    return (t_quantile(n - 1, level) + t_ppf(power, n - 1)) * sd / math.sqrt(n)


def seeds_needed(difference: float | None, sd: float | None, level: float = LEVEL, power: float = POWER,
                 most: int = MAX_SEEDS) -> int | None:
    """The smallest n ≥ 2 with detectable_difference(sd, n) ≤ |difference|; None when no n ≤ ``most`` does
    (or nothing is known). The MDE falls as n grows, so the first n that reaches it is the answer."""
    if difference is None or sd is None or not math.isfinite(difference):
        return None
    for n in range(2, most + 1):
        if detectable_difference(sd, n, level, power) <= abs(difference):
            return n
    return None


def percentile_interval(replicates: Iterable[float], level: float = LEVEL) -> tuple[float, float] | None:
    """The central ``level`` interval of bootstrap replicates (finite ones), or None without any."""
    import numpy as np

    xs = np.asarray([x for x in replicates if x is not None and math.isfinite(x)], dtype=np.float64)
    if xs.size == 0:
        return None
    lo, hi = np.quantile(xs, [0.5 - level / 2, 0.5 + level / 2])
    return float(lo), float(hi)


def t_interval(values: Iterable[float], level: float = LEVEL) -> Interval:
    """Student t interval of the mean of ``values`` (finite values only)."""
    xs = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    n = len(xs)
    if n == 0:
        return Interval(None, None, None, 0, level)
    mean = sum(xs) / n
    if n == 1:
        return Interval(mean, None, None, 1, level)
    sd = math.sqrt(sum((x - mean) ** 2 for x in xs) / (n - 1))
    half = t_quantile(n - 1, level) * sd / math.sqrt(n)
    return Interval(mean, mean - half, mean + half, n, level, sd)


def paired_differences(a: Mapping[int, float], b: Mapping[int, float]) -> dict[int, float]:
    """``a[s] - b[s]`` for every seed ``s`` both have a finite value for, in seed order."""
    out = {}
    for s in sorted(set(a) & set(b)):
        x, y = a[s], b[s]
        if x is None or y is None or not (math.isfinite(x) and math.isfinite(y)):
            continue
        out[s] = float(x) - float(y)
    return out


def verdict(interval: Interval, margin: float = 0.0) -> str:
    """Verdict on the claim "the difference exceeds ``margin``" (see the module docstring)."""
    if not interval.exists:
        return INCONCLUSIVE
    if interval.lo > margin:
        return CONFIRMED
    if interval.hi < margin:
        return CONTRADICTED
    return INCONCLUSIVE


def combine(verdicts: Iterable[str]) -> str:
    """A claim made of several parts (A < B < C): confirmed when every part is, contradicted when any
    part is, else inconclusive."""
    vs = list(verdicts)
    if not vs:
        return INCONCLUSIVE
    if any(v == CONTRADICTED for v in vs):
        return CONTRADICTED
    if all(v == CONFIRMED for v in vs):
        return CONFIRMED
    return INCONCLUSIVE
