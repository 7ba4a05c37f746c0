"""Sweeps and the driver on SLURM, against stand-in sbatch / squeue / sacct / scancel / srun commands
(tests/fixtures/fake_slurm.py) that record what submitit asks them: job arrays submitted and their results
told to Optuna; Ctrl-C on a sweep and SIGTERM on the driver cancel the jobs submitted, and say so."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests" / "fixtures"))
import fake_slurm  # noqa: E402

APP = ROOT / "tests" / "fixtures" / "toy_sweep" / "app.py"
CANCEL_LINE = "cancelled 2 SLURM job(s) of this sweep (scancel 4242_0 4242_1)"


def slurm_env(tmp_path: Path, run_jobs: bool) -> dict:
    fake_slurm.install(tmp_path / "bin", tmp_path / "slurm", run_jobs=run_jobs)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SPARSEGRAD_"))}
    return {**env, "PATH": f"{tmp_path / 'bin'}{os.pathsep}{env['PATH']}", "PYTHONPATH": str(ROOT),
            "SPARSEGRAD_RESULTS": str(tmp_path / "results"), "SPARSEGRAD_REPRODUCE_OUTPUTS": str(tmp_path / "outputs")}


def toy_sweep(tmp_path: Path, *extra: str) -> list[str]:
    """The toy sweep app through conf/hydra/launcher/slurm.yaml, 2 trials at a time."""
    return [sys.executable, str(APP), "--multirun", f"hydra.sweeper.storage=sqlite:///{tmp_path / 'optuna.db'}",
            "hydra.sweeper.study_name=toy", f"hydra.searchpath=[file://{ROOT / 'conf'}]", "hydra/launcher=slurm",
            "hydra.sweeper.n_jobs=2", f"hydra.sweep.dir={tmp_path / 'multirun'}", *extra]


def wait_for_submission(tmp_path: Path, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while not any(c[0] == "sbatch" for c in fake_slurm.calls(tmp_path / "slurm")):
        assert proc.poll() is None, f"ended before submitting anything: {proc.communicate()[0][-3000:]}"
        assert time.time() < deadline, "nothing submitted"
        time.sleep(0.3)
    time.sleep(1.0)  # the launcher is waiting on the array now


def trials(tmp_path: Path, storage: Path, name: str):
    import optuna

    return optuna.load_study(study_name=name, storage=f"sqlite:///{storage}").trials


@pytest.mark.slow
def test_a_sweep_on_slurm_submits_job_arrays_and_tells_optuna_their_results(tmp_path):
    import optuna

    proc = subprocess.run(toy_sweep(tmp_path, "hydra.sweeper.n_trials=3"), cwd=tmp_path, capture_output=True,
                          text=True, timeout=300, env=slurm_env(tmp_path, run_jobs=True))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    calls = fake_slurm.calls(tmp_path / "slurm")
    submitted = [Path(c[1]).read_text() for c in calls if c[0] == "sbatch"]
    assert len(submitted) == 2  # an array of 2 trials, then the last trial alone
    assert "#SBATCH --array=0-1%2" in submitted[0] and "#SBATCH --gpus-per-node=1" in submitted[0]
    assert "--array" not in submitted[1]
    assert sum(c[0] == "srun" for c in calls) == 3 and not any(c[0] == "scancel" for c in calls)
    done = trials(tmp_path, tmp_path / "optuna.db", "toy")
    assert [t.state for t in done] == [optuna.trial.TrialState.COMPLETE] * 3


@pytest.mark.slow
def test_ctrl_c_on_a_slurm_sweep_cancels_its_jobs_and_gives_their_trials_back(tmp_path):
    import optuna

    proc = subprocess.Popen(toy_sweep(tmp_path, "hydra.sweeper.n_trials=3"), cwd=tmp_path, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=slurm_env(tmp_path, run_jobs=False))
    wait_for_submission(tmp_path, proc)
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 130, out[-3000:]
    assert [c for c in fake_slurm.calls(tmp_path / "slurm") if c[0] == "scancel"] == [["scancel", "4242_0"],
                                                                                       ["scancel", "4242_1"]]
    assert CANCEL_LINE in out
    state = optuna.trial.TrialState
    study = trials(tmp_path, tmp_path / "optuna.db", "toy")
    assert sum(t.state == state.FAIL and "interrupted" in t.user_attrs for t in study) == 2
    assert sum(t.state == state.WAITING for t in study) == 3  # the whole budget is left for the next run


@pytest.mark.slow
def test_sigterm_on_the_driver_cancels_the_jobs_it_submitted_and_says_so(tmp_path):
    import optuna

    cmd = [sys.executable, "-m", "scripts.reproduce_glue", "--profile", "smoke", "--launcher", "slurm", "--jobs", "2"]
    proc = subprocess.Popen(cmd, cwd=ROOT, text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            env=slurm_env(tmp_path, run_jobs=False))
    wait_for_submission(tmp_path, proc)
    proc.send_signal(signal.SIGTERM)  # to the driver alone, as kill, timeout or SLURM's end of a job send it
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 130, out[-3000:]
    assert "submitted to SLURM 2 at a time by this driver; 0 trial(s) of these studies running now" in out
    assert "expected" not in out.split("\n[reproduce")[1]  # no wall time from this machine's cores
    assert [c for c in fake_slurm.calls(tmp_path / "slurm") if c[0] == "scancel"] == [["scancel", "4242_0"],
                                                                                       ["scancel", "4242_1"]]
    assert f"[reproduce smoke] interrupted: {CANCEL_LINE}" in out
    assert "run `make reproduce-glue PROFILE=smoke LAUNCHER=slurm JOBS=2` to resume" in out
    study = trials(tmp_path, tmp_path / "results" / "smoke" / "optuna.db", "tiny_bert-full-movie_sentiment")
    assert sum(t.state == optuna.trial.TrialState.FAIL and "interrupted" in t.user_attrs for t in study) == 2


def test_make_passes_the_launcher_and_the_jobs_to_the_driver():
    assert shutil.which("make"), "make is needed to build this project"
    out = subprocess.run(["make", "-n", "reproduce-glue", "PROFILE=paper", "LAUNCHER=slurm", "JOBS=8"], cwd=ROOT,
                         capture_output=True, text=True, timeout=60).stdout
    assert "-m scripts.reproduce_glue --profile paper" in out and "--launcher slurm --jobs 8" in out


@pytest.mark.parametrize(("launcher", "says"), [
    ("slurm", "submits the runs with SLURM's sbatch, which is not on PATH here"),
    ("nope", "unknown launcher 'nope'; valid launchers: parallel, slurm, slurm_local"),
])
def test_a_launcher_that_cannot_run_here_gets_one_line(launcher, says, tmp_path, monkeypatch, capsys):
    from sparsegrad.suite.sweep.driver import EXIT_USAGE, run_profile

    monkeypatch.setenv("PATH", str(tmp_path))  # no sbatch
    assert run_profile("smoke", launcher=launcher, jobs=2) == EXIT_USAGE
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1 and says in out[0]
