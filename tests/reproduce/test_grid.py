"""A stated learning-rate grid in place of an Optuna study."""

from __future__ import annotations

import pytest

from sparsegrad.suite.sweep import driver as sweep
from sparsegrad.suite.sweep import grid, progress, search
from tests.reproduce.fixture_records import record


def test_grid_values_per_method_with_a_default():
    s = {"grid": {"default": [3e-4, 1e-4], "lora": [1e-3], "minilm_mlp/full": [2e-3], "minilm_mlp": [5e-3]}}
    assert grid.grid_values(s, "minilm", "full") == [1e-4, 3e-4]
    assert grid.grid_values(s, "minilm", "lora") == [1e-3]
    assert grid.grid_values(s, "minilm_mlp", "full") == [2e-3]
    assert grid.grid_values(s, "minilm_mlp", "lora") == [5e-3]
    assert grid.grid_values({"grid": [1e-3, 1e-4]}, "m", "x") == [1e-4, 1e-3]


def test_best_of_the_grid_and_its_edge_flag():
    rs = [record("sweep", "full", "movie_sentiment", 42, 0.8, lr=lr, bs=16, objective=obj)
          for lr, obj in ((1e-4, 0.70), (3e-4, 0.78), (1e-3, 0.74))]
    rs.append(record("sweep", "full", "movie_sentiment", 42, 0.9, lr=3e-5, bs=16, objective=0.9))  # not in the grid
    rs.append(record("sweep", "full", "movie_sentiment", 42, 0.9, lr=3e-4, bs=8, objective=0.95))  # other batch
    mine = grid.grid_records(rs, "minilm", "full", "movie_sentiment", [1e-4, 3e-4, 1e-3], 16)
    assert len(mine) == 3
    b = grid.best(mine)
    assert b["config"]["trainer"]["lr"] == 3e-4
    assert search.edge_flag(b, search.tried(mine)[("minilm", "full", "movie_sentiment")]) == ""
    edge = grid.best(mine[:2])
    assert search.edge_flag(edge, search.tried(mine[:2])[("minilm", "full", "movie_sentiment")]) == "EDGE: lr highest tried"


def test_plan_counts_the_grid_values_left():
    profile = sweep.Profile(name="g", models=["minilm"], methods=["full"], tasks=["movie_sentiment"], seeds=[1, 2, 3],
                            sweep={"grid": [1e-4, 3e-4, 1e-3]})
    done = [record("sweep", "full", "movie_sentiment", 42, 0.8, lr=1e-4)]
    plan = progress.make_plan(profile, done)
    assert (plan.studies[0].sweep, plan.studies[0].seeds, plan.done) == (2, 3, 1)


@pytest.mark.slow
def test_driver_runs_only_the_missing_grid_values(tmp_path, asset):
    from tests.reproduce.test_sweep import TINY_OVERRIDES

    asset("movie_reviews")
    profile = sweep.Profile(name="g", models=["tiny_bert"], methods=["full"], tasks=["movie_sentiment"], seeds=[1],
                            sweep={"grid": [1e-4, 1e-3]}, overrides=TINY_OVERRIDES)
    layout = sweep.Layout(results=tmp_path / "results", work=tmp_path / "work")
    driver = sweep.Driver(profile, layout, sweep.Options(quiet=True))
    setting = driver.best_setting("tiny_bert", "full", "movie_sentiment")
    assert setting["batch_size"] == 16 and setting["lr"] in (1e-4, 1e-3)
    records = sweep.load_records(layout.records)
    assert sorted(r["config"]["trainer"]["lr"] for r in records) == [1e-4, 1e-3]
    profile.sweep = {"grid": [1e-4, 1e-3, 1e-2]}  # one more value: only it runs
    driver.best_setting("tiny_bert", "full", "movie_sentiment")
    assert len(driver.commands) == 2 and "trainer.lr=0.01" in driver.commands[1]
    assert len(sweep.load_records(layout.records)) == 3
