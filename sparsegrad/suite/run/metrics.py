"""Task metrics, computed exactly as GLUE defines them (scikit-learn / scipy, no Hub downloads).

The formulas are those of the GLUE metric script: CoLA Matthews correlation, STS-B Pearson and
Spearman correlation, MRPC/QQP accuracy and F1 (positive class 1), accuracy elsewhere. Language
modelling tasks report the token-weighted loss and its perplexity.

Constant predictions make correlations undefined; we return ``nan`` for them (never raise) so
that a run which collapsed to one class is still recorded and simply loses model selection.
"""

from __future__ import annotations

import math
import warnings

import numpy as np

CLASSIFICATION_METRICS = ("accuracy", "f1", "matthews_correlation")
REGRESSION_METRICS = ("pearson", "spearmanr")


def accuracy(predictions, labels) -> float:
    predictions, labels = np.asarray(predictions), np.asarray(labels)
    if labels.size == 0:
        return math.nan
    return float((predictions == labels).mean())


def f1_binary(predictions, labels) -> float:
    from sklearn.metrics import f1_score

    return float(f1_score(np.asarray(labels), np.asarray(predictions), zero_division=0.0))


def matthews_correlation(predictions, labels) -> float:
    from sklearn.metrics import matthews_corrcoef

    return float(matthews_corrcoef(np.asarray(labels), np.asarray(predictions)))


def _correlation(kind: str, predictions, labels) -> float:
    from scipy import stats

    predictions = np.asarray(predictions, dtype=np.float64)
    labels = np.asarray(labels, dtype=np.float64)
    if predictions.size < 2 or np.all(predictions == predictions[0]) or np.all(labels == labels[0]):
        return math.nan  # undefined for constant input
    if not (np.isfinite(predictions).all() and np.isfinite(labels).all()):
        return math.nan
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        value = stats.pearsonr(predictions, labels)[0] if kind == "pearson" else stats.spearmanr(predictions, labels)[0]
    return float(value)


def pearson(predictions, labels) -> float:
    return _correlation("pearson", predictions, labels)


def spearman(predictions, labels) -> float:
    return _correlation("spearman", predictions, labels)


def compute(metric_names, predictions, labels) -> dict[str, float]:
    """The named metrics for one split. Classification ``predictions`` are class ids."""
    table = {
        "accuracy": accuracy,
        "f1": f1_binary,
        "matthews_correlation": matthews_correlation,
        "pearson": pearson,
        "spearmanr": spearman,
    }
    unknown = [m for m in metric_names if m not in table]
    if unknown:
        raise ValueError(f"unknown metric(s) {unknown}; known: {sorted(table)}")
    return {name: table[name](predictions, labels) for name in metric_names}


def perplexity(mean_loss: float) -> float:
    """exp(loss), capped so a diverged model gives inf rather than an OverflowError."""
    if not math.isfinite(mean_loss):
        return math.inf
    return math.exp(mean_loss) if mean_loss < 700 else math.inf


def is_better(value: float, best: float | None, higher_is_better: bool) -> bool:
    """True when ``value`` improves on ``best``; nan never improves, anything beats no best."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return False
    if best is None or (isinstance(best, float) and math.isnan(best)):
        return True
    return value > best if higher_is_better else value < best
