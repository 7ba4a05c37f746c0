"""Sweeps that outlive their faults: a creator killed while it queues the budget, a worker paused past
its grace period, SIGTERM (what ``timeout``, SLURM and preemption send) to a worker or a driver.

The real Hydra sweeper on the toy app, against a private PostgreSQL server and a journal file; the
fault-free cases are in test_sweep.py.
"""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_sweep import FAST_HEARTBEAT, finish, postgres, start_worker  # noqa: F401 - postgres is a fixture

from sparsegrad.suite.sweep import studies

ROOT = Path(__file__).resolve().parents[1]


def _load(storage, name):
    import optuna

    return optuna.load_study(study_name=name, storage=studies.open_storage(storage))


def _wait_for(condition, what, timeout=120):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if condition():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def _said(proc, text) -> bool:
    return any(text in line for line in proc.lines)


def _check_one_complete_per_slot(study, n_trials):
    """Each budget slot ended by exactly one COMPLETE trial, no setting twice; every FAIL explained."""
    from optuna.trial import TrialState

    trials = study.get_trials(deepcopy=False)
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    slots = sorted(t.system_attrs[studies.TICKET_ATTR] for t in complete)
    assert slots == list(range(n_trials)), [(t.number, t.state, t.system_attrs, t.user_attrs) for t in trials]
    assert len({tuple(sorted(t.params.items())) for t in complete}) == n_trials, "a setting ran twice"
    assert not [t for t in trials if t.state in (TrialState.WAITING, TrialState.RUNNING)]
    return trials


# ------------------------------------------------------------------------- in process, every point
@pytest.mark.parametrize("died_after", [0, 1, 2])
@pytest.mark.filterwarnings("ignore::optuna.exceptions.ExperimentalWarning")
def test_whatever_ticket_the_creator_died_at_the_next_worker_queues_the_rest(tmp_path, monkeypatch, died_after):
    import optuna

    storage = studies.open_storage(f"journal://{tmp_path / 'study.log'}")
    added = {"n": 0}
    original = optuna.study.Study.add_trial

    def dies(self, trial):
        if added["n"] == died_after:
            raise RuntimeError("the creator died")
        added["n"] += 1
        return original(self, trial)

    monkeypatch.setattr(optuna.study.Study, "add_trial", dies)
    with pytest.raises(RuntimeError):
        studies.prepare(storage, "s", "maximize", 3)
    monkeypatch.setattr(optuna.study.Study, "add_trial", original)

    study = studies.prepare(storage, "s", "maximize", 3)  # a later worker: the budget is recorded, slots missing
    assert studies.missing_slots(study) == list(range(died_after, 3))
    refill = studies.Refill(settle=0.05)
    assert refill(study) == []  # first sight: the creator may still be queuing
    time.sleep(0.06)
    assert refill(study) == list(range(died_after, 3)) and studies.missing_slots(study) == []
    assert len(studies.claim(study, 10)) == 3 and studies.progress(study)["slots"] == 3


def test_a_creator_that_died_before_recording_the_budget_is_replaced_after_the_wait(tmp_path):
    import optuna

    storage = studies.open_storage(f"journal://{tmp_path / 'study.log'}")
    optuna.create_study(study_name="s", storage=storage)  # created, then killed: no budget, no ticket
    study = studies.prepare(storage, "s", "maximize", 3, wait_s=0.2)
    assert studies.progress(study) == {"budget": 3, "slots": 3, "waiting": 3, "running": 0}


@pytest.mark.filterwarnings("ignore::optuna.exceptions.ExperimentalWarning")
def test_a_slot_two_workers_refilled_at_once_runs_once(tmp_path):
    import optuna

    storage = studies.open_storage(f"journal://{tmp_path / 'study.log'}")
    study, _ = studies._get_or_create(storage, "s", "maximize")
    storage.set_study_system_attr(study._study_id, studies.BUDGET_ATTR, 3)
    study.add_trial(studies._ticket(0))
    seen_by_both = studies.missing_slots(study)  # both workers look before either queues
    for _ in range(2):
        for slot in seen_by_both:
            study.add_trial(studies._ticket(slot))
    claimed = studies.claim(study, 10)
    slots = [storage.get_trial(i).system_attrs[studies.TICKET_ATTR] for i in claimed]
    assert sorted(slots) == [0, 1, 2]
    lost = [t for t in study.get_trials() if t.state == optuna.trial.TrialState.FAIL]
    assert len(lost) == 2 and all(studies.DUPLICATE_TICKET_ATTR in t.user_attrs for t in lost)
    assert studies.progress(study) == {"budget": 3, "slots": 3, "waiting": 0, "running": 3}


