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
