"""Fresh starts, no mixing, unreadable records, the tie-break rule, the reuse message, two drivers at once."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from sparsegrad.suite.report import tables
from sparsegrad.suite.sweep import driver as sweep
from sparsegrad.suite.sweep import runrecords
from tests.reproduce.fixture_records import record

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def roots(tmp_path, monkeypatch):
    monkeypatch.setenv(sweep.RESULTS_ENV, str(tmp_path / "results"))
    monkeypatch.setenv(sweep.WORK_ENV, str(tmp_path / "outputs"))
    monkeypatch.delenv(sweep.STORAGE_ENV, raising=False)
    return tmp_path


def write_run(folder: Path, rec: dict, results_id: str | None, stage: str = "seeds") -> Path:
    folder.mkdir(parents=True)
    rec = {**rec, "config": {**rec["config"], "reproduce": {"stage": stage, "results_id": results_id}}}
    rec.pop("_stage", None)
    (folder / "record.json").write_text(json.dumps(rec), encoding="utf-8")
    return folder / "record.json"


def test_a_results_folder_harvests_only_its_own_runs(roots):
    layout = sweep.Layout.for_profile("smoke")
    first = layout.identity["id"]
    write_run(layout.work / "a", record("seeds", "full", "movie_sentiment", 1, 0.7), first)
    assert sweep.harvest(layout) == 1
    # the folder is moved aside, as a user would to start over: the old runs must not come back
    layout.results.rename(layout.results.with_name("smoke.old"))
    assert layout.identity["id"] != first
    write_run(layout.work / "b", record("seeds", "full", "movie_sentiment", 2, 0.7), layout.identity["id"])
    assert sweep.harvest(layout) == 1
    assert [r["seed"] for r in sweep.load_records(layout.records)] == [2]


def test_fresh_start_goes_to_results_local_and_moves_an_earlier_one_aside(roots):
    committed = sweep.Layout.for_profile("smoke")
    write_run(committed.work / "a", record("seeds", "full", "movie_sentiment", 1, 0.7), committed.identity["id"])
    sweep.harvest(committed)
    fresh = sweep.Layout.for_profile("smoke", fresh=True)
    assert fresh.results == roots / "results" / "local" / "smoke" and fresh.work == roots / "outputs" / "local" / "smoke"
    assert sweep.start_fresh(fresh) == [] and fresh.identity["fresh"]
    write_run(fresh.work / "x", record("seeds", "full", "movie_sentiment", 3, 0.7), fresh.identity["id"])
    assert sweep.harvest(fresh) == 1
    moved = sweep.start_fresh(fresh)  # a second fresh start: nothing deleted, nothing reused
    assert len(moved) == 2 and all(".before-" in m for m in moved)
    assert sweep.load_records(fresh.records) == [] and not fresh.work.exists()
    assert len(sweep.load_records(committed.records)) == 1  # the committed records stay as they were
    with pytest.MonkeyPatch.context() as mp:  # a fresh start on a shared storage gets studies of its own
        mp.setenv(sweep.STORAGE_ENV, "postgresql://u@h/db")
        assert fresh.optuna_name("m", "full", "t") == f"m-full-t@{fresh.identity['id']}"
        assert committed.optuna_name("m", "full", "t") == "m-full-t"


def test_an_unreadable_record_is_reported_by_name_by_make_tables(roots, capsys):
    layout = sweep.Layout.for_profile("smoke")
    good = layout.records / "seeds" / "tiny_bert-full-movie_sentiment"
    good.mkdir(parents=True)
    rec = record("seeds", "full", "movie_sentiment", 1, 0.7, model="tiny_bert")
    rec.pop("_stage")
    (good / "ok.json").write_text(json.dumps(rec), encoding="utf-8")
    (good / "killed.json").write_text(json.dumps(rec)[:57], encoding="utf-8")  # truncated by a kill
    assert sweep.run_profile("smoke", tables_only=True) == sweep.EXIT_FAILED
    out = capsys.readouterr().out
    assert "1 run record(s) could not be read" in out and str(good / "killed.json") in out
    assert "1 run records ->" in out  # the readable one still makes the tables
    proc = subprocess.run([sys.executable, "-m", "scripts.build_tables", "--records", str(layout.records),
                           "--out", str(roots / "t")], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 1 and "killed.json" in proc.stdout and "Traceback" not in proc.stderr


def test_driver_and_tables_pick_the_same_best_trial_among_equal_objectives(tmp_path):
    """Equal objectives: the trial that started first wins, in the driver (the seeds' setting) and in the
    best-settings table, whatever the file order."""
    layout = sweep.Layout(results=tmp_path / "results", work=tmp_path / "work")
    folder = layout.records / "sweep" / "minilm-full-movie_sentiment"
    folder.mkdir(parents=True)
    for i, (lr, started) in enumerate([(3e-4, "2026-01-01T10:05:00"), (1e-4, "2026-01-01T10:00:00"),
                                       (2e-4, "2026-01-01T10:09:00")]):
        rec = record("sweep", "full", "movie_sentiment", 42, 0.75, lr=lr, objective=0.75)
        rec.pop("_stage")
        rec.update(run_id=f"z{9 - i}", started_at=started)
        (folder / f"{rec['run_id']}.json").write_text(json.dumps(rec), encoding="utf-8")
    profile = sweep.Profile(name="t", models=["minilm"], methods=["full"], tasks=["movie_sentiment"], seeds=[1],
                            sweep={"search": "lr_batch_cpu", "n_trials": 3, "seed": 34})
    driver = sweep.Driver(profile, layout, sweep.Options(quiet=True))
    driver.run = lambda *a, **k: 0  # the study's trials are the records above
    chosen = driver.sweep("minilm", "full", "movie_sentiment")
    records = sweep.load_records(layout.records)
    best = tables.best_trials(records)[("minilm", "full", "movie_sentiment")]
    assert chosen["lr"] == 1e-4 == runrecords.setting(best)[0]
    row = tables.table_best(records, tables.Paper.load(), tables.Analogue()).rows[0]
    assert "1.00e-04" in row and not {"2.00e-04", "3.00e-04"} & set(row), row
    history = tables.history_table(records).rows  # the best-trial history marks the same trial
    assert [r[4] for r in history if r[-1] == "best"] == ["1.00e-04"] and [r[3] for r in history] == ["1", "2", "3"]


@pytest.mark.slow
def test_a_fresh_clone_says_what_it_reuses_and_how_to_start_fresh(roots):
    shutil.copytree(ROOT / "results" / "smoke", roots / "results" / "smoke")
    env = {**os.environ, sweep.RESULTS_ENV: str(roots / "results"), sweep.WORK_ENV: str(roots / "outputs")}
    env.pop(sweep.STORAGE_ENV, None)
    proc = subprocess.run([sys.executable, "-m", "scripts.reproduce_glue", "--profile", "smoke"], capture_output=True,
                          text=True, cwd=ROOT, env=env, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    committed = len(list((ROOT / "results" / "smoke" / "records").rglob("*.json")))
    assert f"{committed} run record(s) reused from" in proc.stdout and "nothing left to run" in proc.stdout
    assert "make reproduce-glue PROFILE=smoke FRESH=1" in proc.stdout
    assert not (roots / "outputs" / "smoke" / "logs").exists()  # nothing was run


TINY = ["logger=none", "trainer=smoke", "trainer.max_steps=2", "trainer.eval_every=2", "trainer.timing_warmup_steps=1",
        "task.max_train_samples=32", "task.max_selection_samples=16", "task.max_report_samples=16",
        "task.max_length=16"]


@pytest.mark.slow
def test_two_drivers_of_one_profile_at_once_do_every_run_once(tmp_path, asset):
    """Two drivers of one profile started together on an empty results folder (as two `make
    reproduce-glue` would be): every trial, seed and kept-fraction run happens once, in a folder of its
    own, and the tables count the profile's seeds, not twice as many."""
    import threading

    import optuna

    asset("movie_reviews")
    profile = sweep.Profile(name="t", models=["tiny_bert"], methods=["sparsegrad"], tasks=["movie_sentiment"],
                            seeds=[1, 2], sweep={"search": "lr_batch_narrow", "n_trials": 2, "seed": 34},
                            overrides=TINY, method_overrides={"sparsegrad": ["method.basis_steps=1"]},
                            kept_fraction={"models": ["tiny_bert"], "tasks": ["movie_sentiment"],
                                                           "k": [0.25], "seeds": [1]})
    layout = sweep.Layout(results=tmp_path / "results", work=tmp_path / "work")
    drivers = [sweep.Driver(profile, layout, sweep.Options(quiet=True)) for _ in range(2)]
    errors: list[BaseException] = []

    def work(driver):
        try:
            driver.train()
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(d,)) for d in drivers]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=900)
    assert not errors and not any(d.failures for d in drivers), (errors, [d.failures for d in drivers])
    assert all(d.commands for d in drivers), "one driver did everything alone"
    records = sweep.load_records(layout.records)
    keys = Counter((r["_stage"], r["method"], r["seed"], (r["config"].get("method") or {}).get("k"),
                    runrecords.setting(r)) for r in records)
    assert len(records) == 2 + 2 + 1 and max(keys.values()) == 1, keys  # 2 trials, 2 seeds, 1 kept fraction
    assert len({p.parent for p in layout.work.rglob("record.json")}) == len(records)  # one folder per run
    for s in optuna.get_all_study_summaries(layout.storage()):
        assert s.n_trials == 2, (s.study_name, s.n_trials)
    cells = tables.cells(tables.final_runs(records))
    assert {k: len(c.scores) for k, c in cells.items()} == {("tiny_bert", "sparsegrad", "movie_sentiment"): 2}
