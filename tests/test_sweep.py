"""Real Hydra + Optuna sweeps of a toy app: SQLite, a private PostgreSQL server, a journal file.

Many workers, one study: workers started at the same instant on an empty storage share the budget
(n_trials in total), never run a setting twice, and a worker killed with SIGKILL has its trial failed
(heartbeat) and retried once by the others.
"""

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
APP = Path(__file__).parent / "fixtures" / "toy_sweep" / "app.py"
OLD_DB = Path(__file__).parent / "fixtures" / "old_study" / "optuna-2.10.db"
FAST_HEARTBEAT = ["hydra.sweeper.heartbeat_interval=0.5", "hydra.sweeper.grace_period=4",
                  "hydra.sweeper.poll_interval=0.5"]


def toy_command(tmp_path, storage, study, *extra):
    return [sys.executable, str(APP), "--multirun", f"hydra.sweeper.storage={storage}",
            f"hydra.sweeper.study_name={study}", *extra]


def start_worker(tmp_path, name, storage, study, *extra):
    """A toy sweep worker in its own process group; its output lines are collected as they come."""
    cmd = toy_command(tmp_path, storage, study, f"hydra.sweep.dir={tmp_path / name}", *extra)
    proc = subprocess.Popen(cmd, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    proc.lines = []

    def read():
        for line in proc.stdout:
            proc.lines.append(line)

    threading.Thread(target=read, daemon=True).start()
    return proc


def finish(proc, timeout=240):
    proc.wait(timeout=timeout)
    time.sleep(0.2)  # the reader thread drains the pipe
    return "".join(proc.lines)


def check_shared_study(storage, study_name, n_trials, killed=0):
    """Exactly n_trials budget slots, each ended by one COMPLETE trial, no setting twice; one retry
    (with the dead trial's setting) per killed worker."""
    import optuna

    from sparsegrad.suite.sweep import studies

    study = optuna.load_study(study_name=study_name, storage=studies.open_storage(storage))
    state = optuna.trial.TrialState
    trials = study.get_trials(deepcopy=False)
    assert len(trials) == n_trials + killed, [(t.number, t.state, t.params) for t in trials]
    complete = [t for t in trials if t.state == state.COMPLETE]
    assert len(complete) == n_trials
    assert sorted(t.system_attrs[studies.TICKET_ATTR] for t in complete) == list(range(n_trials))
    settings = [(t.params["lr"], t.params["batch_size"]) for t in complete]
    assert len(set(settings)) == n_trials, "a setting ran twice"
    failed = [t for t in trials if t.state == state.FAIL]
    assert len(failed) == killed
    for dead in failed:
        assert dead.user_attrs.get("stale_heartbeat")
        retried = [t for t in complete if t.system_attrs.get("failed_trial") == dead.number]
        assert len(retried) == 1 and retried[0].params == dead.params
    return study


@pytest.mark.slow
def test_three_trial_optuna_sweep_with_sqlite_storage(tmp_path):
    import optuna

    db = tmp_path / "optuna.db"
    cmd = toy_command(tmp_path, f"sqlite:///{db}", "toy3", f"hydra.sweep.dir={tmp_path / 'multirun'}")
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    study = optuna.load_study(study_name="toy3", storage=f"sqlite:///{db}")
    complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert len(complete) == 3
    for trial in complete:
        assert 1e-6 <= trial.params["lr"] <= 1e-1 and trial.params["batch_size"] in (8, 16, 32)
    assert study.best_value == max(t.value for t in complete)
    assert (tmp_path / "multirun" / "optimization_results.yaml").exists()
    again = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, timeout=300)  # budget spent
    assert again.returncode == 0 and len(optuna.load_study(study_name="toy3", storage=f"sqlite:///{db}").trials) == 3


