"""What a sweep searched, from its trial records: the range tried and whether the best sits at its edge.

A best learning rate equal to the smallest (or largest) learning rate the study tried means the optimum
may lie outside the searched range: the best-settings table flags it, and the search space (or the
number of trials) should grow before the setting is trusted. Pure functions of run records.
"""

from __future__ import annotations

import math
from collections import defaultdict


def _lr_bs(record: dict) -> tuple[float | None, int | None]:
    trainer = (record.get("config") or {}).get("trainer") or {}
    lr, bs = trainer.get("lr"), trainer.get("batch_size")
    return (float(lr) if lr is not None else None), (int(bs) if bs is not None else None)


def tried(records: list[dict]) -> dict[tuple[str, str, str], dict[str, list]]:
    """(model, method, task) -> {"lr": [...], "batch_size": [...]} over every sweep trial that ran to the end."""
    out: dict[tuple[str, str, str], dict[str, list]] = defaultdict(lambda: {"lr": [], "batch_size": []})
    for r in records:
        if r.get("_stage") != "sweep" or r.get("status") not in ("completed", "diverged"):
            continue
        lr, bs = _lr_bs(r)
        key = (r["model"], r["method"], r["task"])
        if lr is not None:
            out[key]["lr"].append(lr)
        if bs is not None:
            out[key]["batch_size"].append(bs)
    return out


def edge_flag(best: dict | None, trials: dict[str, list]) -> str:
    """'' when the best setting is inside the tried range, else which edge it sits at."""
    if best is None:
        return ""
    lr, bs = _lr_bs(best)
    flags = []
    lrs = trials.get("lr") or []
    if lr is not None and len(set(lrs)) >= 2:
        if math.isclose(lr, min(lrs), rel_tol=1e-9):
            flags.append("lr lowest tried")
        elif math.isclose(lr, max(lrs), rel_tol=1e-9):
            flags.append("lr highest tried")
    bss = trials.get("batch_size") or []
    if bs is not None and len(set(bss)) >= 3 and bs in (min(bss), max(bss)):  # 2 choices: always an edge
        flags.append(f"batch {'smallest' if bs == min(bss) else 'largest'} tried")
    return "EDGE: " + ", ".join(flags) if flags else ""


def lr_range(trials: dict[str, list]) -> str:
    lrs = trials.get("lr") or []
    return f"{min(lrs):.1e}–{max(lrs):.1e}" if lrs else "—"
