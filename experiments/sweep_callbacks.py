"""Hydra callbacks for Optuna sweeps (configured in conf/hparams_search/*.yaml).

The Optuna sweeper (hydra-optuna-sweeper 1.3) crashes on a NaN objective: it tells Optuna the value,
Optuna rejects it, and the sweeper then tells FAIL *with* the value, which raises again and ends the
whole sweep. A diverged run returns NaN (its run record says "diverged"), so :class:`TrialGuard`
turns every job without a finite objective into a failed job; the sweeper then tells Optuna FAIL
(with ``max_failure_rate: 1.0`` it carries on with the next trial).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from hydra.core.utils import JobReturn, JobStatus
from hydra.experimental.callback import Callback
from omegaconf import DictConfig


class TrialFailed(RuntimeError):
    """Raised (as the job's return value) for a trial that diverged, failed or returned no number."""


def _record_status(output_dir: str | None) -> str | None:
    if not output_dir:
        return None
    path = Path(output_dir) / "record.json"
    try:
        return json.loads(path.read_text(encoding="utf-8")).get("status")
    except (OSError, ValueError):
        return None


class TrialGuard(Callback):
    def on_job_end(self, config: DictConfig, job_return: JobReturn, **kwargs: Any) -> None:
        if job_return.status != JobStatus.COMPLETED:
            return  # already failed: the sweeper tells Optuna FAIL
        value = job_return._return_value
        try:
            finite = value is not None and math.isfinite(float(value))
        except (TypeError, ValueError):
            finite = False
        if finite:
            return
        output_dir = None
        if job_return.hydra_cfg is not None:
            output_dir = job_return.hydra_cfg.hydra.runtime.output_dir
        status = _record_status(output_dir) or "no objective"
        job_return.status = JobStatus.FAILED
        job_return.return_value = TrialFailed(f"trial {status} (objective {value!r}); run folder {output_dir}")