def test_an_old_study_database_gets_one_line_with_the_upgrade_command(tmp_path):
    from sparsegrad.suite.sweep import studies

    db = tmp_path / "optuna.db"
    shutil.copyfile(OLD_DB, db)
    with pytest.raises(studies.StudyError) as err:
        studies.open_storage(f"sqlite:///{db}")
    message = str(err.value)
    assert "\n" not in message and f"optuna storage upgrade --storage 'sqlite:///{db}'" in message
    # a sweep on it (the sweeper under Hydra, as `python -m experiments.finetune --multirun` runs it): that line
    sweep = subprocess.run(toy_command(tmp_path, f"sqlite:///{db}", "old", f"hydra.sweep.dir={tmp_path / 'mr'}"),
                           capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert sweep.returncode == 2 and sweep.stderr.strip() == f"error: {message}", sweep.stderr[-3000:]


# --------------------------------------------------------------------------------- PostgreSQL
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _pg_bin() -> Path:
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"))
    if not found:
        pytest.fail("PostgreSQL is not installed: apt-get install -y postgresql (.ci/run does this)")
    return found[-1].parent


@pytest.fixture
def postgres():
    """A private PostgreSQL server: its own data directory, 127.0.0.1 only, a free port; stopped at the end.
    As root, the server runs as the 'postgres' user of Debian's package (PostgreSQL refuses root)."""
    bindir = _pg_bin()
    data = Path(tempfile.mkdtemp(prefix="sparsegrad-pg-"))
    as_user: list[str] = []
    if os.geteuid() == 0:
        shutil.chown(data, "postgres")
        as_user = ["runuser", "-u", "postgres", "--"]
    port = _free_port()
    run = lambda *cmd: subprocess.run([*as_user, *map(str, cmd)], capture_output=True, text=True, timeout=120)  # noqa: E731
    init = run(bindir / "initdb", "-D", data / "db", "-U", "postgres", "--auth=trust", "-E", "UTF8")
    assert init.returncode == 0, init.stdout + init.stderr
    start = run(bindir / "pg_ctl", "-D", data / "db", "-l", data / "server.log", "-w", "-t", "60", "-o",
                f"-c listen_addresses=127.0.0.1 -p {port} -k {data} -c fsync=off", "start")
    assert start.returncode == 0, start.stdout + start.stderr + (data / "server.log").read_text()
    try:
        yield f"postgresql://postgres@127.0.0.1:{port}/postgres"
    finally:
        run(bindir / "pg_ctl", "-D", data / "db", "-m", "immediate", "stop")
        shutil.rmtree(data, ignore_errors=True)


@pytest.mark.slow
def test_two_workers_on_postgresql_share_one_study_and_a_killed_workers_trial_is_retried(tmp_path, postgres):
    n_trials = 8
    args = [f"hydra.sweeper.n_trials={n_trials}", "sleep=1.5", *FAST_HEARTBEAT]
    a = start_worker(tmp_path, "a", postgres, "pg", *args)  # both at once, on an empty database
    b = start_worker(tmp_path, "b", postgres, "pg", *args)
    deadline = time.time() + 120
    while time.time() < deadline and sum("trial " in ln and ": lr=" in ln for ln in a.lines) < 2:
        time.sleep(0.1)  # a is in its second trial
    time.sleep(0.5)
    assert a.poll() is None, "".join(a.lines)
    os.killpg(a.pid, signal.SIGKILL)  # no chance to tell Optuna anything
    a.wait(timeout=30)
    restarted = start_worker(tmp_path, "a2", postgres, "pg", *args)  # a restarted worker joins again
    out_b, out_r = finish(b), finish(restarted)
    assert b.returncode == 0 and restarted.returncode == 0, out_b[-3000:] + out_r[-3000:]
    assert "no heartbeat" in out_b + out_r
    check_shared_study(postgres, "pg", n_trials, killed=1)


# ---------------------------------------------------------------------------------- journal file
@pytest.mark.slow
def test_two_workers_share_one_study_in_a_journal_file_that_optuna_dashboard_reads(tmp_path):
    storage = str(tmp_path / "study.log")  # the plain path: the one form both the sweeps and optuna-dashboard take
    args = ["hydra.sweeper.n_trials=6", "sleep=0.3", *FAST_HEARTBEAT]
    workers = [start_worker(tmp_path, name, storage, "journal", *args) for name in ("a", "b")]
    outputs = [finish(w) for w in workers]
    assert all(w.returncode == 0 for w in workers), "\n".join(o[-2000:] for o in outputs)
    study = check_shared_study(storage, "journal", 6)
    runs = {w: sum(": lr=" in ln and "trial " in ln for ln in w.lines) for w in workers}
    assert sum(runs.values()) == 6 and all(runs.values()), runs  # both took part
    assert (tmp_path / "a" / "optimization_results.yaml").exists() and study.best_trial is not None
    assert [s["study_name"] for s in dashboard_studies(storage)] == ["journal"]


def dashboard_studies(storage: str, timeout: float = 180.0) -> list[dict]:
    """The studies optuna-dashboard (its command line, as a user starts it) lists for ``storage``."""
    import json
    import urllib.request

    cli = Path(sys.executable).parent / "optuna-dashboard"
    if not cli.exists():
        pytest.fail("optuna-dashboard is not installed: `make install` installs the dashboard extra")
    port = _free_port()
    proc = subprocess.Popen([str(cli), storage, "--host", "127.0.0.1", "--port", str(port)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + timeout
        while time.time() < deadline:
            assert proc.poll() is None, proc.stdout.read()[-3000:]  # it refused the storage
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/studies", timeout=5) as reply:
                    return json.loads(reply.read())["study_summaries"]
            except OSError:
                time.sleep(0.5)
        pytest.fail(f"optuna-dashboard did not answer within {timeout:.0f} s")
    finally:
        proc.terminate()
        proc.wait(timeout=30)


@pytest.mark.slow
@pytest.mark.parametrize("launcher", ["joblib", "submitit_local"])
def test_the_sweeper_runs_its_batches_through_hydras_joblib_and_submitit_launchers(tmp_path, launcher):
    import optuna

    db = f"sqlite:///{tmp_path / 'optuna.db'}"
    cmd = toy_command(tmp_path, db, "launch", f"hydra/launcher={launcher}", "hydra.sweeper.n_jobs=2",
                      "hydra.sweeper.n_trials=4", f"hydra.sweep.dir={tmp_path / 'mr'}")
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:] + proc.stdout[-3000:]
    trials = optuna.load_study(study_name="launch", storage=db).trials
    assert [t.state for t in trials] == [optuna.trial.TrialState.COMPLETE] * 4
    assert len({(t.params["lr"], t.params["batch_size"]) for t in trials}) == 4


# ------------------------------------------------------------------------------------------- grid
def _grid_trials(storage, study_name):
    import optuna

    return optuna.load_study(study_name=study_name, storage=storage).get_trials(deepcopy=False)


@pytest.mark.slow
def test_a_grid_through_optuna_resumes_after_an_interruption_without_rerunning_a_value(tmp_path):
    """GridSampler over lr x batch size: Ctrl-C in the middle of a point, then the same command runs the
    points left (the interrupted one again, once); a grown grid runs only its new points."""
    from optuna.trial import TrialState

    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    grid = ["hydra.sweeper.sampler.kind=grid", "batch_size=choice(16, 32)"]
    first = start_worker(tmp_path, "a", storage, "grid", *grid, "lr=choice(1e-4, 1e-3)", "sleep=1.5")
    deadline = time.time() + 120
    while time.time() < deadline and sum("trial " in ln and ": lr=" in ln for ln in first.lines) < 2:
        time.sleep(0.1)  # the first point is done, the second running
    first.send_signal(signal.SIGINT)
    out = finish(first)
    assert first.returncode == 130, out[-3000:]
    trials = _grid_trials(storage, "grid")
    assert [t.state for t in trials[:2]] == [TrialState.COMPLETE, TrialState.FAIL] and trials[1].user_attrs["interrupted"]

    again = subprocess.run(toy_command(tmp_path, storage, "grid", *grid, "lr=choice(1e-4, 1e-3)",
                                       f"hydra.sweep.dir={tmp_path / 'b'}"), capture_output=True, text=True,
                           cwd=tmp_path, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    grown = subprocess.run(toy_command(tmp_path, storage, "grid", *grid, "lr=choice(1e-4, 1e-3, 1e-2)",
                                       f"hydra.sweep.dir={tmp_path / 'c'}"), capture_output=True, text=True,
                           cwd=tmp_path, timeout=300)
    assert grown.returncode == 0, grown.stderr[-3000:]
    trials = _grid_trials(storage, "grid")
    complete = [(t.params["lr"], t.params["batch_size"]) for t in trials if t.state == TrialState.COMPLETE]
    assert sorted(complete) == sorted((lr, bs) for lr in (1e-4, 1e-3, 1e-2) for bs in (16, 32))  # each once
    interrupted = [t for t in trials if t.state == TrialState.FAIL]
    assert len(interrupted) == 1 and (interrupted[0].params["lr"], interrupted[0].params["batch_size"]) in complete
    assert all("grid_id" in t.system_attrs for t in trials)  # every point placed by GridSampler


@pytest.mark.filterwarnings("ignore::optuna.exceptions.ExperimentalWarning")
def test_a_grid_creator_that_died_mid_queue_leaves_slots_refilled_with_the_points_no_trial_holds(tmp_path,
                                                                                                monkeypatch):
    import optuna

    from sparsegrad.suite.sweep import studies

    storage = studies.open_storage(f"journal://{tmp_path / 'study.log'}")
    space = {"lr": [1e-4, 1e-3, 1e-2], "batch_size": [16]}
    original, added = optuna.study.Study.add_trial, {"n": 0}

    def dies(self, trial):
        if added["n"] == 1:
            raise RuntimeError("the creator died")
        added["n"] += 1
        return original(self, trial)

    monkeypatch.setattr(optuna.study.Study, "add_trial", dies)
    with pytest.raises(RuntimeError):
        studies.prepare_grid(storage, "g", "maximize", space, seed=34)
    monkeypatch.setattr(optuna.study.Study, "add_trial", original)
    study = studies.prepare_grid(storage, "g", "maximize", space, seed=34)  # a later worker
    assert studies.missing_slots(study) == [1, 2]
    assert studies.refill(study) == [1, 2]

    def points():
        out = []
        for t in study.get_trials(deepcopy=False):
            grid = t.system_attrs["search_space"]
            out.append(studies.grid_points(grid, t.system_attrs[studies.GRID_SEED_ATTR])[t.system_attrs["grid_id"]])
        return sorted(p["lr"] for p in out)

    assert points() == [1e-4, 1e-3, 1e-2]  # one ticket per point, whoever queued it
    grown = studies.prepare_grid(storage, "g", "maximize", {**space, "lr": [1e-4, 1e-3, 1e-2, 1e-1]}, seed=34)
    assert studies.progress(grown)["budget"] == 4 and points() == [1e-4, 1e-3, 1e-2, 1e-1]
