"""End-to-end runs on tiny random models and fixture files: every method, every GLUE schema, oasst1."""

import json
import math

import pytest
from suite_fixtures import data_files_override

from sparsegrad.suite.errors import IncompatibleTaskError
from sparsegrad.suite.run import record as record_lib

METHODS = ["full", "lora", "meprop", "meprop_output", "sparsegrad", "sparsegrad_official", "leading_block", "shira"]
SPARSE = {"meprop", "sparsegrad", "sparsegrad_official", "leading_block", "shira"}
BASIS = {"sparsegrad", "sparsegrad_official", "leading_block"}


def _assert_completed(record, method):
    assert record["status"] == "completed", record["error"]
    record_lib.validate(record)
    assert record["best"]["score"] is not None or record["task"] == "stsb"
    assert record["training"]["optimizer_steps"] == 4
    assert record["training"]["steps_per_second"] > 0
    memory = record["memory"]
    assert memory["gauge"] == "live_tensor_bytes" and memory["train_peak_bytes"] > memory["baseline_bytes"] > 0
    assert memory["rss"]["train_peak_bytes"] > memory["train_peak_bytes"]  # the process holds far more than tensors
    assert record["examples"]["n"] == len(record["examples"]["tokens" if record["task"] == "oasst1" else "labels"])
    params = record["parameters"]
    if method in SPARSE:
        assert params["sparse_matrices"] > 0 and params["sparse_budget_per_matrix"] == 384
        assert 0 < params["updated_coordinates_union"] <= params["sparse_matrices"] * 32 * 64
    if method in BASIS:
        assert record["basis"]["seconds"] > 0 and record["basis"]["batches"] > 0
        assert record["basis"]["peak_bytes"] == memory["basis_peak_bytes"] > memory["baseline_bytes"] * 0.5
    else:
        assert record["basis"] is None


@pytest.mark.parametrize("method", METHODS)
def test_each_method_on_sst2_fixture(run_tiny, glue_files, method, tmp_path):
    record = run_tiny(["model=tiny_bert", f"method={method}", "task=sst2", data_files_override(glue_files["sst2"])],
                      out=tmp_path / "run")
    _assert_completed(record, method)
    assert record["main_metric"] == {"name": "accuracy", "higher_is_better": True, "selection_split": "heldout",
                                     "report_splits": ["validation"], "report_split": "validation"}
    assert (tmp_path / "run" / "record.json").exists() and (tmp_path / "run" / "config.yaml").exists()
    assert record_lib.load(tmp_path / "run")["run_id"] == record["run_id"]


@pytest.mark.parametrize("method", METHODS)
def test_each_method_on_oasst1_fixture(run_tiny, oasst1_files, method):
    record = run_tiny(["model=tiny_llama", f"method={method}", "task=oasst1", "task.max_length=64",
                       data_files_override(oasst1_files)])
    _assert_completed(record, method)
    best = record["best"]["report"]["validation"]
    assert record["main_metric"]["name"] == "loss" and not record["main_metric"]["higher_is_better"]
    assert best["perplexity"] == pytest.approx(math.exp(best["loss"]), rel=1e-6)
    if method in SPARSE:  # every third block of three: only block 0's up and down projections
        assert record["parameters"]["sparse_matrices"] == 2


# Each GLUE schema once, with the models and methods rotated so every pair of them is exercised.
GLUE_CASES = [
    ("cola", "tiny_bert", "sparsegrad"),
    ("mrpc", "tiny_roberta", "lora"),
    ("stsb", "tiny_bert", "meprop"),
    ("qqp", "tiny_roberta", "full"),
    ("mnli", "tiny_bert", "sparsegrad_official"),
    ("qnli", "tiny_roberta", "meprop_output"),
    ("rte", "tiny_bert", "full"),
    ("wnli", "tiny_roberta", "sparsegrad"),
    ("stsb", "tiny_roberta", "sparsegrad"),
]


@pytest.mark.parametrize("task,model,method", GLUE_CASES)
def test_each_glue_schema(run_tiny, glue_files, task, model, method):
    record = run_tiny([f"model={model}", f"method={method}", f"task={task}", data_files_override(glue_files[task])])
    _assert_completed(record, method)
    report = record["best"]["report"]
    metric_names = {"cola": {"matthews_correlation", "accuracy"}, "stsb": {"pearson", "spearmanr"},
                    "mrpc": {"accuracy", "f1"}, "qqp": {"accuracy", "f1"}}.get(task, {"accuracy"})
    for split_metrics in report.values():
        assert set(split_metrics) == metric_names | {"loss"}
    if task == "mnli":
        assert set(report) == {"validation_matched", "validation_mismatched"}
        assert record["main_metric"]["report_split"] == "validation_matched"


def test_official_protocol_selects_and_reports_on_dev(run_tiny, glue_files):
    record = run_tiny(["model=tiny_bert", "method=full", "task=rte", "trainer.protocol=official",
                       "trainer.objective=report", data_files_override(glue_files["rte"])])
    assert record["main_metric"]["selection_split"] == "validation"
    selection = [e for e in record["evaluations"] if e["role"] == "selection"]
    best = max(selection, key=lambda e: (e["metrics"]["accuracy"], -e["step"]))
    assert record["best"]["step"] == best["step"]
    assert record["objective"] == record["best"]["score"] == record["best"]["report"]["validation"]["accuracy"]


def test_same_seed_gives_identical_metrics(run_tiny, glue_files, tmp_path):
    overrides = ["model=tiny_bert", "method=sparsegrad", "task=mrpc", "trainer.lr=3e-3",
                 data_files_override(glue_files["mrpc"])]
    a = run_tiny(overrides, out=tmp_path / "a")
    b = run_tiny(overrides, out=tmp_path / "b")
    c = run_tiny([*overrides, "seed=7"], out=tmp_path / "c")
    assert [e["metrics"] for e in a["evaluations"]] == [e["metrics"] for e in b["evaluations"]]
    assert a["training"]["last_loss"] == b["training"]["last_loss"]
    assert a["training"]["last_loss"] != c["training"]["last_loss"]


