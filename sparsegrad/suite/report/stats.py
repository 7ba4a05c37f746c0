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
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

CONFIRMED, CONTRADICTED, INCONCLUSIVE = "confirmed", "contradicted", "inconclusive"
LEVEL = 0.95


@dataclass(frozen=True)
class Interval:
    """Mean of ``n`` values with its two-sided confidence interval (``lo``/``hi`` None when n < 2)."""

    mean: float | None
    lo: float | None
    hi: float | None
    n: int
    level: float = LEVEL

    @property
    def exists(self) -> bool:
        return self.lo is not None and self.hi is not None

    def scaled(self, factor: float) -> Interval:
        """The same interval in other units (factor > 0), e.g. a share as percentage points."""
        def s(x):
            return None if x is None else x * factor
        return Interval(s(self.mean), s(self.lo), s(self.hi), self.n, self.level)

    def negated(self) -> Interval:
        """The interval of minus the quantity (B - A from A - B)."""
        def s(x):
            return None if x is None else -x
        return Interval(s(self.mean), s(self.hi), s(self.lo), self.n, self.level)


def t_quantile(df: int, level: float = LEVEL) -> float:
    """The two-sided ``level`` quantile of Student's t with ``df`` degrees of freedom."""
    from scipy import stats

    return float(stats.t.ppf(0.5 + level / 2, df))


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
    return Interval(mean, mean - half, mean + half, n, level)


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
