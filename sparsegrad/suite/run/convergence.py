"""When has a run converged? Patience-based early stopping on the held-out selection metric.

The criterion, stated once: after every evaluation on the selection split, the run has improved when
its main metric beats the best so far by more than ``min_delta`` (absolute, in the metric's own units;
larger is better for scores, smaller for losses). The run has converged, and stops, after
``patience`` evaluations in a row without an improvement. The best checkpoint is the last one that
improved. A step cap (``trainer.max_steps``) bounds the run in case it never stops improving; a run
that reaches the cap has *not* converged, and the findings tables count such runs.

:class:`EarlyStopping` holds only this bookkeeping (no torch, no I/O), so the training loop calls it
in one line and the tests feed it a fixture sequence of metric values.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

CONVERGED_PREFIX = "early stopping"  # stop_reason of a run stopped by this criterion
CAP_REASON = "max_steps reached"  # stop_reason of a run that hit the step cap


@dataclass
class EarlyStopping:
    """Patience counter over a sequence of selection-metric values (see the module docstring)."""

    patience: int | None  # evaluations without improvement before stopping; None: never stop
    higher_is_better: bool = True
    min_delta: float = 0.0
    best: float | None = None
    bad_evaluations: int = 0
    evaluations: int = 0

    def improved(self, value: float | None) -> bool:
        """Would ``value`` count as an improvement over the best so far?"""
        if value is None or not math.isfinite(value):
            return False
        if self.best is None:
            return True
        gain = value - self.best if self.higher_is_better else self.best - value
        return gain > self.min_delta

    def update(self, value: float | None) -> bool:
        """Record one evaluation; returns True when it improved (the caller keeps this checkpoint)."""
        self.evaluations += 1
        if self.improved(value):
            self.best = float(value)
            self.bad_evaluations = 0
            return True
        self.bad_evaluations += 1
        return False

    @property
    def should_stop(self) -> bool:
        return self.patience is not None and self.bad_evaluations >= self.patience

    def reason(self) -> str:
        return f"{CONVERGED_PREFIX}: no improvement in {self.patience} evaluations"


def converged(record: dict) -> bool | None:
    """Did this run stop by the convergence criterion? None when the record does not say."""
    reason = (record.get("training") or {}).get("stop_reason")
    if not reason:
        return None
    return str(reason).startswith(CONVERGED_PREFIX)


def hit_cap(record: dict) -> bool:
    """Did this run stop at the step cap (so it may not have converged)?"""
    return (record.get("training") or {}).get("stop_reason") == CAP_REASON
