"""The plan a profile prints before it starts, and the progress bar with an ETA over its runs."""

from __future__ import annotations

import io
import math
import subprocess
import sys
import textwrap

from sparsegrad.suite.sweep import driver as sweep
from sparsegrad.suite.sweep import progress
from tests.reproduce.fixture_records import record

PLAN_SECTION = {"steps_per_second": {"full": 2.0, "sparsegrad": 1.0}, "steps_per_run": 100, "overhead_seconds": 10,
                "measured": "2 CPU cores, load 2"}


def fixture_profile(**kw) -> sweep.Profile:
    return sweep.Profile(name="fixture", models=["minilm"], methods=["full", "sparsegrad"], tasks=["movie_sentiment"],
                         seeds=[1, 2], sweep={"search": "lr_batch_cpu", "n_trials": 3, "seed": 34},
                         plan=PLAN_SECTION, **kw)


def test_plan_counts_the_remaining_runs_and_their_duration():
    done = [record("sweep", "full", "movie_sentiment", 42, 0.8), record("seeds", "full", "movie_sentiment", 1, 0.8)]
    for r in done:
        r["training"].update(optimizer_steps=0)  # no usable speed: the profile's plan section is used
    plan = progress.make_plan(fixture_profile(), done, jobs=2)
    # full: 2 trials + 1 seed left at 10 + 100/2 = 60 s; sparsegrad: 3 + 2 at 10 + 100/1 = 110 s; 2 at a time
    assert plan.runs == 8 and plan.done == 2
    assert plan.seconds == (3 * 60 + 5 * 110) / 2
    text = plan.describe()
    assert text.startswith("plan: 8 runs to do (5 sweep trials, 3 seed re-runs, 0 kept-fraction runs; 2 already in "
                           "the records), 2 at a time; expected 6 min")
    assert "minilm / sparsegrad: 5 runs x ~110 s (profile plan section)" in text
    assert "speeds measured: 2 CPU cores, load 2" in text


def test_plan_counts_no_more_runs_at_once_than_the_cores_carry():
    # 3 one-thread runs at a time on 2 cores: the plan section's speeds (a run alone) are shared by 2 slots
    prof = fixture_profile(overrides=["trainer.threads=1"])
    plan = progress.make_plan(prof, [], jobs=3, cores=2)
    assert plan.parallel == 2 and plan.seconds == (5 * 60 + 5 * 110) / 2
    assert "3 at a time on 2 cores; expected" in plan.describe()
    # two threads per run on 2 cores: one run at a time, however many are launched
    assert progress.make_plan(fixture_profile(overrides=["trainer.threads=2"]), [], jobs=3, cores=2).parallel == 1
    # speeds measured in the profile's own records already include the sharing: divided by the jobs
    r = record("seeds", "full", "movie_sentiment", 1, 0.8)
    r["training"].update(optimizer_steps=200, steps_per_second=4.0)
    r["wall_seconds"] = 90.0
    plan = progress.make_plan(prof, [r], jobs=3, cores=2)
    assert plan.seconds == (4 * 90) / 3 + (5 * 110) / 2


def test_plan_prefers_speed_measured_in_the_profiles_own_records():
    r = record("seeds", "full", "movie_sentiment", 1, 0.8)
    r["training"].update(optimizer_steps=200, steps_per_second=4.0)
    r["wall_seconds"] = 70.0  # 50 s of training + 20 s overhead
    plan = progress.make_plan(fixture_profile(), [r])
    full = next(s for s in plan.studies if s.method == "full")
    assert full.seconds_per_run == 70.0 and full.source == "measured in 1 run records"
    assert progress.describe_budget(plan, 1) is not None and progress.describe_budget(plan, 600) is None


def test_progress_bar_counts_records_and_shows_an_eta(tmp_path):
    plan = progress.Plan("fixture", [progress.PlannedStudy("m", "full", "t", 3, 0, 0, 20.0, "x")], jobs=1)
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "record.json").write_text("{}")  # from before: not counted
    out = io.StringIO()
    bar = progress.RunProgress(plan, tmp_path, file=out, poll_seconds=0.05)
    assert 59.0 < bar.eta_seconds() <= 60.0  # the plan's estimate, less the time elapsed, until a run finishes
    script = textwrap.dedent(f"""
        import pathlib, time
        for i in range(3):
            d = pathlib.Path({str(tmp_path)!r}) / f"run{{i}}"
            d.mkdir()
            (d / "record.json").write_text("{{}}")
            time.sleep(0.2)
    """)
    proc = subprocess.Popen([sys.executable, "-c", script])
    assert bar.wait(proc) == 0
    bar.close()
    assert bar.bar.n == 3
    text = out.getvalue()
    assert "fixture: 0/3 runs" in text and "ETA 60 s" in text
    assert "3/3 runs" in text and "done" in text


def test_eta_waits_for_a_first_batch_of_runs_before_it_trusts_the_pace(tmp_path):
    # 3 runs at a time: the first of a batch to finish says nothing of the pace of the other 2
    plan = progress.Plan("fixture", [progress.PlannedStudy("m", "full", "t", 12, 0, 0, 30.0, "x")], jobs=3)
    bar = progress.RunProgress(plan, tmp_path, file=io.StringIO())
    bar.started -= 25.0  # 25 s in, one run of the first batch finished
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "record.json").write_text("{}")
    bar.poll()
    assert 94.0 < bar.eta_seconds() <= 95.0  # the plan's 120 s less 25 s, not 25 s x 11 runs
    for name in "bc":
        (tmp_path / name).mkdir()
        (tmp_path / name / "record.json").write_text("{}")
    bar.poll()
    assert 74.0 < bar.eta_seconds() <= 76.0  # now the pace: ~25 s / 3 runs x 9 runs left
    bar.close()


def test_eta_past_the_plan(tmp_path):
    plan = progress.Plan("fixture", [progress.PlannedStudy("m", "full", "t", 4, 0, 0, 30.0, "x")], jobs=2)
    out = io.StringIO()
    bar = progress.RunProgress(plan, tmp_path, file=out)
    bar.started -= 100.0  # the plan said 60 s; nothing has finished
    bar.poll()
    assert math.isnan(bar.eta_seconds()) and "ETA unknown (past the plan)" in out.getvalue()
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "record.json").write_text("{}")
    bar.poll()
    assert 299.0 < bar.eta_seconds() <= 301.0  # one run in 100 s: the pace, 3 runs left
    bar.close()
