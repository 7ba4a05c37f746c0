"""Matplotlib for the reproduction's figures: the pyplot module on the Agg backend (imported on first use)
and the writer of one figure as PNG and PDF (the PDF without a creation date, so re-drawing it changes
no byte). Used by :mod:`sparsegrad.suite.report.figures` and :mod:`sparsegrad.suite.report.sweep_figures`.
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["pyplot", "save_figure"]


def pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, out_dir: Path, stem: str) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for ext in ("png", "pdf"):
        path = out_dir / f"{stem}.{ext}"
        fig.savefig(path, dpi=130, bbox_inches="tight", metadata={"CreationDate": None} if ext == "pdf" else None)
        paths.append(path)
    pyplot().close(fig)
    return paths
