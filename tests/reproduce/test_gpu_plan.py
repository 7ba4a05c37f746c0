"""Plans without a measured speed (GPU-hours from the task sizes and the paper's steps/s), and plans for SLURM
(runs, trials in flight, run time in all; no wall time from this machine's cores)."""

from __future__ import annotations

import math

import pytest

from sparsegrad.suite.sweep import paper_speed, progress, studies
from sparsegrad.suite.sweep.profiles import load_profile

GLUE = ("stsb", "cola", "mnli", "mrpc", "qnli", "qqp", "rte", "sst2")


def test_one_bert_base_mnli_run_at_the_papers_protocol_is_about_17_gpu_hours():
    run = paper_speed.estimate("bert_base", "full", "mnli", paper_speed.trainer_config(["trainer=paper"], "mnli"))
    assert run.steps == 20 * math.ceil(392_702 / 32) == 245_440
    assert run.steps_per_second == 4.2  # Table 7, regular fine-tuning on MNLI
    assert run.evaluations == 245_440 // 5000  # the authors' interval for MNLI (conf/task/mnli.yaml)
    assert 16.0 < run.seconds / 3600 < 17.5  # 245,440 / 4.2 s = 16.2 h of training, 0.3 h of evaluation


def test_the_paper_speed_of_each_method_and_model():
    trainer = paper_speed.trainer_config(["trainer=paper"], "qnli")
    full = paper_speed.estimate("roberta_base", "full", "qnli", trainer)
    assert paper_speed.estimate("roberta_base", "meprop_adamw", "qnli", trainer).seconds == full.seconds  # untimed
    assert paper_speed.estimate("roberta_base", "sparsegrad", "qnli", trainer).steps_per_second == 3.5  # SD row
    assert paper_speed.estimate("roberta_base", "lora_authors", "qnli", trainer).steps_per_second == 3.4
    large = paper_speed.estimate("roberta_large", "full", "qnli", trainer)
    assert large.seconds == pytest.approx(full.seconds * 24 * 1024**2 / (12 * 768**2))
    assert paper_speed.estimate("bert_base", "full", "qnli", paper_speed.trainer_config(["trainer=paper",
                                "trainer.max_steps=100"], "qnli")).steps == 100
    assert paper_speed.estimate("tiny_bert", "full", "qnli", trainer) is None  # no paper speed for it
    assert paper_speed.estimate("bert_base", "full", "movie_sentiment", trainer) is None  # no published size


def test_the_paper_profile_is_planned_in_gpu_hours_per_study_and_in_total():
    prof = load_profile("paper")
    plan = progress.make_plan(prof, [], jobs=1, gpus=0)
    assert all(s.gpu for s in plan.studies) and plan.runs == 1682
    mnli = next(s for s in plan.studies if (s.model, s.method, s.task) == ("bert_base", "full", "mnli"))
    assert (mnli.sweep, mnli.seeds, mnli.kept) == (20, 3, 0)
    assert plan.gpu_hours == pytest.approx(sum(s.runs * s.seconds_per_run for s in plan.studies) / 3600)
    assert plan.gpu_hours > 5000  # thousands of GPU-hours, not the 37 h of an 80 s guess per run
    text = plan.describe()
    assert f"{plan.gpu_hours:,.0f} GPU-hours of training in all; this machine has no GPU" in text
    assert "mnli 23 x 16.6 h" in text  # per study: 20 trials + 3 seeds at 16.6 GPU-h each
    assert "early stopping (patience 5) may end a run" in text
    assert "PROFILE=paper_best runs the paper's best settings (192 runs," in text
    assert "LAUNCHER=slurm JOBS=8" in text and "Many workers, one study" in text
    on_eight = progress.make_plan(prof, [], jobs=8, gpus=8)  # one run per GPU
    assert on_eight.seconds == pytest.approx(plan.seconds / 8)
    assert "on this machine's 8 GPU(s), one run per GPU" in on_eight.describe()


def test_paper_best_plans_each_setting_at_its_own_batch_size():
    plan = progress.make_plan(load_profile("paper_best"), [], gpus=0)
    qnli = next(s for s in plan.studies if (s.model, s.method, s.task) == ("bert_base", "sparsegrad", "qnli"))
    at_16 = paper_speed.estimate("bert_base", "sparsegrad", "qnli",
                                 paper_speed.trainer_config(["trainer=paper"], "qnli"), batch_size=16)  # Table 13
    assert qnli.seconds_per_run == at_16.seconds and plan.runs == 192


def test_a_cluster_plan_gives_runs_trials_in_flight_and_no_local_eta():
    plan = progress.make_plan(load_profile("paper"), [], jobs=8, launcher="slurm", in_flight=5)
    text = plan.describe()
    assert "submitted to SLURM 8 at a time by this driver; 5 trial(s) of these studies running now" in text
    assert "GPU-hours of training in all; the wall time depends on the queue" in text
    assert "cores" not in text.splitlines()[0] and "expected" not in text
    assert "LAUNCHER=slurm" not in text  # already on the cluster
    smoke = progress.make_plan(load_profile("smoke"), [], jobs=2, launcher="slurm", in_flight=0).describe()
    assert "submitted to SLURM 2 at a time" in smoke and "of runs in all" in smoke and "expected" not in smoke


def test_trials_in_flight_are_counted_from_the_shared_storage(tmp_path):
    import optuna

    url = f"sqlite:///{tmp_path / 'optuna.db'}"
    assert studies.running_trials(url, ["a"]) == 0 and not (tmp_path / "optuna.db").exists()  # nothing created
    storage = studies.open_storage(url)
    for name, running in (("a", 2), ("b", 1)):
        study = optuna.create_study(study_name=name, storage=storage)
        for _ in range(running):
            study.ask()
        study.tell(study.ask(), 1.0)
    assert studies.running_trials(url, ["a", "missing"]) == 2
    assert studies.running_trials(url, ["a", "b"]) == 3
