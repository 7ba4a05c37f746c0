"""GPU time of a GLUE run before any run is measured: the task's size, the epochs and the paper's steps/s.

A profile with neither run records nor a ``plan`` section of its own (``paper``, ``paper_best``) is
planned from what the paper reports. One run of a task with N training examples and a main dev split of
D examples, at batch size b for e epochs (at most ``max_steps``), evaluated every ``eval_every`` steps:

    S = min(max_steps, e · ⌈N / b⌉)          training steps
    E = ⌊S / eval_every⌋                       evaluations of the dev split
    seconds = S / v + E · D / (3 · b · v)

with v the paper's steps/s of the method on that task (Table 7, RoBERTa-base on one GPU; Table 3's
GLUE average where a task is missing). An evaluated example is counted at a third of a trained one (a
forward pass, no backward pass, no optimizer step). BERT-base has RoBERTa-base's shape and is given its
speed; RoBERTa-large's is divided by its compute per token, layers × hidden² = (24 · 1024²) / (12 · 768²)
= 3.56. MeProp was not timed in the paper: it is given full fine-tuning's speed (it computes the same
dense gradient before taking its top-k). These are the most steps a run can take: early stopping
(``patience`` evaluations without improvement) may end it well before the last epoch.

Sanity check: BERT-base, full fine-tuning, MNLI, 20 epochs at batch 32: ⌈392,702 / 32⌉ = 12,272 steps per
epoch, 245,440 steps at 4.2 steps/s = 16.2 h, plus 49 evaluations of 9,815 examples (0.3 h): 16.6 GPU-hours.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cache
from typing import Any

from sparsegrad.suite.sweep.profiles import CONF_DIR

PAPER_MODEL = "roberta_base"  # Tables 3 and 7 time RoBERTa-base only
SLOWDOWN = {"bert_base": 1.0, "roberta_base": 1.0, "roberta_large": (24 * 1024**2) / (12 * 768**2)}
PAPER_SETTING = {"sparsegrad": "sparse_by_dense"}  # the paper's SparseGrad row is the sparse-by-dense one
UNTIMED = {"meprop": "full", "meprop_adamw": "full"}  # methods the paper did not time: the one they are given
EVAL_COST = 1 / 3  # an evaluated example, in trained examples (forward only)


@dataclass(frozen=True)
class RunEstimate:
    steps: int
    evaluations: int
    steps_per_second: float
    seconds: float
    source: str  # where the speed comes from, in words


def trainer_config(overrides: list[str] | tuple[str, ...] = (), task: str | None = None) -> dict[str, Any]:
    """The ``trainer`` settings a profile's overrides compose (``trainer=<file>``, then ``trainer.<key>=<value>``),
    read from ``conf/trainer`` without Hydra; ``eval_every`` taken from the task's ``paper_eval_every`` where the
    trainer refers to it."""
    import yaml

    name, changes = "default", {}
    for override in overrides:
        key, _, value = str(override).lstrip("+~").partition("=")
        if key == "trainer":
            name = value
        elif key.startswith("trainer."):
            changes[key.removeprefix("trainer.")] = yaml.safe_load(value) if value else None
    config = {**_trainer_file(name), **changes}
    if isinstance(config.get("eval_every"), str) and "paper_eval_every" in config["eval_every"]:
        config["eval_every"] = _task_file(task).get("paper_eval_every") if task else None
    return config


@cache
def _trainer_file(name: str) -> dict[str, Any]:
    import yaml

    data = yaml.safe_load((CONF_DIR / "trainer" / f"{name}.yaml").read_text(encoding="utf-8")) or {}
    base = {}
    for parent in data.pop("defaults", []) or []:
        if isinstance(parent, str) and parent != "_self_":
            base.update(_trainer_file(parent))
    return {**base, **data}


@cache
def _task_file(name: str) -> dict[str, Any]:
    import yaml

    path = CONF_DIR / "task" / f"{name}.yaml"
    return (yaml.safe_load(path.read_text(encoding="utf-8")) or {}) if path.exists() else {}


@cache
def paper_steps_per_second(model: str, method: str, task: str) -> tuple[float, str] | None:
    """(steps/s, source) for a (model, method, task) the paper's timings cover, else None."""
    from sparsegrad.suite.report.table_inputs import Paper

    if model not in SLOWDOWN:
        return None
    paper, timed = Paper.load(), UNTIMED.get(method, method)
    setting = PAPER_SETTING.get(timed, "")
    for table, where in (("7", task), ("3", "avg")):
        value, _ = paper.get(table, PAPER_MODEL, timed, where, "steps_per_s", setting)
        if value:
            break
    else:
        return None
    source = f"Table {table}{'' if where == 'avg' else ' ' + task}, {timed if timed != method else method}"
    if SLOWDOWN[model] != 1.0:
        source += f" / {SLOWDOWN[model]:.2f} for {model}"
    return value / SLOWDOWN[model], source


def estimate(model: str, method: str, task: str, trainer: dict[str, Any], batch_size: int | None = None
             ) -> RunEstimate | None:
    """GPU time of one run (module docstring), or None when the task's size or the paper's speed is unknown."""
    from sparsegrad.suite.run.tasks import TASKS

    spec = TASKS.get(task)
    speed = paper_steps_per_second(model, method, task)
    if spec is None or spec.train_examples is None or speed is None:
        return None
    v, source = speed
    b = int(batch_size or trainer.get("batch_size") or 32)
    steps = int(trainer.get("epochs") or 1) * math.ceil(spec.train_examples / b)
    if trainer.get("max_steps"):
        steps = min(steps, int(trainer["max_steps"]))
    every = trainer.get("eval_every") or math.ceil(spec.train_examples / b)  # null: once per epoch
    evaluations = steps // int(every)
    seconds = steps / v + evaluations * (spec.dev_examples or 0) * EVAL_COST / (b * v)
    return RunEstimate(steps, evaluations, v, seconds, f"paper's {v:.2f} steps/s ({source})")
