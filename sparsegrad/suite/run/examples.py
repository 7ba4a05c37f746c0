"""Per-example results of one evaluation, kept compactly in the run record, and the main metric recomputed
on any resample of them (what a bootstrap over the test examples needs).

A record's ``examples`` holds, for the reported split at the restored best checkpoint, one entry per
example in the split's own order:

* classification: ``predictions`` and ``labels`` (class ids; a string of digits when every id is below 10,
  so 1,500 test sentences take 3 kB), from which correctness and every GLUE metric follow;
* regression: ``predictions`` and ``labels`` as lists of floats (6 significant digits);
* language modelling: ``loss_sums`` (the summed token loss of each sequence, 6 significant digits) and
  ``tokens`` (the tokens carrying a loss); the split's loss is sum(loss_sums) / sum(tokens).

:func:`metric` recomputes a main metric from such an entry, on every example or on the indices of a
resample (repeats allowed). Pure functions of plain data: no torch.
"""

from __future__ import annotations

import math

import numpy as np

from sparsegrad.suite.run import metrics as metrics_lib
from sparsegrad.suite.run.tasks import CAUSAL_LM, REGRESSION

__all__ = ["accuracy_resamples", "arrays", "entry", "metric"]


def _ids(values) -> str | list[int]:
    ids = [int(v) for v in values]
    return "".join(map(str, ids)) if all(0 <= v < 10 for v in ids) else ids


def _floats(values) -> list[float]:
    return [float(f"{float(v):.6g}") for v in values]


def _decode_ids(values) -> np.ndarray:
    if isinstance(values, str):
        return np.frombuffer(values.encode("ascii"), dtype=np.uint8).astype(np.int64) - ord("0")
    return np.asarray(values, dtype=np.int64)


def entry(kind: str, split: str, checkpoint: str, *, predictions=None, labels=None, loss_sums=None,
          tokens=None) -> dict:
    """The compact record entry of one evaluation (arrays in the split's order); ``kind`` is the task's
    (:data:`sparsegrad.suite.run.tasks.CLASSIFICATION`, ``REGRESSION`` or ``CAUSAL_LM``)."""
    out = {"split": split, "checkpoint": checkpoint, "kind": kind}
    if kind == CAUSAL_LM:
        out.update(n=len(tokens), loss_sums=_floats(loss_sums), tokens=[int(t) for t in tokens])
    elif kind == REGRESSION:
        out.update(n=len(labels), predictions=_floats(predictions), labels=_floats(labels))
    else:
        out.update(n=len(labels), predictions=_ids(predictions), labels=_ids(labels))
    return out


def arrays(examples: dict) -> dict[str, np.ndarray]:
    """The entry's per-example arrays as NumPy arrays (decoded once, then indexed per resample)."""
    if examples["kind"] == CAUSAL_LM:
        return {"loss_sums": np.asarray(examples["loss_sums"], dtype=np.float64),
                "tokens": np.asarray(examples["tokens"], dtype=np.float64)}
    if examples["kind"] == REGRESSION:
        return {"predictions": np.asarray(examples["predictions"], dtype=np.float64),
                "labels": np.asarray(examples["labels"], dtype=np.float64)}
    return {"predictions": _decode_ids(examples["predictions"]), "labels": _decode_ids(examples["labels"])}


def metric(kind: str, data: dict[str, np.ndarray], name: str, index: np.ndarray | None = None) -> float:
    """The metric ``name`` of the examples ``index`` (all when None) of one entry's :func:`arrays`.

    ``loss``/``perplexity`` for language modelling (token-weighted, as the evaluation computes them);
    any metric of :func:`sparsegrad.suite.run.metrics.compute` otherwise."""
    pick = (lambda a: a) if index is None else (lambda a: a[index])
    if kind == CAUSAL_LM:
        tokens = pick(data["tokens"]).sum()
        loss = float(pick(data["loss_sums"]).sum() / tokens) if tokens else math.nan
        return metrics_lib.perplexity(loss) if name == "perplexity" else loss
    return metrics_lib.compute([name], pick(data["predictions"]), pick(data["labels"]))[name]


def accuracy_resamples(data: dict[str, np.ndarray], index: np.ndarray) -> np.ndarray:
    """Accuracy of each row of ``index`` (resamples x examples) at once: the common case, vectorised."""
    correct = (data["predictions"] == data["labels"]).astype(np.float64)
    return correct[index].mean(axis=1)
