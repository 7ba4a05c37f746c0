"""The real default (MiniLM x SparseGrad x movie_sentiment) for a few steps, through the CLI. Needs assets."""

import json
import os
import subprocess
import sys

import pytest
from suite_fixtures import REPO

from sparsegrad.suite.run import record as record_lib


def _assets_or_skip():
    from sparsegrad.suite.run.assets import cache_root, is_ready

    missing = [name for name in ("minilm", "movie_reviews") if not is_ready(name)]
    if missing:
        pytest.skip(f"offline assets {missing} are not in the cache at {cache_root()}; run `make assets`")


@pytest.mark.slow
def test_default_run_few_steps(tmp_path):
    _assets_or_skip()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "WANDB_MODE": "offline"}
    out = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, "-m", "experiments.finetune", f"hydra.run.dir={out}", "trainer.max_steps=6",
         "trainer.eval_every=3", "task.max_train_samples=200", "task.max_selection_samples=64",
         "task.max_report_samples=128", "trainer.progress=false", "method.basis_steps=2"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    record = record_lib.load(out)
    assert (record["model"], record["method"], record["task"]) == ("minilm", "sparsegrad", "movie_sentiment")
    assert record["status"] == "completed" and record["training"]["optimizer_steps"] == 6
    assert record["parameters"]["sparse_matrices"] == 12 and record["parameters"]["sparse_budget_per_matrix"] == 13440
    assert record["basis"]["seconds"] > 0 and record["main_metric"]["report_split"] == "test"
    assert 0.0 <= record["best"]["score"] <= 1.0
    assert record["logger"]["mode"] == "offline" and list((out / "wandb").glob("offline-run-*"))
    assert (out / "config.yaml").exists() and (out / ".hydra" / "config.yaml").exists()
    assert json.loads((out / "record.json").read_text())["config"]["model"]["name"] == "minilm"