def test_gradient_accumulation_counts_micro_batches(run_tiny, glue_files):
    record = run_tiny(["model=tiny_bert", "method=sparsegrad", "task=sst2", "trainer.grad_accum=2",
                       data_files_override(glue_files["sst2"])])
    assert record["status"] == "completed"
    # 43 training examples in micro-batches of 8: 8+8 | 8+8 | 8+3 -> 3 optimizer steps, one epoch
    assert record["training"]["optimizer_steps"] == 3 and record["training"]["samples"] == 43


@pytest.mark.parametrize("method", METHODS)
def test_bf16_autocast(run_tiny, glue_files, method):
    record = run_tiny(["model=tiny_bert", f"method={method}", "task=sst2", "trainer.precision=bf16",
                       data_files_override(glue_files["sst2"])])
    assert record["status"] == "completed"


def test_early_stopping_restores_the_best_checkpoint(run_tiny, glue_files):
    record = run_tiny(["model=tiny_bert", "method=full", "task=sst2", "trainer.max_steps=30", "trainer.eval_every=1",
                       "trainer.patience=2", "trainer.lr=1e-6", "trainer.objective=report",
                       data_files_override(glue_files["sst2"])])
    assert record["training"]["stop_reason"].startswith("early stopping")
    assert record["training"]["optimizer_steps"] < 30
    selection = [e for e in record["evaluations"] if e["role"] == "selection"]
    assert record["best"]["selection"] == next(e["metrics"] for e in selection if e["step"] == record["best"]["step"])


def test_divergence_stops_the_run(run_tiny, glue_files):
    record = run_tiny(["model=tiny_bert", "method=full", "task=stsb", "trainer.lr=1e30", "trainer.max_grad_norm=null",
                       "trainer.max_steps=20", data_files_override(glue_files["stsb"])])
    assert record["status"] == "diverged"
    assert "non-finite loss" in record["error"] and record["objective"] is None
    record_lib.validate(record)


def test_ctrl_c_writes_an_interrupted_record(run_tiny, glue_files, monkeypatch, tmp_path):
    from sparsegrad.suite.run import trainer

    calls = {"n": 0}
    original = trainer.evaluate

    def interrupt_second_time(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return original(*args, **kwargs)

    monkeypatch.setattr(trainer, "evaluate", interrupt_second_time)
    record = run_tiny(["model=tiny_bert", "method=lora", "task=sst2", data_files_override(glue_files["sst2"])],
                      out=tmp_path / "run")
    assert record["status"] == "interrupted" and record["training"]["optimizer_steps"] == 4
    on_disk = json.loads((tmp_path / "run" / "record.json").read_text())
    assert on_disk["status"] == "interrupted" and len(on_disk["evaluations"]) == 1


def test_causal_lm_on_classification_is_refused(run_tiny, glue_files, tmp_path):
    with pytest.raises(IncompatibleTaskError, match="causal language model"):
        run_tiny(["model=tiny_llama", "method=full", "task=sst2", data_files_override(glue_files["sst2"])],
                 out=tmp_path / "run")
    assert record_lib.load(tmp_path / "run")["status"] == "failed"


def test_wandb_offline_files_appear(run_tiny, glue_files, tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.delenv("WANDB_MODE", raising=False)
    record = run_tiny(["model=tiny_bert", "method=full", "task=sst2", "logger=wandb", "logger.mode=offline",
                       data_files_override(glue_files["sst2"])], out=tmp_path / "run")
    assert record["logger"]["mode"] == "offline"
    runs = list((tmp_path / "run" / "wandb").glob("offline-run-*"))
    assert runs and list(runs[0].glob("run-*.wandb"))


def test_save_model_writes_a_plain_merged_model(run_tiny, glue_files, tmp_path):
    from transformers import AutoModelForSequenceClassification

    record = run_tiny(["model=tiny_bert", "method=sparsegrad", "task=sst2", "save_model=true",
                       data_files_override(glue_files["sst2"])], out=tmp_path / "run")
    assert record["status"] == "completed"
    model = AutoModelForSequenceClassification.from_pretrained(tmp_path / "run" / "model")
    assert type(model.bert.encoder.layer[0].intermediate.dense).__name__ == "Linear"


def test_config_error_fails_before_the_run_and_a_data_error_still_writes_a_failed_record(run_tiny, glue_files,
                                                                                          tmp_path):
    """A config problem is found before anything runs (no run folder); a problem found while running (a label
    that does not fit the head) still leaves a failed record."""
    from suite_fixtures import glue_rows, write_csv

    from sparsegrad.suite.errors import ConfigError, DataError

    with pytest.raises(ConfigError, match="contradicts"):
        run_tiny(["model=tiny_bert", "method=full", "task=sst2", "task.direction=minimize",
                  data_files_override(glue_files["sst2"])], out=tmp_path / "run")
    assert not (tmp_path / "run").exists()
    rows = glue_rows("sst2", 24, seed=5)
    rows[3]["label"] = 7
    bad = {"train": str(write_csv(tmp_path / "train.csv", rows)), "validation": glue_files["sst2"]["validation"]}
    with pytest.raises(DataError, match="label 7 does not fit"):
        run_tiny(["model=tiny_bert", "method=full", "task=sst2", data_files_override(bad)], out=tmp_path / "run2")
    failed = record_lib.load(tmp_path / "run2")
    assert failed["status"] == "failed" and "label 7 does not fit" in failed["error"]
