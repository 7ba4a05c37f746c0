"""The Optuna sweep driver: failed trials, interruption and resume, parallel trials, profiles."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from sparsegrad.suite.sweep import driver as sweep

ROOT = Path(__file__).resolve().parents[2]
APP = Path(__file__).parent / "fixtures" / "diverging_app" / "app.py"
TINY_OVERRIDES = [
    "logger=none", "trainer=smoke", "trainer.max_steps=3", "trainer.eval_every=3", "trainer.timing_warmup_steps=1",
    "task.max_train_samples=48", "task.max_selection_samples=16", "task.max_report_samples=16", "task.max_length=24",
]


def tiny_driver(tmp_path, n_trials=2, steps=3, **options) -> sweep.Driver:
    profile = sweep.Profile(name="t", models=["tiny_bert"], methods=["full"], tasks=["movie_sentiment"], seeds=[1],
                            sweep={"search": "lr_batch_narrow", "n_trials": n_trials, "seed": 34},
                            overrides=[*TINY_OVERRIDES, f"trainer.max_steps={steps}", f"trainer.eval_every={steps}"])
    layout = sweep.Layout(results=tmp_path / "results", work=tmp_path / "work")
    return sweep.Driver(profile, layout, sweep.Options(quiet=True, **options))


def trials(tmp_path, name="tiny_bert-full-movie_sentiment"):
    import optuna

    study = optuna.load_study(study_name=name, storage=f"sqlite:///{tmp_path / 'results' / 'optuna.db'}")
    return study.get_trials(deepcopy=False)


@pytest.fixture(autouse=True)
def _local_storage(monkeypatch):
    monkeypatch.delenv(sweep.STORAGE_ENV, raising=False)


# ------------------------------------------------------------------------------------------- fast
def test_every_profile_loads_and_names_real_configs():
    conf = ROOT / "conf"
    for name in sweep.available_profiles():
        p = sweep.load_profile(name)
        for group, names in (("model", p.models + p.optional_models), ("method", p.methods), ("task", p.tasks)):
            for n in names:
                assert (conf / group / f"{n}.yaml").exists(), f"profile {name}: no conf/{group}/{n}.yaml"
        if p.sweep:
            assert (conf / "hparams_search" / f"{p.sweep['search']}.yaml").exists()
    assert {"default", "smoke", "paper", "paper_best", "llama", "llama_offline"} <= set(sweep.available_profiles())


def test_a_profile_grid_per_study_with_a_default_and_batch_sizes():
    grid = {"default": [3e-4, 1e-4], "lora": [1e-3], "minilm_mlp/full": [2e-3], "minilm_mlp": [5e-3]}
    p = sweep.Profile(name="g", models=["minilm"], methods=["full"], tasks=["t"], seeds=[1],
                      sweep={"grid": grid, "batch_size": [32, 16]})
    assert p.grid("minilm", "full") == {"trainer.lr": [1e-4, 3e-4], "trainer.batch_size": [16, 32]}
    assert p.grid("minilm", "lora")["trainer.lr"] == [1e-3]
    assert p.grid("minilm_mlp", "full")["trainer.lr"] == [2e-3]
    assert p.grid("minilm_mlp", "lora")["trainer.lr"] == [5e-3]
    assert p.grid_size("minilm", "full") == 4
    single = sweep.Profile(name="g", models=["m"], methods=["x"], tasks=["t"], seeds=[1], sweep={"grid": [1e-3, 1e-4]})
    assert single.grid("m", "x") == {"trainer.lr": [1e-4, 1e-3], "trainer.batch_size": [16]}
    tpe = sweep.Profile(name="g", models=["m"], methods=["x"], tasks=["t"], seeds=[1], sweep={"search": "lr_cpu"})
    assert tpe.grid("m", "x") is None
    with pytest.raises(sweep.ReproduceError, match="no entry for m/x"):
        sweep.Profile(name="g", models=["m"], methods=["x"], tasks=["t"], seeds=[1], sweep={"grid": {"y": [1.0]}}).grid("m", "x")


def test_the_plan_counts_the_grid_points_left():
    from sparsegrad.suite.sweep import progress
    from tests.reproduce.fixture_records import record

    profile = sweep.Profile(name="g", models=["minilm"], methods=["full"], tasks=["movie_sentiment"], seeds=[1, 2, 3],
                            sweep={"grid": [1e-4, 3e-4, 1e-3], "batch_size": [16, 32]})
    done = [record("sweep", "full", "movie_sentiment", 42, 0.8, lr=1e-4)]
    plan = progress.make_plan(profile, done)
    assert (plan.studies[0].sweep, plan.studies[0].seeds, plan.done) == (5, 3, 1)


def test_the_default_profile_runs_its_grids_as_optuna_grid_studies(capsys):
    """The stated grid is an Optuna study (GridSampler) through the sweeper, like every other search."""
    assert sweep.run_profile("default", dry_run=True, quiet=True) == 0
    out = capsys.readouterr().out
    profile = sweep.load_profile("default")
    for model in profile.models:
        for method in profile.methods:
            grid = profile.grid(model, method)
            lrs = ", ".join(repr(v) for v in grid["trainer.lr"])
            assert f"trainer.lr=choice({lrs})" in out, (model, method)
    assert "+hparams_search=lr_grid" in out and "hydra.sweeper.sampler.kind=grid" in out
    assert out.count("experiments.finetune --multirun +hparams_search=lr_grid") == len(profile.studies())


def test_unknown_profile_lists_the_valid_ones():
    with pytest.raises(sweep.ReproduceError, match="valid profiles: .*default"):
        sweep.load_profile("nope")


def test_paper_best_settings_come_from_tables_13_to_15():
    assert sweep.paper_best_setting("bert_base", "cola") == {"lr": 3.15e-05, "batch_size": 32}
    assert sweep.paper_best_setting("roberta_large", "mnli") == {"lr": 1.15e-06, "batch_size": 16}
    with pytest.raises(sweep.ReproduceError):
        sweep.paper_best_setting("minilm", "cola")


def test_storage_comes_from_the_environment(tmp_path, monkeypatch):
    layout = sweep.Layout(results=tmp_path, work=tmp_path)
    assert layout.storage() == f"sqlite:///{tmp_path / 'optuna.db'}" and not layout.shared_storage()
    monkeypatch.setenv(sweep.STORAGE_ENV, "postgresql://u@h/db")
    assert layout.storage() == "postgresql://u@h/db" and layout.shared_storage()


def test_dry_run_of_the_paper_profiles_composes_commands(capsys):
    assert sweep.run_profile("paper", dry_run=True, extra_models=("roberta_large",), quiet=True) == 0
    out = capsys.readouterr().out
    assert "model=roberta_large" in out and "+hparams_search=lr_batch" in out and "trainer=paper" in out
    assert sweep.run_profile("llama", dry_run=True, lr=9e-5, quiet=True) == 0
    assert "trainer.lr=9e-05" in capsys.readouterr().out


def test_diverged_and_crashed_trials_are_recorded_as_fail_and_the_sweep_goes_on(tmp_path):
    import optuna

    db = tmp_path / "optuna.db"
    cmd = [sys.executable, str(APP), "--multirun", f"hydra.searchpath=[file://{ROOT / 'conf'}]",
           "+hparams_search=lr_batch", f"hydra.sweeper.storage=sqlite:///{db}", "hydra.sweeper.study_name=div",
           "hydra.sweeper.n_trials=8", f"hydra.sweep.dir={tmp_path / 'multirun'}"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    study = optuna.load_study(study_name="div", storage=f"sqlite:///{db}")
    state = optuna.trial.TrialState
    assert len(study.trials) == 8
    for t in study.trials:
        expected = state.COMPLETE if t.params["trainer.batch_size"] == 16 else state.FAIL
        assert t.state == expected, (t.number, t.params, t.state)
    assert {t.params["trainer.batch_size"] for t in study.trials} == {8, 16, 32}


# ------------------------------------------------------------------------------------------- slow
@pytest.mark.slow
def test_interrupted_sweep_resumes_without_running_anything_twice(tmp_path, asset):
    import optuna

    asset("movie_reviews")
    driver = tiny_driver(tmp_path, n_trials=3, steps=40)  # trials long enough to be caught running
    outcome = {}

    def target():
        try:
            outcome["best"] = driver.sweep("tiny_bert", "full", "movie_sentiment")
        except KeyboardInterrupt:
            outcome["interrupted"] = True

    thread = threading.Thread(target=target)
    thread.start()
    deadline = time.time() + 240
    while time.time() < deadline:  # interrupt once the first trial is in the database as finished
        time.sleep(0.2)
        db = tmp_path / "results" / "optuna.db"
        if db.exists() and driver.current is not None:
            try:
                states = [t.state for t in trials(tmp_path)]
            except Exception:  # the study may not exist yet
                continue
            if optuna.trial.TrialState.COMPLETE in states:
                driver.current.send_signal(signal.SIGINT)
                break
    thread.join(timeout=240)
    assert outcome.get("interrupted"), outcome

    best = tiny_driver(tmp_path, n_trials=3, steps=40).sweep("tiny_bert", "full", "movie_sentiment")
    assert best is not None
    state = optuna.trial.TrialState
    ts = trials(tmp_path)
    complete = [t for t in ts if t.state == state.COMPLETE]
    assert len(complete) == 3
    assert [t.number for t in ts] == list(range(len(ts)))  # the trial count continues
    assert len({(t.params["trainer.lr"], t.params["trainer.batch_size"]) for t in complete}) == 3
    assert all(t.user_attrs.get("interrupted") for t in ts if t.state == state.FAIL)
    records = [r for r in sweep.load_records(tmp_path / "results" / "records") if r["_stage"] == "sweep"]
    assert len(records) == 3 and all(r["status"] == "completed" for r in records)

    again = tiny_driver(tmp_path, n_trials=3, steps=40)
    again.sweep("tiny_bert", "full", "movie_sentiment")
    assert again.commands == [] and len(trials(tmp_path)) == len(ts)  # nothing left to run


@pytest.mark.slow
def test_joblib_launcher_runs_two_trials_in_parallel_against_one_study(tmp_path, asset):
    import datetime as dt

    import optuna

    asset("movie_reviews")
    driver = tiny_driver(tmp_path, n_trials=2, launcher="parallel", jobs=2)
    assert driver.sweep("tiny_bert", "full", "movie_sentiment") is not None
    assert any("hydra/launcher=parallel" in c for c in driver.commands[0])
    ts = trials(tmp_path)
    assert [t.state for t in ts] == [optuna.trial.TrialState.COMPLETE] * 2
    records = sweep.load_records(tmp_path / "results" / "records")
    assert len(records) == 2
    spans = [(dt.datetime.fromisoformat(r["started_at"]), dt.datetime.fromisoformat(r["finished_at"])) for r in records]
    assert max(s for s, _ in spans) <= min(f for _, f in spans), f"the two trials did not overlap: {spans}"


@pytest.mark.slow
def test_smoke_profile_end_to_end(tmp_path, asset):
    asset("movie_reviews")
    env = {**os.environ, sweep.RESULTS_ENV: str(tmp_path / "results"), sweep.WORK_ENV: str(tmp_path / "work")}
    env.pop(sweep.STORAGE_ENV, None)
    cmd = [sys.executable, "-m", "scripts.reproduce_glue", "--profile", "smoke"]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "Traceback" not in proc.stdout + proc.stderr
    out = tmp_path / "results" / "smoke"
    for name in ("tables/table09.md", "tables/table13_15.csv", "tables/table11_12.tex", "tables.md",
                 "figures/figure2_gradient_sparsity.png", "figures/figure3_output_gradient_rows.pdf",
                 "figures/pareto_memory_score.png", "analysis/sparsity.json", "optuna.db"):
        assert (out / name).stat().st_size > 0, name
    n_records = len(sweep.load_records(out / "records"))
    assert n_records == 22  # 5 studies (full, lora, meprop, sparsegrad, shira) x (2 trials + 2 seeds) + 2 kept fractions
    assert "plan: 22 runs to do (10 sweep trials, 10 seed re-runs, 2 kept-fraction runs; 0 already" in proc.stdout
    assert "smoke: 22/22 runs" in proc.stderr
    findings_md = (out / "findings.md").read_text(encoding="utf-8")
    assert "| (a) SparseGrad ≥ LoRA" in findings_md and "| (e) steps/s" in findings_md
    summary = (out / "tables.md").read_text(encoding="utf-8")
    assert summary.index("### Findings") < summary.index("### Table")
    for name in ("figures/sweep_history.png", "figures/sweep_objective_vs_lr.pdf"):
        assert (out / name).stat().st_size > 0, name
    # a second run finds everything done and only rebuilds the tables
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)
    assert proc.returncode == 0 and "all 2 trials done" in proc.stdout and "all 2 seed runs done" in proc.stdout
    assert "plan: 0 runs to do (0 sweep trials, 0 seed re-runs, 0 kept-fraction runs; 22 already" in proc.stdout
    assert "sweep tiny_bert-meprop-movie_sentiment: all 2 trials done" in proc.stdout
    assert len(sweep.load_records(out / "records")) == n_records
    tables_only = subprocess.run([*cmd, "--tables-only"], capture_output=True, text=True, cwd=ROOT, env=env,
                                 timeout=300)
    assert tables_only.returncode == 0, tables_only.stdout


def test_harvest_copies_finished_records_once_and_done_seeds_matches_the_setting(tmp_path):
    import json

    layout = sweep.Layout(results=tmp_path / "results", work=tmp_path / "work")
    own = layout.identity["id"]

    def write(folder, status, seed, lr, stage="seeds"):
        d = layout.work / folder
        d.mkdir(parents=True)
        meta = {"stage": stage, "results_id": own} if stage else {}
        rec = {"run_id": folder, "model": "minilm", "method": "full", "task": "movie_score", "seed": seed,
               "status": status, "config": {"trainer": {"lr": lr, "batch_size": 16}, "reproduce": meta}}
        (d / "record.json").write_text(json.dumps(rec), encoding="utf-8")

    write("a", "completed", 1, 1e-4)
    write("b", "interrupted", 2, 1e-4)  # resumed later: not a finished run
    write("c", "diverged", 3, 1e-4)
    write("d", "completed", 2, 3e-4)  # another setting
    write("e", "completed", 5, 1e-4, stage=None)  # not a reproduce-glue run
    assert sweep.harvest(layout) == 3 and sweep.harvest(layout) == 0
    records = sweep.load_records(layout.records)
    assert sorted(r["run_id"] for r in records) == ["a", "c", "d"]
    assert sweep.done_seeds(records, "seeds", "minilm", "full", "movie_score", 1e-4, 16) == {1, 3}
    assert sweep.done_seeds(records, "seeds", "minilm", "full", "movie_score", 3e-4, 16) == {2}
    assert sweep.done_seeds(records, "seeds", "minilm", "full", "movie_score", 1e-4, 8) == set()


@pytest.mark.filterwarnings("ignore::optuna.exceptions.ExperimentalWarning")
def test_stale_trials_are_settled_from_their_run_records_or_retried_once(tmp_path):
    import optuna
    from optuna.distributions import CategoricalDistribution, FloatDistribution

    storage, name = f"sqlite:///{tmp_path / 'optuna.db'}", "minilm-full-movie_score"
    study = optuna.create_study(study_name=name, storage=storage, direction="maximize")
    space = {"trainer.lr": FloatDistribution(1e-5, 1e-3, log=True),
             "trainer.batch_size": CategoricalDistribution([8, 16])}
    finished, lost = study.ask(space), study.ask(space)  # both left RUNNING by a killed worker
    rec = {"_stage": "sweep", "run_id": "r1", "model": "minilm", "method": "full", "task": "movie_score",
           "status": "completed", "objective": 0.7,
           "config": {"trainer": {"lr": finished.params["trainer.lr"], "batch_size": finished.params["trainer.batch_size"]}}}
    alive = sweep.study_state(storage, name, "maximize", records=[rec])  # heartbeats younger than the grace period
    assert alive["settled"] == 0 and alive["running"] == 2
    state = sweep.study_state(storage, name, "maximize", records=[rec], grace=0)
    assert state["settled"] == 2 and state["running"] == 0 and state["waiting"] == 1
    assert state["best"]["value"] == 0.7 and state["best"]["number"] == finished.number
    trials = {t.number: t for t in optuna.load_study(study_name=name, storage=storage).trials}
    assert trials[finished.number].user_attrs["recovered_from_record"]
    assert trials[lost.number].state == optuna.trial.TrialState.FAIL and trials[lost.number].user_attrs["stale_heartbeat"]
    retry = trials[max(trials)]  # the lost trial's setting, queued once more
    assert retry.state == optuna.trial.TrialState.WAITING and retry.params == lost.params


def _fake_runs(driver: sweep.Driver, calls: list[tuple[str, str]]) -> None:
    """Stand in for the Hydra subprocess: a sweep adds its trials to the study (the highest lr wins), a seed
    run writes its run record where harvest would put it. ``calls`` gets (stage, method) per launch."""
    import json

    import optuna

    def run(overrides, what, log_name):
        over = dict(o.split("=", 1) for o in overrides if "=" in o)
        model, method, task, stage = over["model"], over["method"], over["task"], over["+reproduce.stage"]
        calls.append((stage, method))
        name = sweep.study_name(model, method, task)
        folder = driver.layout.records / stage / name
        folder.mkdir(parents=True, exist_ok=True)
        if stage == "sweep":  # claim the study's queued trials and finish them (the highest lr wins)
            from sparsegrad.suite.sweep import studies

            study = optuna.load_study(study_name=over["hydra.sweeper.study_name"],
                                      storage=over["hydra.sweeper.storage"])
            for i, trial_id in enumerate(studies.claim(study, 100)):
                params = {"trainer.lr": 1e-4 * (i + 1), "trainer.batch_size": 16}
                study._storage.set_trial_system_attr(trial_id, "fixed_params", params)
                trial = optuna.Trial(study, trial_id)
                trial.suggest_float("trainer.lr", 1e-6, 1e-1, log=True)
                trial.suggest_categorical("trainer.batch_size", [8, 16, 32])
                study.tell(trial, 0.5 + i / 10)
            return 0
        for seed in over["seed"].split(","):
            rec = {"run_id": f"{name}-{seed}", "model": model, "method": method, "task": task, "seed": int(seed),
                   "status": "completed", "objective": 0.5,
                   "config": {"trainer": {"lr": float(over["trainer.lr"]),
                                          "batch_size": int(over["trainer.batch_size"])}}}
            (folder / f"{rec['run_id']}.json").write_text(json.dumps(rec), encoding="utf-8")
        return 0

    driver.run = run


@pytest.mark.filterwarnings("ignore::optuna.exceptions.ExperimentalWarning")  # add_trial, create_trial
def test_a_method_added_to_a_finished_profile_runs_only_its_own_studies(tmp_path):
    """Editing a profile to add a method keeps every finished study and run record: only the new method's
    sweeps and seed runs are launched, and a second run launches nothing."""
    layout = sweep.Layout(results=tmp_path / "results", work=tmp_path / "work")

    def driver(methods):
        profile = sweep.Profile(name="t", models=["minilm"], methods=methods, tasks=["movie_sentiment", "movie_score"],
                                seeds=[1, 2], sweep={"search": "lr_batch_cpu", "n_trials": 2, "seed": 34},
                                method_overrides={"leading_block": ["method.basis_steps=3"]})
        return sweep.Driver(profile, layout, sweep.Options(quiet=True))

    calls: list[tuple[str, str]] = []
    first = driver(["full", "sparsegrad"])
    _fake_runs(first, calls)
    first.train()
    assert sorted(calls) == sorted([(s, m) for m in ("full", "sparsegrad") for s in ("sweep", "seeds")] * 2)
    finished = {p: p.read_bytes() for p in layout.records.rglob("*.json")}
    assert len(finished) == 2 * 2 * 2  # 2 methods x 2 tasks x 2 seeds

    calls.clear()
    added = driver(["full", "sparsegrad", "leading_block"])
    _fake_runs(added, calls)
    added.train()
    assert calls == [("sweep", "leading_block"), ("seeds", "leading_block")] * 2 and not added.failures
    assert {p: p.read_bytes() for p in finished} == finished  # the finished records are untouched
    assert len(list(layout.records.rglob("*.json"))) == len(finished) + 2 * 2
    storage = layout.storage()
    for method in ("full", "sparsegrad", "leading_block"):
        for task in ("movie_sentiment", "movie_score"):
            state = sweep.study_state(storage, sweep.study_name("minilm", method, task), "maximize")
            assert state["total"] == state["finished"] == 2, (method, task, state)

    calls.clear()
    again = driver(["full", "sparsegrad", "leading_block"])
    _fake_runs(again, calls)
    again.train()
    assert calls == []
