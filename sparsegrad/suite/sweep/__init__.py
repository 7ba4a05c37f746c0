"""The sweep: profiles, studies, the driver and its progress, the run-records folder.

* :mod:`~sparsegrad.suite.sweep.profiles` — a profile's studies, seeds and settings
* :mod:`~sparsegrad.suite.sweep.studies` — study names and storages (Optuna), budgets, grids (GridSampler)
* :mod:`~sparsegrad.suite.sweep.driver` — ``make reproduce-glue``: search, seeds, analysis, tables
* :mod:`~sparsegrad.suite.sweep.progress` — the plan and one progress bar over the runs
* :mod:`~sparsegrad.suite.sweep.runrecords` — the records folder: run folders, reading, claims
* :mod:`~sparsegrad.suite.sweep.search` / :mod:`~sparsegrad.suite.sweep.sweep_history` — what each study tried
"""


def __getattr__(name: str):
    # ``sparsegrad.suite.sweep`` was the driver module before the suite was grouped by job: its names
    # (``main``, ``run_profile``, ...) still resolve here, loading the driver on first use.
    if name.startswith("__"):
        raise AttributeError(name)
    import importlib
    import importlib.util

    if importlib.util.find_spec(f"{__name__}.{name}") is not None:  # a module of this package
        return importlib.import_module(f"{__name__}.{name}")
    driver = importlib.import_module(f"{__name__}.driver")
    try:
        return getattr(driver, name)
    except AttributeError:
        raise AttributeError(f"module 'sparsegrad.suite.sweep' has no attribute {name!r}") from None