@pytest.mark.filterwarnings("ignore::optuna.exceptions.ExperimentalWarning")
def test_slots_that_cannot_be_queued_stop_the_worker_with_the_repair_command(tmp_path, monkeypatch, capsys):
    import optuna
    from omegaconf import OmegaConf

    from hydra_plugins.sparsegrad_optuna_sweeper.sweeper import OptunaSweeper
    from scripts import repair_study

    url = f"journal://{tmp_path / 'study.log'}"
    study, _ = studies._get_or_create(studies.open_storage(url), "cut", "maximize")
    study._storage.set_study_system_attr(study._study_id, studies.BUDGET_ATTR, 2)  # its creator died at once
    conf = OmegaConf.create({"storage": url, "grace_period": 0.0})
    original = optuna.study.Study.add_trial
    monkeypatch.setattr(optuna.study.Study, "add_trial", lambda *a: (_ for _ in ()).throw(OSError("disk full")))
    refill = studies.Refill(0.0)
    assert not OptunaSweeper._done_or_refilled(study, refill, conf)  # first sight: wait and see
    with pytest.raises(studies.StudyError) as err:
        OptunaSweeper._done_or_refilled(study, refill, conf)
    assert str(err.value) == ("study 'cut': budget slots [0, 1] have no trial and could not be queued (OSError: disk "
                              f"full); repair it with: python -m scripts.repair_study --storage '{url}' --study 'cut'")
    monkeypatch.setattr(optuna.study.Study, "add_trial", original)
    assert repair_study.main(["--storage", url, "--study", "cut"]) == 0  # the command it names does repair it
    assert "budget 2, 2 slot(s) with a trial; trials 2 waiting" in capsys.readouterr().out
    assert studies.missing_slots(study) == []


