"""The report: tables, findings and their statistics, figures — pure functions of run records.

* :mod:`~sparsegrad.suite.report.table_inputs` — records to the cells of a table
* :mod:`~sparsegrad.suite.report.tables` / :mod:`~sparsegrad.suite.report.table_format` — the paper's tables beside ours
* :mod:`~sparsegrad.suite.report.findings` / :mod:`~sparsegrad.suite.report.stats` — each claim's difference, interval, verdict
* :mod:`~sparsegrad.suite.report.figures` / :mod:`~sparsegrad.suite.report.sweep_figures` / :mod:`~sparsegrad.suite.report.plotting` — figures
"""
