"""Per-study sweep figures from the trial records: Optuna's optimisation history and the objective vs lr.

Drawn with matplotlib from the sweep-stage run records (one panel per study = (model, method, task)),
so they need neither plotly nor the study database and stay pure functions of the records:

* ``sweep_history`` — each trial's objective (selection split) in the order the trials ran, with the
  best-so-far line, as ``optuna.visualization.plot_optimization_history`` draws it; diverged or
  failed trials are marked at the bottom of the panel.
* ``sweep_objective_vs_lr`` — each trial's objective against its learning rate (log axis), coloured by
  batch size, the best trial ringed: a best at the left or right end of the points means the searched
  range may not bracket the optimum (the best-settings table flags it too).
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

from sparsegrad.suite.report.plotting import pyplot, save_figure


def by_study(records: list[dict], stage: str = "sweep") -> dict[tuple[str, str, str], list[dict]]:
    """The records of one stage per (model, method, task), each study's in the order they started."""
    out: dict[tuple[str, str, str], list[dict]] = defaultdict(list)
    for r in records:
        if r.get("_stage") == stage:
            out[(r["model"], r["method"], r["task"])].append(r)
    for rs in out.values():
        rs.sort(key=lambda r: (r.get("started_at") or "", r.get("run_id") or ""))
    return dict(sorted(out.items()))


def _value(r: dict) -> float | None:
    v = r.get("objective")
    if r.get("status") != "completed" or v is None:
        return None
    higher = (r.get("main_metric") or {}).get("higher_is_better", True)
    return 100.0 * float(v) if higher else float(v)


def _grid(n: int):
    cols = min(4, n)
    rows = (n + cols - 1) // cols
    fig, axes = pyplot().subplots(rows, cols, figsize=(4.2 * cols, 3.2 * rows), squeeze=False, layout="constrained")
    for ax in axes.flat[n:]:
        ax.set_visible(False)
    return fig, list(axes.flat)


def per_study(records: list[dict], out_dir: Path, draw, xlabel: str, title: str, name: str, stage: str = "sweep",
              ylabel: str = "objective") -> list[Path]:
    """One panel per study: ``draw(ax, records_of_the_study, higher_is_better)`` fills it, the frame is shared."""
    studies = by_study(records, stage)
    if not studies:
        return []
    fig, axes = _grid(len(studies))
    for ax, ((model, method, task), rs) in zip(axes, studies.items()):
        higher = (rs[0].get("main_metric") or {}).get("higher_is_better", True)
        draw(ax, rs, higher)
        ax.set_title(f"{model} / {method} / {task}", fontsize=8)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel + (" (x100)" if higher else ""))
        ax.grid(alpha=0.3)
    fig.suptitle(title, fontsize=10)
    return save_figure(fig, out_dir, name)


def _draw_history(ax, rs: list[dict], higher: bool) -> None:
    xs = list(range(len(rs)))
    vals = [_value(r) for r in rs]
    ok = [(x, v) for x, v in zip(xs, vals) if v is not None]
    if ok:
        ax.plot([x for x, _ in ok], [v for _, v in ok], "o", color="C0", label="trial")
        best, line = None, []
        for v in vals:
            if v is not None and (best is None or (v > best if higher else v < best)):
                best = v
            line.append(best)
        ax.step(xs, line, where="post", color="C3", label="best so far")
        bad = [x for x, v in zip(xs, vals) if v is None]
        if bad:
            low = min(v for _, v in ok)
            ax.plot(bad, [low] * len(bad), "x", color="C7", label="diverged / failed")
    ax.legend(fontsize=6)


def _draw_objective_vs_lr(ax, rs: list[dict], higher: bool) -> None:
    points = []
    for r in rs:
        trainer = (r.get("config") or {}).get("trainer") or {}
        v = _value(r)
        if v is not None and trainer.get("lr") is not None:
            points.append((float(trainer["lr"]), v, int(trainer.get("batch_size") or 0)))
    for i, bs in enumerate(sorted({p[2] for p in points})):
        sel = [p for p in points if p[2] == bs]
        ax.plot([p[0] for p in sel], [p[1] for p in sel], "o", color=f"C{i}", label=f"batch {bs}")
    if points:
        best = max(points, key=lambda p: p[1]) if higher else min(points, key=lambda p: p[1])
        ax.plot([best[0]], [best[1]], "o", ms=12, mfc="none", mec="C3", label="best")
        ax.legend(fontsize=6)
    ax.set_xscale("log")


def history(records: list[dict], out_dir: Path) -> list[Path]:
    return per_study(records, out_dir, _draw_history, "trial",
                      "Optimisation history per study (selection-split objective)", "sweep_history")  # fmt: skip


def objective_vs_lr(records: list[dict], out_dir: Path) -> list[Path]:
    return per_study(records, out_dir, _draw_objective_vs_lr, "learning rate",
                      "Objective vs learning rate per study", "sweep_objective_vs_lr")  # fmt: skip


def write_all(records: list[dict], fig_dir: Path) -> list[Path]:
    return history(records, fig_dir) + objective_vs_lr(records, fig_dir)