def _race_refills(storage: str, workers: int = 4) -> None:
    """Workers that all saw slots 1-3 missing queue them at the same instant, each through its own
    connection, then all claim at once: every slot is claimed once, every other ticket is FAIL unrun."""
    import threading

    import optuna

    first = studies.open_storage(storage)
    study, _ = studies._get_or_create(first, "race", "maximize")
    first.set_study_system_attr(study._study_id, studies.BUDGET_ATTR, 4)
    study.add_trial(studies._ticket(0))
    views = [optuna.load_study(study_name="race", storage=studies.open_storage(storage)) for _ in range(workers)]
    seen = [studies.missing_slots(view) for view in views]
    barrier, claimed = threading.Barrier(workers), []

    def worker(view, missing):
        barrier.wait()
        for slot in missing:
            view.add_trial(studies._ticket(slot))
        barrier.wait()
        claimed.extend(view._storage.get_trial(i).system_attrs[studies.TICKET_ATTR] for i in studies.claim(view, 10))

    threads = [threading.Thread(target=worker, args=pair) for pair in zip(views, seen)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert seen == [[1, 2, 3]] * workers and sorted(claimed) == [0, 1, 2, 3], claimed
    unrun = [t for t in views[0].get_trials() if t.state.name == "FAIL"]
    assert len(unrun) == 3 * (workers - 1) and all(studies.DUPLICATE_TICKET_ATTR in t.user_attrs for t in unrun)


# ----------------------------------------------------------------- real workers, PostgreSQL + journal
@pytest.mark.slow
@pytest.mark.parametrize("kind", ["postgresql", "journal"])
def test_a_creator_killed_mid_queue_and_a_paused_worker_still_give_exactly_the_budget(tmp_path, request, kind):
    """The creator queues 1 of 3 tickets and is SIGKILLed. Three workers start together; the one that takes
    that ticket is paused (SIGSTOP) past the grace period; the other two both see slots 1-2 missing and
    queue them (perhaps both: only one ticket per slot runs), fail the paused trial and retry its setting.
    When the paused worker wakes up its result is too late for Optuna: named on screen as a duplicate run
    of that setting and kept in the study. Then four workers queue the same missing slots at once."""
    storage = request.getfixturevalue("postgres") if kind == "postgresql" else f"journal://{tmp_path / 'study.log'}"
    args = ["hydra.sweeper.n_trials=3", "sleep=0.5", *FAST_HEARTBEAT]
    creator = subprocess.run([sys.executable, str(ROOT / "tests/fixtures/toy_sweep/app.py"), "--multirun",
                              f"hydra.sweeper.storage={storage}", "hydra.sweeper.study_name=cut", *args,
                              f"hydra.sweep.dir={tmp_path / 'creator'}"], cwd=tmp_path, capture_output=True,
                             text=True, timeout=120, env={**os.environ, studies.KILL_AFTER_TICKETS_ENV: "1"})
    assert creator.returncode == -signal.SIGKILL, creator.stdout[-2000:] + creator.stderr[-2000:]
    assert studies.progress(_load(storage, "cut")) == {"budget": 3, "slots": 1, "waiting": 1, "running": 0}

    workers = [start_worker(tmp_path, name, storage, "cut", *args) for name in ("a", "b", "c")]
    _wait_for(lambda: any(_said(w, "trial 0: ") for w in workers), "a worker to take the queued trial")
    paused = next(w for w in workers if _said(w, "trial 0: "))
    os.killpg(paused.pid, signal.SIGSTOP)
    try:
        _wait_for(lambda: _load(storage, "cut").trials[0].state.name == "FAIL", "the paused trial to be failed")
    finally:
        os.killpg(paused.pid, signal.SIGCONT)
    outputs = [finish(w) for w in workers]
    assert all(w.returncode == 0 for w in workers), "\n".join(o[-2000:] for o in outputs)
    others = "".join(o for w, o in zip(workers, outputs) if w is not paused)
    assert "had no trial" in others and "queued them" in others  # the missing slots, named

    study = _load(storage, "cut")
    trials = _check_one_complete_per_slot(study, 3)
    for t in (t for t in trials if t.state.name == "FAIL"):  # a's trial, or a ticket that lost the refill race
        assert t.number == 0 and t.user_attrs.get("stale_heartbeat") or studies.DUPLICATE_TICKET_ATTR in t.user_attrs
    retry = next(t for t in trials if t.system_attrs.get("failed_trial") == 0 and t.state.name == "COMPLETE")
    assert retry.params == trials[0].params
    warning = next(ln for ln in paused.lines if "duplicate run of that setting" in ln)
    assert "WARNING: duplicate run: study 'cut': trial 0 (" in warning
    assert f"queued again as trial {retry.number}" in warning and str(tmp_path) in warning
    [kept] = studies.duplicate_runs(study)
    assert kept["trial"] == 0 and kept["params"] == trials[0].params and kept["retried_as"] == retry.number
    _race_refills(storage)


# ------------------------------------------------------------------------------------------ SIGTERM
@pytest.mark.slow
def test_sigterm_gives_a_workers_trial_back_with_its_setting_and_the_same_command_resumes(tmp_path):
    storage = f"journal://{tmp_path / 'study.log'}"
    args = ["hydra.sweeper.n_trials=2", "sleep=1.5", *FAST_HEARTBEAT]
    worker = start_worker(tmp_path, "a", storage, "term", *args)
    _wait_for(lambda: _said(worker, "trial 0: "), "the first trial")
    time.sleep(0.3)
    worker.send_signal(signal.SIGTERM)  # the worker only, as `kill` or a scheduler would
    out = finish(worker, timeout=60)
    assert worker.returncode == 130, out[-3000:]
    assert "interrupted by SIGTERM: trial(s) 0 given back to study 'term'" in out and "Traceback" not in out
    first = _load(storage, "term").trials
    assert first[0].state.name == "FAIL" and first[0].user_attrs[studies.INTERRUPTED_ATTR] == "interrupted by SIGTERM"
    [requeued] = [t for t in first if t.state.name == "WAITING" and t.system_attrs.get("failed_trial") == 0]
    assert requeued.params == first[0].params and requeued.system_attrs[studies.TICKET_ATTR] == 0

    again = start_worker(tmp_path, "b", storage, "term", *args)
    out = finish(again)
    assert again.returncode == 0, out[-3000:]
    trials = _check_one_complete_per_slot(_load(storage, "term"), 2)
    assert [t.params for t in trials if t.system_attrs.get("failed_trial") == 0] == [first[0].params]
    assert len(trials) == 3  # the interrupted trial, its requeue, the second slot: counted once


def test_a_driver_stopped_by_sigterm_passes_it_on_to_its_child_and_gives_its_claim_back(tmp_path):
    """SIGTERM to the driver's own process while it waits for a seed run: the child gets it too, the claim
    on the seed runs is released, and KeyboardInterrupt carries the stop up to the entry point."""
    import stat

    from sparsegrad.suite import interrupts
    from sparsegrad.suite.sweep import driver as sweep

    child = tmp_path / "python"  # stands in for `python -m experiments.finetune`: SIGTERMs the driver, then waits
    child.write_text(f"#!/bin/sh\ntrap 'echo stopped > {tmp_path}/child; exit 130' TERM\n"
                     f"kill -TERM $PPID\nsleep 30 & wait\n")
    child.chmod(child.stat().st_mode | stat.S_IEXEC)
    profile = sweep.Profile(name="t", models=["tiny_bert"], methods=["full"], tasks=["movie_sentiment"], seeds=[1])
    layout = sweep.Layout(results=tmp_path / "results", work=tmp_path / "work")
    driver = sweep.Driver(profile, layout, sweep.Options(quiet=True, python=str(child)))
    started = time.time()
    try:
        with pytest.raises(KeyboardInterrupt), interrupts.catching(signal.SIGTERM, signal.SIGHUP):  # as run_profile
            driver.seeds("tiny_bert", "full", "movie_sentiment", {"lr": 1e-4, "batch_size": 8})
        assert interrupts.cause() == "SIGTERM" and time.time() - started < 20
    finally:
        interrupts._received.clear()  # this test process was not stopped: later tests see no interrupt
    assert (tmp_path / "child").read_text().strip() == "stopped"
    assert not list((layout.results / "claims").glob("*.claim"))
