"""The run record's schema, validation and atomic writing."""

import copy
import json
import math

import pytest

from sparsegrad.suite.run import record as record_lib


def minimal_record(status="completed"):
    metrics = {"loss": 0.5, "accuracy": 0.75}
    return {
        "schema_version": record_lib.SCHEMA_VERSION, "run_id": "abc", "status": status, "error": None,
        "started_at": "2026-01-01T00:00:00+00:00", "finished_at": "2026-01-01T00:01:00+00:00", "wall_seconds": 60.0,
        "model": "tiny_bert", "method": "sparsegrad", "task": "sst2", "seed": 1, "output_dir": "/tmp/x", "config": {},
        "environment": {"git_commit": None, "git_dirty": None, "python": "3.11", "platform": "linux", "packages": {},
                        "device": "cpu", "device_type": "cpu", "torch_threads": 2, "cpu_count": 2},
        "parameters": {"total": 10, "trainable_dense": 5, "sparse_matrices": 2, "sparse_budget_per_matrix": 3,
                       "sparse_budget_total": 6, "updated_coordinates_union": 4, "optimizer_state_bytes": 80},
        "main_metric": {"name": "accuracy", "higher_is_better": True, "selection_split": "heldout",
                        "report_splits": ["validation"], "report_split": "validation"},
        "evaluations": [{"step": 2, "epoch": 0.5, "split": "heldout", "role": "selection", "checkpoint": "current",
                         "metrics": metrics}],
        "best": {"step": 2, "selection": metrics, "report": {"validation": metrics}, "score": 0.75},
        "final": {"step": 2, "selection": metrics, "report": {"validation": metrics}, "score": 0.75},
        "objective": 0.75,
        "training": {"optimizer_steps": 2, "epochs": 0.5, "samples": 16, "tokens": 100, "train_seconds": 1.0,
                     "eval_seconds": 0.5, "timed_steps": 1, "warmup_steps_excluded": 1, "steps_per_second": 2.0,
                     "samples_per_second": 16.0, "stop_reason": "max_steps reached", "last_loss": 0.4},
        "memory": {"device_type": "cpu", "how": "rss", "baseline_bytes": 1, "train_peak_bytes": 2, "eval_peak_bytes": 3},
        "basis": {"seconds": 0.1, "peak_bytes": 5, "batches": 8, "orientation": "hosvd"},
        "logger": None,
    }


def test_minimal_record_validates():
    assert record_lib.validate(minimal_record()) is not None


def test_every_problem_is_listed():
    bad = minimal_record()
    del bad["seed"]
    bad["status"] = "finished"
    bad["parameters"]["total"] = "10"
    bad["training"]["steps_per_second"] = True
    bad["evaluations"][0]["role"] = "dev"
    with pytest.raises(record_lib.RecordError) as info:
        record_lib.validate(bad)
    message = str(info.value)
    for fragment in ("seed: missing", "status: 'finished'", "parameters.total: expected int", "got bool",
                     "evaluations[0].role"):
        assert fragment in message


def test_completed_needs_best_but_interrupted_does_not():
    rec = minimal_record()
    rec["best"] = None
    with pytest.raises(record_lib.RecordError, match="completed run"):
        record_lib.validate(rec)
    rec["status"] = "interrupted"
    record_lib.validate(rec)


def test_write_is_atomic_json_with_nan_as_null(tmp_path):
    rec = minimal_record()
    rec["evaluations"][0]["metrics"]["pearson"] = math.nan
    path = record_lib.write(rec, tmp_path)
    assert path == tmp_path / "record.json"
    assert [p.name for p in tmp_path.iterdir()] == ["record.json"]  # no temporary file left behind
    data = json.loads(path.read_text())  # strict JSON
    assert data["evaluations"][0]["metrics"]["pearson"] is None
    assert record_lib.load(tmp_path)["run_id"] == "abc"
    assert record_lib.find_records(tmp_path.parent) and path in record_lib.find_records(tmp_path)


def test_failed_write_keeps_the_previous_record(tmp_path):
    record_lib.write(minimal_record(), tmp_path)
    broken = copy.deepcopy(minimal_record())
    broken["config"] = {"x": object()}  # not serialisable
    with pytest.raises(TypeError):
        record_lib.write(broken, tmp_path)
    assert record_lib.load(tmp_path)["status"] == "completed"
    assert [p.name for p in tmp_path.iterdir()] == ["record.json"]


def test_schema_documents_every_top_level_key():
    for key in record_lib.SCHEMA:
        assert f"``{key}``" in record_lib.__doc__
