"""A real Hydra + Optuna sweep with SQLite storage (the optuna 2.10 / SQLAlchemy pins matter here)."""

import subprocess
import sys
from pathlib import Path

import pytest

APP = Path(__file__).parent / "fixtures" / "toy_sweep" / "app.py"


@pytest.mark.slow
def test_three_trial_optuna_sweep_with_sqlite_storage(tmp_path):
    import optuna

    db = tmp_path / "optuna.db"
    cmd = [
        sys.executable, str(APP), "--multirun",
        f"hydra.sweeper.storage=sqlite:///{db}", "hydra.sweeper.study_name=toy3",
        f"hydra.sweep.dir={tmp_path / 'multirun'}",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    study = optuna.load_study(study_name="toy3", storage=f"sqlite:///{db}")
    complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert len(complete) == 3
    for trial in complete:
        assert 1e-6 <= trial.params["lr"] <= 1e-1 and trial.params["batch_size"] in (8, 16, 32)
    assert study.best_value == max(t.value for t in complete)
    assert (tmp_path / "multirun" / "optimization_results.yaml").exists()
