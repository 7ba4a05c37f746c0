"""A stated learning-rate grid instead of an Optuna study: every value run once, the best kept.

A profile whose ``sweep`` section has ``grid`` runs, per (model, method, task), one sweep-stage run at
each learning rate of the grid (batch size ``sweep.batch_size``, default 16) as one Hydra multirun,
then takes the run with the best selection-split objective. ``grid`` is a list of learning rates, or
a mapping from ``model/method``, a model, a method or ``default`` (looked up in that order) to such a list. Runs already in the records
(same study, same lr and batch size) are not run again, so adding a value to the grid later runs only
that value. The best-settings table flags a best at either end of the grid: the grid did not bracket
the optimum there, and should be extended on that side.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping


def grid_values(sweep: Mapping, model: str, method: str) -> list[float]:
    grid = sweep.get("grid")
    if isinstance(grid, Mapping):
        for key in (f"{model}/{method}", model, method, "default"):
            if key in grid:
                grid = grid[key]
                break
        else:
            grid = None
    return sorted(float(v) for v in (grid or []))


def _same(a: float, b: float) -> bool:
    return math.isclose(a, b, rel_tol=1e-9)


def grid_records(records: list[dict], model: str, method: str, task: str, lrs: list[float], batch_size: int) -> list[dict]:
    """The sweep-stage records of this study run at one of ``lrs`` with ``batch_size``, finished."""
    out = []
    for r in records:
        if r.get("_stage") != "sweep" or (r["model"], r["method"], r["task"]) != (model, method, task):
            continue
        trainer = (r.get("config") or {}).get("trainer") or {}
        lr, bs = trainer.get("lr"), trainer.get("batch_size")
        if r.get("status") in ("completed", "diverged") and lr is not None and int(bs or 0) == batch_size \
                and any(_same(float(lr), v) for v in lrs):
            out.append(r)
    return out


def best(records: list[dict]) -> dict | None:
    done = [r for r in records if r.get("status") == "completed" and r.get("objective") is not None]
    if not done:
        return None
    from sparsegrad.suite.sweep.studies import pick_best  # the one tie-break rule the tables use too

    higher = (done[0].get("main_metric") or {}).get("higher_is_better", True)
    return pick_best(((float(r["objective"]), f"{r.get('started_at') or ''}|{r.get('run_id', '')}", r) for r in done), higher)


def run_grid(driver, model: str, method: str, task: str) -> dict | None:
    """Run the grid's missing values for one study through ``driver`` (a sweep.Driver); the best setting."""
    from sparsegrad.suite.sweep.profiles import POLL_SECONDS, study_name
    from sparsegrad.suite.sweep.runrecords import load_records, run_folder_stamp

    sweep = driver.profile.sweep or {}
    lrs = grid_values(sweep, model, method)
    bs = int(sweep.get("batch_size", 16))
    name = study_name(model, method, task)
    while True:  # the missing values run under a claim, as seed runs do: two drivers never run one twice
        with driver.held(f"grid-{name}") as ours:
            if ours:
                records = load_records(driver.layout.records).records if driver.opt.dry_run else driver.harvest()
                have = grid_records(records, model, method, task, lrs, bs)
                todo = [v for v in lrs if not any(_same(float(r["config"]["trainer"]["lr"]), v) for r in have)]
                if todo:
                    over = [*driver.base_overrides(model, method, task, "sweep"),
                            f"trainer.lr={','.join(repr(v) for v in todo)}", f"trainer.batch_size={bs}",
                            f"hydra.sweep.dir={driver.layout.work / 'sweep' / name / run_folder_stamp()}",
                            *driver.launcher_overrides(sweep=False)]  # fmt: skip
                    driver.say(f"grid {name}: lr {', '.join(f'{v:.2g}' for v in todo)} to run (of {len(lrs)}; batch {bs})")
                    driver.run(over, f"grid {name}", f"sweep-{name}")
                else:
                    driver.say(f"grid {name}: all {len(lrs)} learning rates done")
                break
        time.sleep(POLL_SECONDS)  # another driver runs them: its records come in through the harvest
    if driver.opt.dry_run:
        return {"lr": float("nan"), "batch_size": bs}
    chosen = best(grid_records(load_records(driver.layout.records).records, model, method, task, lrs, bs))
    if chosen is None:
        driver.failures.append(f"grid {name}: no completed run")
        return None
    return {"lr": float(chosen["config"]["trainer"]["lr"]), "batch_size": bs}
