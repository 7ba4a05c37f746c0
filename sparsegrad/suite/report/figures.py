"""The paper's figures from run records and the sparsity-analysis record (matplotlib, Agg; PNG and PDF).

* Figure 2 — a weight gradient in the original space beside the SparseGrad space (block-averaged
  |entries|), the histograms of their magnitudes, and the share of gradient energy in the top 1% of
  entries for the original space, the HOSVD basis, the authors' orientation and a random basis.
  Source: ``analysis/sparsity.json`` written by ``experiments/sparsity_analysis.py`` (:mod:`sparsegrad.suite.run.sparsity`).
* Figure 3 — the row structure of dL/dỸ at the first training step and the share of its non-zero rows
  and entries over training, per layer. Same source.
* Pareto — peak training memory vs score per method, one panel per model, from the seed re-runs.
* Selection curves — per study, every seed run's main metric on the selection split at each
  evaluation (the curve its run record carries), its kept checkpoint and where and why it stopped.
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

from sparsegrad.suite.report.plotting import pyplot as _plt
from sparsegrad.suite.report.plotting import save_figure as _save
from sparsegrad.suite.report.tables import METHOD_LABEL, METHOD_ORDER, final_runs, mean_std, score_of
from sparsegrad.suite.run.convergence import BUDGET_PREFIX, CAP_REASON, CONVERGED_PREFIX

SPACE_LABEL = {"original": "original space", "hosvd": "SparseGrad (HOSVD basis)",
               "official": "authors' orientation", "random": "random orthogonal basis"}


def figure2(analysis: dict, out_dir: Path) -> list[Path]:
    plt = _plt()
    import numpy as np

    fig, axes = plt.subplots(1, 4, figsize=(18, 4.6), gridspec_kw={"width_ratios": [1, 1.2, 1.4, 1.2]},
                             layout="constrained")
    for ax, space in zip(axes[:2], ("original", "hosvd")):
        from matplotlib.colors import LogNorm

        mat = np.clip(np.array(analysis["heatmaps"][space], dtype=float), 1e-4, 1.0)
        im = ax.imshow(mat, aspect="auto", cmap="magma", norm=LogNorm(vmin=1e-4, vmax=1), interpolation="nearest")
        ax.set_title(f"|dL/dW|, {SPACE_LABEL[space]}", fontsize=9)
        ax.set_xlabel("input dim (block means)")
        ax.set_ylabel("output dim (block means)")
    fig.colorbar(im, ax=axes[1], label="block mean |entry| / max (log)")
    edges = np.array(analysis["histogram_edges_log10_rel"])
    centers = (edges[:-1] + edges[1:]) / 2
    ax = axes[2]
    for space in ("original", "hosvd", "official"):
        counts = np.array(analysis["histograms"].get(space, []), dtype=float)
        if counts.size:
            ax.step(centers, counts / counts.sum(), where="mid", label=SPACE_LABEL[space])
    ax.set_yscale("log")
    ax.set_xlabel("log10 |entry| / max |entry|")
    ax.set_ylabel("share of entries")
    ax.set_title(f"magnitudes, {analysis['shown_layer'].split('.', 1)[-1]}", fontsize=9)
    ax.legend(fontsize=7)
    ax = axes[3]
    shares = analysis["energy_top_share"]
    names = [s for s in ("original", "hosvd", "official", "random") if shares.get(s) is not None]
    ax.bar(range(len(names)), [100 * shares[s] for s in names], color=["C0", "C1", "C2", "C7"][: len(names)])
    for i, s in enumerate(names):
        ax.text(i, 100 * shares[s] + 1, f"{100 * shares[s]:.0f}%", ha="center", fontsize=8)
    ax.set_xticks(range(len(names)))
    short = {"original": "original", "hosvd": "SparseGrad\n(HOSVD)", "official": "authors'\norientation",
             "random": "random\nbasis"}
    ax.set_xticklabels([short[s] for s in names], fontsize=8)
    ax.set_ylabel(f"energy in top {100 * analysis['top_fraction']:.0f}% of entries (%)")
    ax.set_ylim(0, 105)
    ax.set_title(f"{analysis['model']} on {analysis['task']}, mean over MLP layers", fontsize=9)
    fig.suptitle("Figure 2 — weight gradients are sparser in the transition basis", fontsize=11)
    return _save(fig, out_dir, "figure2_gradient_sparsity")


def figure3(analysis: dict, out_dir: Path) -> list[Path]:
    plt = _plt()
    import numpy as np

    training = analysis["training"]
    patterns = training.get("row_patterns_first_step") or {}
    fig, axes = plt.subplots(1, len(patterns) + 1, figsize=(5 * len(patterns) + 6.5, 4.4), layout="constrained",
                             gridspec_kw={"width_ratios": [1] * len(patterns) + [1.3]}, squeeze=False)
    axes = axes[0]
    for ax, (name, pattern) in zip(axes, sorted(patterns.items())):
        from matplotlib.colors import LogNorm

        arr = np.ma.masked_equal(np.array(pattern, dtype=float), 0.0)  # exact zeros drawn white
        cmap = plt.get_cmap("viridis").with_extremes(bad="white")
        im = ax.imshow(arr, aspect="auto", cmap=cmap, norm=LogNorm(vmin=1e-6, vmax=1), interpolation="nearest")
        fig.colorbar(im, ax=ax, label="‖row‖ / max (log); white: exactly zero")
        ax.set_xlabel("token position")
        ax.set_ylabel("sequence in batch")
        ax.set_title(f"‖row‖ of dL/dỸ at step 0\n{name.split('.', 1)[-1]}", fontsize=9)
    ax = axes[-1]
    steps = [e["step"] for e in training["per_step"]]
    layers = training["layers"]
    cmap = plt.get_cmap("viridis")
    for i, name in enumerate(layers):
        ys = [100 * e["layers"].get(name, {}).get("nonzero_rows", np.nan) for e in training["per_step"]]
        ax.plot(steps, ys, color=cmap(i / max(1, len(layers) - 1)), lw=1,
                label=name.split("layer.")[-1] if len(layers) <= 12 else None)
    ax.set_xlabel("training step")
    ax.set_ylabel("% non-zero rows of dL/dỸ")
    ax.set_ylim(0, 105)
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.set_title("row sparsity of the output gradient during SparseGrad training", fontsize=9)
    if len(layers) <= 12:
        ax.legend(fontsize=6, ncol=2)
    fig.suptitle("Figure 3 — dL/dỸ has whole zero rows (padding; in the last block all but [CLS])", fontsize=11)
    return _save(fig, out_dir, "figure3_output_gradient_rows")


def pareto(records: list[dict], out_dir: Path) -> list[Path]:
    """Peak training memory vs mean score per method (seed re-runs), one panel per model."""
    points: dict[str, dict[str, dict[str, list[float]]]] = defaultdict(lambda: defaultdict(lambda: {"s": [], "m": []}))
    for r in final_runs(records):
        score, mem = score_of(r), (r.get("memory") or {}).get("train_peak_bytes")
        if r.get("status") != "completed" or score is None or mem is None:
            continue
        points[r["model"]][r["method"]]["s"].append(score)
        points[r["model"]][r["method"]]["m"].append(mem / 2**20)
    if not points:
        return []
    plt = _plt()
    models = sorted(points)
    fig, axes = plt.subplots(1, len(models), figsize=(5.5 * len(models), 4.2), squeeze=False)
    for ax, model in zip(axes[0], models):
        methods = sorted(points[model], key=lambda m: METHOD_ORDER.index(m) if m in METHOD_ORDER else 99)
        for i, method in enumerate(methods):
            s, m = mean_std(points[model][method]["s"]), mean_std(points[model][method]["m"])
            ax.errorbar(m[0], s[0], yerr=s[1] or 0, fmt="o", color=f"C{i}", capsize=3,
                        label=METHOD_LABEL.get(method, method))
        ax.set_xlabel("peak training memory (MB)")
        ax.set_ylabel("score, mean over tasks and seeds")
        ax.set_title(model, fontsize=10)
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    fig.suptitle("Memory vs score per method (upper left is better)", fontsize=11)
    return _save(fig, out_dir, "pareto_memory_score")


STOP_MARK = {CONVERGED_PREFIX: ("X", "early stop"), BUDGET_PREFIX: ("s", "budget done"), CAP_REASON: ("^", "step cap")}


def _stop_mark(reason: str) -> tuple[str, str]:
    for prefix, mark in STOP_MARK.items():
        if reason.startswith(prefix):
            return mark
    return "v", "other end"


def _draw_curves(ax, runs: list[dict], higher: bool) -> None:
    """One line per seed run: its selection curve over epochs; o marks the kept checkpoint, the end marker the stop."""
    from sparsegrad.suite.sweep.runrecords import setting  # (lr, batch size) of a run

    shown = set()
    settings = {setting(r) for r in runs}
    for i, r in enumerate(sorted(runs, key=lambda r: (str(setting(r)), r.get("seed", 0)))):
        metric = (r.get("main_metric") or {}).get("name")
        curve = [(float(e["epoch"]), e["metrics"].get(metric), int(e["step"])) for e in r.get("evaluations") or []
                 if e.get("role") == "selection" and e.get("checkpoint", "current") == "current"]
        curve = [(x, (100 * y if higher else y), step) for x, y, step in curve if y is not None]
        if not curve:
            continue
        color = f"C{i % 10}"
        ax.plot([c[0] for c in curve], [c[1] for c in curve], "-", lw=1, color=color, label=f"seed {r.get('seed')}" + (
            f", lr {setting(r)[0]:.0e}, batch {setting(r)[1]}" if len(settings) > 1 else ""))
        best_step = (r.get("best") or {}).get("step")
        best = [c for c in curve if c[2] == best_step]
        if best:
            ax.plot([best[0][0]], [best[0][1]], "o", ms=7, mfc="none", mec=color)
        marker, what = _stop_mark(str((r.get("training") or {}).get("stop_reason") or ""))
        ax.plot([curve[-1][0]], [curve[-1][1]], marker, ms=6, color=color,
                label=None if what in shown else f"stop: {what}")
        shown.add(what)
    if shown:
        ax.legend(fontsize=6)


def selection_curves(records: list[dict], out_dir: Path) -> list[Path]:
    """Per study: every seed run's selection curve, its kept checkpoint (o) and its stop (marker by reason)."""
    from sparsegrad.suite.report.sweep_figures import per_study

    records = [r for r in records if r.get("_stage") == "seeds" and any(
        e.get("role") == "selection" for e in r.get("evaluations") or [])]
    return per_study(records, out_dir, _draw_curves, "epoch",
                     "Selection curve of every seed run (o: the checkpoint it kept; end marker: where and why it stopped)",
                     "selection_curves", stage="seeds", ylabel="selection metric")


def write_all(records: list[dict], out_dir: Path, *, analysis: Path | None = None) -> list[Path]:
    """Every figure whose inputs exist, under ``out_dir/figures``; returns the files written."""
    fig_dir = Path(out_dir) / "figures"
    written = pareto(records, fig_dir)
    from sparsegrad.suite.report import sweep_figures  # per study: optimisation history, objective vs lr

    written += sweep_figures.write_all(records, fig_dir)
    written += selection_curves(records, fig_dir)
    if analysis is not None and Path(analysis).exists():
        data = json.loads(Path(analysis).read_text(encoding="utf-8"))
        written += figure2(data, fig_dir)
        written += figure3(data, fig_dir)
    return written
