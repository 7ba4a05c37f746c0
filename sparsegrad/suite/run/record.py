"""The run record: one JSON file per fine-tuning run, the single source of truth for every table.

``record.json`` lives in the run's output folder and is written atomically (a temporary file in
the same folder, then ``os.replace``), so a reader never sees half a record, even when a run is
interrupted while writing. :func:`validate` checks a record against :data:`SCHEMA`; table builders
should call :func:`load` (which validates) rather than ``json.load``.

Schema (version 1); ``|None`` marks fields that may be null:

* ``schema_version`` int; ``run_id`` str; ``status`` completed | interrupted | failed | diverged;
  ``error`` str|None; ``started_at`` / ``finished_at`` ISO-8601 UTC; ``wall_seconds`` float
* ``model`` / ``method`` / ``task`` str (config names); ``seed`` int; ``output_dir`` str
* ``config``: the resolved Hydra config (dict)
* ``environment``: ``git_commit`` str|None, ``git_dirty`` bool|None, ``python``, ``platform``,
  ``packages`` {name: version}, ``device`` (e.g. "cpu", "cuda:0 NVIDIA H100"), ``device_type``,
  ``torch_threads`` int, ``cpu_count`` int|None
* ``parameters``: ``total`` int, ``trainable_dense`` int (parameters the optimizer updates densely),
  ``sparse_matrices`` int, ``sparse_budget_per_matrix`` int|None, ``sparse_budget_total`` int|None,
  ``updated_coordinates_union`` int|None (distinct sparse coordinates updated at least once),
  ``optimizer_state_bytes`` int|None
* ``main_metric``: ``name``, ``higher_is_better`` bool, ``selection_split``, ``report_splits`` [str],
  ``report_split`` (the split whose main metric is the run's score)
* ``evaluations``: [{``step`` int, ``epoch`` float, ``split`` str, ``role`` selection|report,
  ``checkpoint`` current|best, ``metrics`` {name: float|None}}] — every evaluation, in order
* ``best``: {``step`` int, ``selection`` {metrics}, ``report`` {split: {metrics}}, ``score`` float|None}|None
  — the kept checkpoint: the restored best one, or the final weights with ``trainer.checkpoint=final``;
  ``score`` is the main metric on ``report_split``
* ``final``: same shape as ``best``, for the weights at the end of training|None
* ``objective``: float|None — what the entry point returns (the main metric of the best checkpoint on
  the selection split, or on the reported split with ``trainer.objective=report``)
* ``training``: ``optimizer_steps``, ``epochs`` float, ``samples``, ``tokens`` (non-padding inputs),
  ``train_seconds`` (training steps only), ``eval_seconds``, ``timed_steps``, ``warmup_steps_excluded``,
  ``steps_per_second`` float|None, ``samples_per_second`` float|None (both after warm-up, evaluation
  excluded), ``stop_reason`` str, ``last_loss`` float|None
* ``memory``: ``device_type``, ``how`` (measurement method), ``baseline_bytes`` int|None (before
  training), ``train_peak_bytes`` int|None, ``eval_peak_bytes`` int|None; since the live-bytes gauge
  (optional, absent in older records) ``gauge`` (``live_tensor_bytes`` on CPU,
  ``cuda_max_memory_allocated`` on CUDA: every ``*_bytes`` field above is that gauge; older CPU records
  hold the peak RSS there), ``basis_peak_bytes`` int|None (the preliminary phase), ``measured_entries``
  {phase: entries measured}, ``rss`` {``baseline_bytes``, ``basis_peak_bytes``, ``train_peak_bytes``,
  ``eval_peak_bytes``}|None (CPU: the process's peak resident set size, beside the gauge)
* ``basis``: {``seconds``, ``peak_bytes``, ``batches`` int, ``orientation``}|None — SparseGrad only
* ``examples`` (optional, absent in older records): {``split``, ``checkpoint``, ``n``, and per example of
  that split in dataset order ``correct`` (a string of 0/1), ``predictions`` / ``labels`` (lists) or
  ``loss_sums`` / ``tokens`` (lists, language modelling)}|None — what a bootstrap over the test examples
  needs (:mod:`sparsegrad.suite.run.examples`)
* ``logger``: {``name``, ``mode``, ``dir``}|None
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any

SCHEMA_VERSION = 1
STATUSES = ("completed", "interrupted", "failed", "diverged")
RECORD_FILENAME = "record.json"

_NUM = (int, float)
_OPT_NUM = (int, float, type(None))
_OPT_INT = (int, type(None))
_OPT_STR = (str, type(None))

SCHEMA: dict[str, Any] = {
    "schema_version": int,
    "run_id": str,
    "status": str,
    "error": _OPT_STR,
    "started_at": str,
    "finished_at": str,
    "wall_seconds": _NUM,
    "model": str,
    "method": str,
    "task": str,
    "seed": int,
    "output_dir": str,
    "config": dict,
    "environment": {
        "git_commit": _OPT_STR,
        "git_dirty": (bool, type(None)),
        "python": str,
        "platform": str,
        "packages": dict,
        "device": str,
        "device_type": str,
        "torch_threads": int,
        "cpu_count": _OPT_INT,
    },
    "parameters": {
        "total": int,
        "trainable_dense": int,
        "sparse_matrices": int,
        "sparse_budget_per_matrix": _OPT_INT,
        "sparse_budget_total": _OPT_INT,
        "updated_coordinates_union": _OPT_INT,
        "optimizer_state_bytes": _OPT_INT,
    },
    "main_metric": {
        "name": str,
        "higher_is_better": bool,
        "selection_split": str,
        "report_splits": list,
        "report_split": str,
    },
    "evaluations": list,
    "best": (dict, type(None)),
    "final": (dict, type(None)),
    "objective": _OPT_NUM,
    "training": {
        "optimizer_steps": int,
        "epochs": _NUM,
        "samples": int,
        "tokens": int,
        "train_seconds": _NUM,
        "eval_seconds": _NUM,
        "timed_steps": int,
        "warmup_steps_excluded": int,
        "steps_per_second": _OPT_NUM,
        "samples_per_second": _OPT_NUM,
        "stop_reason": str,
        "last_loss": _OPT_NUM,
    },
    "memory": {
        "device_type": str,
        "how": str,
        "baseline_bytes": _OPT_INT,
        "train_peak_bytes": _OPT_INT,
        "eval_peak_bytes": _OPT_INT,
    },
    "basis": (dict, type(None)),
    "logger": (dict, type(None)),
}

OPTIONAL: dict[str, Any] = {  # keys a record may lack (written before they existed)
    "memory": {"gauge": str, "basis_peak_bytes": _OPT_INT, "measured_entries": dict, "rss": (dict, type(None))},
    "examples": (dict, type(None)),
}
EVALUATION_KEYS = {"step": int, "epoch": _NUM, "split": str, "role": str, "checkpoint": str, "metrics": dict}
CHECKPOINT_KEYS = {"step": int, "selection": dict, "report": dict, "score": _OPT_NUM}
BASIS_KEYS = {"seconds": _NUM, "peak_bytes": _OPT_INT, "batches": int, "orientation": _OPT_STR}


class RecordError(ValueError):
    """A run record does not match the schema; the message lists every problem."""


def _type_name(expected) -> str:
    types = expected if isinstance(expected, tuple) else (expected,)
    return " or ".join("null" if t is type(None) else t.__name__ for t in types)


def _check(obj: Any, spec: dict, where: str, problems: list[str]) -> None:
    if not isinstance(obj, dict):
        problems.append(f"{where}: expected an object, got {type(obj).__name__}")
        return
    for key, expected in spec.items():
        path = f"{where}.{key}" if where else key
        if key not in obj:
            problems.append(f"{path}: missing")
            continue
        value = obj[key]
        if isinstance(expected, dict):
            _check(value, expected, path, problems)
        elif isinstance(value, bool) and expected in (int, _NUM, _OPT_INT, _OPT_NUM):
            problems.append(f"{path}: expected {_type_name(expected)}, got bool")
        elif not isinstance(value, expected):
            problems.append(f"{path}: expected {_type_name(expected)}, got {type(value).__name__}")


def _check_metrics(metrics: Any, where: str, problems: list[str]) -> None:
    if not isinstance(metrics, dict):
        problems.append(f"{where}: expected an object of metrics")
        return
    for name, value in metrics.items():
        if value is not None and (isinstance(value, bool) or not isinstance(value, _NUM)):
            problems.append(f"{where}.{name}: expected a number or null, got {type(value).__name__}")


def _check_optional(obj: Any, spec: dict, where: str, problems: list[str]) -> None:
    if not isinstance(obj, dict):
        return
    for key, expected in spec.items():
        path = f"{where}.{key}" if where else key
        if key not in obj:
            continue
        if isinstance(expected, dict):
            _check_optional(obj[key], expected, path, problems)
        else:
            _check({key: obj[key]}, {key: expected}, where, problems)


def validate(record: dict) -> dict:
    """Return ``record`` unchanged if it matches the schema, else raise RecordError listing the problems."""
    problems: list[str] = []
    _check(record, SCHEMA, "", problems)
    _check_optional(record, OPTIONAL, "", problems)
    if isinstance(record, dict):
        if record.get("schema_version") not in (None, SCHEMA_VERSION) and isinstance(record.get("schema_version"), int):
            problems.append(f"schema_version: this code reads version {SCHEMA_VERSION}, got {record['schema_version']}")
        if "status" in record and record["status"] not in STATUSES:
            problems.append(f"status: {record['status']!r} is not one of {STATUSES}")
        for i, ev in enumerate(record.get("evaluations") or []):
            _check(ev, EVALUATION_KEYS, f"evaluations[{i}]", problems)
            if isinstance(ev, dict):
                _check_metrics(ev.get("metrics"), f"evaluations[{i}].metrics", problems)
                if ev.get("role") not in ("selection", "report"):
                    problems.append(f"evaluations[{i}].role: {ev.get('role')!r} is not selection or report")
        for key in ("best", "final"):
            checkpoint = record.get(key)
            if isinstance(checkpoint, dict):
                _check(checkpoint, CHECKPOINT_KEYS, key, problems)
                _check_metrics(checkpoint.get("selection"), f"{key}.selection", problems)
                for split, metrics in (checkpoint.get("report") or {}).items():
                    _check_metrics(metrics, f"{key}.report.{split}", problems)
        if isinstance(record.get("basis"), dict):
            _check(record["basis"], BASIS_KEYS, "basis", problems)
        if record.get("status") == "completed" and record.get("best") is None:
            problems.append("best: a completed run must report its best checkpoint")
    if problems:
        raise RecordError("invalid run record:\n  " + "\n  ".join(problems))
    return record


def new_record(*, model: str, method: str, task: str, seed: int, output_dir: str, config: dict, environment: dict,
               main_metric: str, higher_is_better: bool, device_type: str, memory_how: str,
               timing_warmup_steps: int, memory_gauge: str | None = None) -> dict:
    """A record for a run that is starting: status failed (until the run says otherwise), nothing measured yet."""
    import uuid
    from datetime import UTC, datetime

    now = datetime.now(UTC).isoformat(timespec="seconds")
    return {
        "schema_version": SCHEMA_VERSION,
        "run_id": uuid.uuid4().hex[:12],
        "status": "failed",
        "error": None,
        "started_at": now,
        "finished_at": now,
        "wall_seconds": 0.0,
        "model": model,
        "method": method,
        "task": task,
        "seed": seed,
        "output_dir": output_dir,
        "config": config,
        "environment": environment,
        "parameters": {"total": 0, "trainable_dense": 0, "sparse_matrices": 0, "sparse_budget_per_matrix": None,
                       "sparse_budget_total": None, "updated_coordinates_union": None, "optimizer_state_bytes": None},
        "main_metric": {"name": main_metric, "higher_is_better": higher_is_better, "selection_split": "",
                        "report_splits": [], "report_split": ""},
        "evaluations": [],
        "best": None,
        "final": None,
        "objective": None,
        "training": {"optimizer_steps": 0, "epochs": 0.0, "samples": 0, "tokens": 0, "train_seconds": 0.0,
                     "eval_seconds": 0.0, "timed_steps": 0, "warmup_steps_excluded": timing_warmup_steps,
                     "steps_per_second": None, "samples_per_second": None, "stop_reason": "not started",
                     "last_loss": None},
        "memory": {"device_type": device_type, "how": memory_how, "baseline_bytes": None, "train_peak_bytes": None,
                   "eval_peak_bytes": None, **({"gauge": memory_gauge} if memory_gauge else {})},
        "basis": None,
        "logger": None,
    }


def _json_safe(value):
    """nan/inf become null: strict JSON has no such numbers and table builders must not choke on them."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def write(record: dict, output_dir: str | os.PathLike, validate_first: bool = True) -> Path:
    """Write ``record.json`` atomically into ``output_dir``; returns its path."""
    record = _json_safe(record)
    if validate_first:
        validate(record)
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    target = output_dir / RECORD_FILENAME
    fd, tmp = tempfile.mkstemp(prefix=".record.", suffix=".json.tmp", dir=output_dir)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            json.dump(record, fh, indent=2, sort_keys=False, allow_nan=False)
            fh.write("\n")
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, target)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return target


def load(path: str | os.PathLike) -> dict:
    """Read and validate one record (a ``record.json`` path or the run folder holding it)."""
    path = Path(path)
    if path.is_dir():
        path = path / RECORD_FILENAME
    with open(path, encoding="utf-8") as fh:
        return validate(json.load(fh))


def find_records(root: str | os.PathLike) -> list[Path]:
    """Every ``record.json`` below ``root``, sorted."""
    return sorted(Path(root).rglob(RECORD_FILENAME))
