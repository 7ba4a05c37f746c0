"""Figures render non-empty PNG and PDF files from fixture records and a small analysis record."""

from __future__ import annotations

from sparsegrad.suite.report import figures
from tests.reproduce.fixture_records import glue_like_records


def analysis_record() -> dict:
    edges = [x / 2 for x in range(-24, 1)]
    layers = ["bert.encoder.layer.0.intermediate.dense", "bert.encoder.layer.1.output.dense"]
    return {
        "model": "minilm", "task": "movie_sentiment", "top_fraction": 0.01,
        "energy_top_share": {"original": 0.45, "hosvd": 0.61, "official": 0.36, "random": 0.13},
        "shown_layer": layers[0],
        "heatmaps": {"original": [[0.1, 0.5], [1.0, 0.2]], "hosvd": [[1.0, 0.1], [0.1, 0.0]]},
        "histogram_edges_log10_rel": edges,
        "histograms": {s: [i for i in range(len(edges) - 1)] for s in ("original", "hosvd", "official")},
        "training": {
            "layers": layers, "shown_layer": layers[1],
            "per_step": [{"step": i, "layers": {layers[0]: {"nonzero_rows": 0.6}, layers[1]: {"nonzero_rows": 0.02}}}
                         for i in range(3)],
            "row_patterns_first_step": {layers[0]: [[1.0, 0.5, 0.0], [0.7, 0.0, 0.0]],
                                        layers[1]: [[1.0, 0.0, 0.0], [1.0, 0.0, 0.0]]},
        },
    }


def test_figures_render_png_and_pdf(tmp_path):
    import json

    path = tmp_path / "sparsity.json"
    path.write_text(json.dumps(analysis_record()), encoding="utf-8")
    written = figures.write_all(glue_like_records(), tmp_path, analysis=path)
    names = {p.name for p in written}
    for stem in ("figure2_gradient_sparsity", "figure3_output_gradient_rows", "pareto_memory_score", "sweep_history",
                 "sweep_objective_vs_lr"):
        assert {f"{stem}.png", f"{stem}.pdf"} <= names
    for p in written:
        assert p.stat().st_size > 1000, p
        head = p.read_bytes()[:4]
        assert head == (b"\x89PNG" if p.suffix == ".png" else b"%PDF")


def test_without_an_analysis_record_only_the_record_figures_are_drawn(tmp_path):
    written = figures.write_all(glue_like_records(), tmp_path, analysis=tmp_path / "missing.json")
    assert sorted(p.name for p in written) == ["pareto_memory_score.pdf", "pareto_memory_score.png",
                                               "sweep_history.pdf", "sweep_history.png",
                                               "sweep_objective_vs_lr.pdf", "sweep_objective_vs_lr.png"]
    assert figures.write_all([], tmp_path / "empty") == []


def test_pareto_legend_follows_the_method_order_with_the_leading_block_variant(tmp_path, monkeypatch):
    from tests.reproduce.fixture_records import record

    lb = [record("seeds", "leading_block", "movie_sentiment", s, 0.77, lr=3e-4, bs=8, mem_mb=1250) for s in (1, 2)]
    seen = []
    monkeypatch.setattr(figures, "_save", lambda fig, out_dir, stem: seen.append(fig) or [])
    figures.pareto(glue_like_records() + lb, tmp_path)
    labels = [t.get_text() for t in seen[0].axes[0].get_legend().get_texts()]
    figures._plt().close(seen[0])
    assert labels == ["Regular FT", "SparseGrad", "SparseGrad, leading block (variant)"]


def test_selection_curves_mark_each_seed_runs_best_checkpoint_and_stop(tmp_path, monkeypatch):
    """One panel per study from the seed runs' records: a line per seed over epochs, the best checkpoint
    ringed, the stop marked by its reason."""
    from tests.reproduce.fixture_records import record

    def run(seed, curve, reason, best):
        r = record("seeds", "full", "movie_sentiment", seed, 0.8)
        r["evaluations"] = [{"step": 25 * (i + 1), "epoch": 0.2 * (i + 1), "split": "validation", "role": "selection",
                             "checkpoint": "current", "metrics": {"accuracy": v, "loss": 1 - v}}
                            for i, v in enumerate(curve)]
        r["evaluations"].append({"step": 25 * len(curve), "epoch": 0.2 * len(curve), "split": "test", "role": "report",
                                 "checkpoint": "best", "metrics": {"accuracy": 0.8}})
        r["best"]["step"] = 25 * (best + 1)
        r["training"]["stop_reason"] = reason
        return r

    runs = [run(1, [0.6, 0.7, 0.8, 0.79], "budget done: the linear schedule ended at step 100 (learning rate 0)", 2),
            run(2, [0.5, 0.75, 0.74], "early stopping: no improvement in 2 evaluations", 1)]
    seen = []
    monkeypatch.setattr("sparsegrad.suite.report.sweep_figures.save_figure",
                        lambda fig, out_dir, stem: seen.append((stem, fig)) or [])
    figures.selection_curves(runs + glue_like_records(), tmp_path)  # fixture records without curves: no panel
    (stem, fig), = seen
    ax = fig.axes[0]
    assert stem == "selection_curves" and len([a for a in fig.axes if a.get_visible()]) == 1
    lines = {ln.get_label(): ln for ln in ax.get_lines()}
    assert list(lines["seed 1"].get_ydata()) == [60.0, 70.0, 80.0, 79.0]
    assert {"stop: budget done", "stop: early stop"} <= set(lines)
    rings = [ln for ln in ax.get_lines() if ln.get_marker() == "o"]
    assert sorted((round(float(r.get_xdata()[0]), 6), float(r.get_ydata()[0])) for r in rings) == [(0.4, 75.0), (0.6, 80.0)]
    figures._plt().close(fig)
    assert figures.selection_curves(glue_like_records(), tmp_path) == []
