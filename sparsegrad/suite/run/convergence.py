"""When has a run finished learning? Early stopping that the selection set's noise cannot trigger.

The criterion, stated once. After every evaluation on the selection split the run feeds the watched
value v_e (the main metric, or the selection loss with ``trainer.stop_metric=loss``) to the stopper,
which smooths it over the last ``window`` evaluations,

    s_e = (v_{e-w+1} + ... + v_e) / w        (fewer terms while e < w),

and counts an improvement when s_e beats the best smoothed value so far by more than ``min_delta``
(absolute, in the metric's own units; larger is better for scores, smaller for losses). The run has
converged, and stops, once ``patience`` evaluations in a row brought no improvement AND it has trained
at least ``min_steps`` optimizer steps (``trainer.min_epochs`` of its training data): before that no
stop is possible, however flat the curve. Why both: one evaluation on a few hundred examples moves by
a few points by chance (accuracy on 200 sentences: about ±3), so a raw curve rising through that noise
has "2 evaluations without a gain" long before it levels off; the mean of w evaluations has 1/√w of
the noise, and the minimum length keeps a slow starter in training until it has seen the data twice.

The best checkpoint is chosen apart from the stop: the evaluation with the best raw main metric
(:func:`better`). A step cap (``trainer.max_steps``) bounds a run that never stops improving; a run
that reaches it has *not* converged, and the findings tables count such runs. A run with a linear
schedule that trains its whole budget ends with the learning rate at zero: it finished by its
schedule (:data:`BUDGET_PREFIX`), the rule of a fixed-budget profile (as transformers' run_glue.py:
a fixed number of epochs, linear decay, the best checkpoint kept).

:class:`EarlyStopping` holds only this bookkeeping (no torch, no I/O), so the training loop calls it
in one line and the tests feed it fixture curves.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field

CONVERGED_PREFIX = "early stopping"  # stop_reason of a run stopped by this criterion
BUDGET_PREFIX = "budget done"  # stop_reason of a run whose linear schedule ran to its end (learning rate 0)
CAP_REASON = "max_steps reached"  # stop_reason of a run that hit the step cap (constant schedule)


def better(value: float | None, best: float | None, higher_is_better: bool = True, min_delta: float = 0.0) -> bool:
    """Does ``value`` beat ``best`` by more than ``min_delta``? A missing or non-finite value never does."""
    if value is None or not math.isfinite(value):
        return False
    if best is None:
        return True
    gain = value - best if higher_is_better else best - value
    return gain > min_delta


@dataclass
class EarlyStopping:
    """Patience over the smoothed curve of a selection metric, never before ``min_steps`` (module docstring)."""

    patience: int | None  # evaluations without improvement before stopping; None: never stop
    higher_is_better: bool = True
    min_delta: float = 0.0
    window: int = 1  # evaluations averaged into the watched value (1: the raw curve)
    min_steps: int = 0  # optimizer steps before which the run cannot stop
    best: float | None = None  # best smoothed value so far
    bad_evaluations: int = 0
    evaluations: int = 0
    step: int = 0
    recent: deque = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.recent = deque(maxlen=max(1, int(self.window)))

    def smoothed(self, value: float | None) -> float | None:
        """Add one raw value; the mean of the last ``window`` finite values (None for a missing value)."""
        if value is None or not math.isfinite(value):
            return None
        self.recent.append(float(value))
        return sum(self.recent) / len(self.recent)

    def update(self, value: float | None, step: int | None = None) -> bool:
        """Record one evaluation (at optimizer ``step``); True when the smoothed curve improved."""
        self.evaluations += 1
        if step is not None:
            self.step = int(step)
        watched = self.smoothed(value)
        if better(watched, self.best, self.higher_is_better, self.min_delta):
            self.best = watched
            self.bad_evaluations = 0
            return True
        self.bad_evaluations += 1
        return False

    @property
    def should_stop(self) -> bool:
        return self.patience is not None and self.bad_evaluations >= self.patience and self.step >= self.min_steps

    def reason(self) -> str:
        smoothed = f" of the mean of {self.window}" if self.window > 1 else ""
        after = f", after the minimum of {self.min_steps} steps" if self.min_steps else ""
        return f"{CONVERGED_PREFIX}: no improvement{smoothed} in {self.patience} evaluations{after}"


def budget_reason(step: int) -> str:
    return f"{BUDGET_PREFIX}: the linear schedule ended at step {step} (learning rate 0)"


def converged(record: dict) -> bool | None:
    """Did this run finish learning by its profile's rule: stopped by the convergence criterion, or a linear
    schedule run to its end (a fixed budget)? False for the step cap of a constant schedule or the end of
    its epochs; None when the record does not say."""
    reason = (record.get("training") or {}).get("stop_reason")
    if not reason:
        return None
    return str(reason).startswith((CONVERGED_PREFIX, BUDGET_PREFIX))


def hit_cap(record: dict) -> bool:
    """Did this run stop at the step cap (so it may not have converged)?"""
    return (record.get("training") or {}).get("stop_reason") == CAP_REASON


def steps_for_epochs(epochs: float | None, steps_per_epoch: int) -> int:
    """Optimizer steps in ``epochs`` passes over the training data (0 for None)."""
    return int(math.ceil((epochs or 0.0) * steps_per_epoch))


def late_change(record: dict, evaluations: int = 3, per_steps: int = 10) -> float | None:
    """How fast a run's selection curve still moved when it ended: the least-squares slope of its main metric
    over its last ``evaluations`` selection evaluations, per ``per_steps`` optimizer steps (for a loss,
    negative means still falling). None with fewer evaluations than that, or without a main metric."""
    metric = (record.get("main_metric") or {}).get("name")
    points = [(float(e["step"]), e["metrics"].get(metric)) for e in record.get("evaluations") or []
              if e.get("role") == "selection" and e.get("checkpoint", "current") == "current"]
    points = [(x, float(y)) for x, y in points if y is not None and math.isfinite(y)][-evaluations:]
    if len(points) < max(2, evaluations):
        return None
    mx = sum(x for x, _ in points) / len(points)
    my = sum(y for _, y in points) / len(points)
    sxx = sum((x - mx) ** 2 for x, _ in points)
    return per_steps * sum((x - mx) * (y - my) for x, y in points) / sxx if sxx else None
