"""How the reproduction's tables are written: :class:`Table` (a pandas DataFrame of formatted cells, a
title and notes) as GitHub Markdown, CSV and LaTeX, and the cell formatters (scores, deltas, mean ± std,
learning rates, parameter counts). The tables themselves are built in :mod:`sparsegrad.suite.report.tables`.
"""

from __future__ import annotations

import math

import pandas as pd
from tabulate import DataRow, TableFormat

__all__ = ["Table", "MARKDOWN", "LATEX_ESCAPES", "latex_escape", "fmt", "fmt_delta", "fmt_pm", "fmt_lr",
           "fmt_params"]  # fmt: skip


# ------------------------------------------------------------------------------------------- table
# Markdown as GitHub renders it, one space around each cell and no column padding, so a table's
# diff shows only the cells that changed: pandas' to_markdown with this tabulate format.
def _header_rule(widths, aligns) -> str:
    return "|" + "|".join("---" for _ in widths) + "|"


MARKDOWN = TableFormat(lineabove=None, linebelowheader=_header_rule, linebetweenrows=None, linebelow=None,
                       headerrow=DataRow("|", "|", "|"), datarow=DataRow("|", "|", "|"), padding=1,
                       with_header_hide=None)
LATEX_ESCAPES = (("\\", r"\textbackslash{}"), ("&", r"\&"), ("%", r"\%"), ("_", r"\_"), ("#", r"\#"),
                 ("±", r"$\pm$"), ("Δ", r"$\Delta$"), ("÷", r"/"), ("~", r"$\sim$"), ("Ỹ", "Y"))


def latex_escape(text: str) -> str:
    for a, b in LATEX_ESCAPES:
        text = text.replace(a, b)
    return text


class Table:
    """One table: a pandas DataFrame of formatted cells (strings, columns as shown), a title and notes.

    ``Table(key, title, columns, rows, notes)`` builds the frame from rows of cells; ``columns`` and
    ``rows`` read it back."""

    def __init__(self, key: str, title: str, columns: list[str], rows: list[list[str]],
                 notes: list[str] | None = None):
        self.key = key  # file stem, e.g. "table09"
        self.title = title
        self.frame = pd.DataFrame(rows, columns=columns, dtype=object)
        self.notes = list(notes or [])

    @property
    def columns(self) -> list[str]:
        return list(self.frame.columns)

    @property
    def rows(self) -> list[list[str]]:
        return self.frame.values.tolist()

    def markdown(self) -> str:
        out = [f"### {self.title}", ""]
        if self.rows:
            out.append(self.frame.to_markdown(index=False, tablefmt=MARKDOWN, stralign=None, numalign=None,
                                              disable_numparse=True))
        else:
            out.append("_No run records for this table in this profile._")
        if self.notes:
            out.append("")
            out += [f"- {n}" for n in self.notes]
        return "\n".join(out) + "\n"

    def csv(self) -> str:
        return self.frame.to_csv(index=False, lineterminator="\n")

    def latex(self) -> str:
        frame = self.frame.map(latex_escape)
        frame.columns = [latex_escape(c) for c in self.columns]
        body = frame.to_latex(index=False, escape=False, column_format="l" * len(frame.columns))
        return f"% {self.title}\n" + body + "".join(f"% {latex_escape(n)}\n" for n in self.notes)


# ------------------------------------------------------------------------------------------ format
def fmt(value: float | None, digits: int = 1) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "—"
    return f"{value:.{digits}f}"


def fmt_delta(ours: float | None, paper: float | None, digits: int = 1) -> str:
    if ours is None or paper is None:
        return "—"
    return f"{ours - paper:+.{digits}f}"


def fmt_pm(mean: float | None, std: float | None, digits: int = 1) -> str:
    if mean is None:
        return "—"
    return fmt(mean, digits) if std is None else f"{fmt(mean, digits)} ± {fmt(std, digits)}"


def fmt_lr(value: float | None) -> str:
    return "—" if value is None else f"{value:.2e}"


def fmt_params(n: float | None) -> str:
    if n is None:
        return "—"
    if n >= 1e9:
        return f"{n / 1e9:.2f} B"
    if n >= 1e6:
        return f"{n / 1e6:.1f} M"
    if n >= 1e3:
        return f"{n / 1e3:.1f} k"
    return str(int(n))
