"""Fixtures for the fine-tuning suite: GLUE- and oasst1-format files, config composition, tiny runs.

Every fixture file is written by the tests themselves with GLUE's exact column names and label
types, so nothing here needs the Hub or the asset cache (except tests marked slow).
"""

from __future__ import annotations

import os

import pytest
from suite_fixtures import CONF_DIR, GLUE_SCHEMAS, glue_rows, oasst1_rows, write_csv, write_jsonl

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

TINY_TRAINER = [
    "trainer=smoke",
    "trainer.max_steps=4",
    "trainer.eval_every=2",
    "trainer.batch_size=8",
    "trainer.threads=1",
    "logger=none",
]


@pytest.fixture(scope="session")
def glue_files(tmp_path_factory):
    """task -> {split: csv path} for every GLUE task (train 48 rows, each validation split 24 rows)."""
    root = tmp_path_factory.mktemp("glue")
    files = {}
    for i, (task, (_, _, dev_splits)) in enumerate(GLUE_SCHEMAS.items()):
        folder = root / task
        folder.mkdir()
        files[task] = {"train": str(write_csv(folder / "train.csv", glue_rows(task, 48, seed=100 + i)))}
        for j, split in enumerate(dev_splits):
            files[task][split] = str(write_csv(folder / f"{split}.csv", glue_rows(task, 24, seed=200 + 10 * i + j)))
    return files


@pytest.fixture(scope="session")
def oasst1_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("oasst1")
    return {
        "train": str(write_jsonl(root / "train.jsonl", oasst1_rows(30, 1, "tr"))),
        "validation": str(write_jsonl(root / "validation.jsonl", oasst1_rows(4, 2, "va"))),
    }


@pytest.fixture(scope="session")
def compose():
    """compose(overrides) -> the composed DictConfig (Hydra's compose API on the real conf/)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    context = initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3")
    context.__enter__()

    def _compose(overrides):
        return hydra_compose(config_name="config", overrides=list(overrides))

    yield _compose
    context.__exit__(None, None, None)
    GlobalHydra.instance().clear()


@pytest.fixture
def run_tiny(compose, tmp_path):
    """run_tiny(overrides) -> the run record of a tiny in-process run (smoke trainer, no logger)."""
    from experiments.finetune import run_from_config

    counter = {"n": 0}

    def _run(overrides, out=None):
        counter["n"] += 1
        cfg = compose([*TINY_TRAINER, *overrides])
        return run_from_config(cfg, out or tmp_path / f"run{counter['n']}")

    return _run
