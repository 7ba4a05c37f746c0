"""The best-trial history of each study, as a table: a pure function of the sweep run records.

One row per trial in the order the trials started, with its setting, how it ended, its objective and
the best objective so far under the driver's own rule (:func:`sparsegrad.suite.sweep.studies.tie_break_key`):
the row marked "best" is the trial whose setting the seed re-runs use.
"""

from __future__ import annotations

from collections import defaultdict

from sparsegrad.suite.sweep.runrecords import best_sweep_records, setting


def _shown(objective: float | None, higher: bool) -> str:
    if objective is None:
        return "—"
    return f"{100 * objective:.1f}" if higher else f"{objective:.3f}"


def history_table(records: list[dict]):
    """Table ``sweep_history``: per (model, method, task), every sweep trial and the best so far."""
    from sparsegrad.suite.report.table_format import Table, fmt_lr

    studies: dict[tuple[str, str, str], list[dict]] = defaultdict(list)
    for r in records:
        if r.get("_stage") == "sweep":
            studies[(r["model"], r["method"], r["task"])].append(r)
    best = best_sweep_records(records)
    rows = []
    for key in sorted(studies):
        trials = sorted(studies[key], key=lambda r: (r.get("started_at") or "", r["run_id"]))
        higher = (trials[0].get("main_metric") or {}).get("higher_is_better", True)
        so_far = None
        for i, r in enumerate(trials, 1):
            value = r.get("objective") if r.get("status") == "completed" else None
            if value is not None and (so_far is None or (value > so_far if higher else value < so_far)):
                so_far = value
            lr, bs = setting(r)
            rows.append([*key, str(i), fmt_lr(lr), str(bs) if bs else "—", str(r.get("status")),
                         _shown(value, higher), _shown(so_far, higher), "best" if best.get(key) is r else ""])
    notes = ["Trials in the order they started. Objective: the selection-split metric (×100 for scores). "
             "'best' marks the trial whose setting the seed re-runs use: the best objective, and among equal "
             "objectives the trial that started first (the driver and every table use this one rule)."]
    return Table("sweep_history", "Sweep history — each study's trials and the best objective so far",
                 ["model", "method", "task", "trial", "lr", "batch", "status", "objective", "best so far", ""],
                 rows, notes)
