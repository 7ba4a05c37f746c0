"""Task loading from GLUE- and oasst1-format local files, label checks and the split protocol."""

import pytest
from suite_fixtures import GLUE_SCHEMAS, glue_rows, oasst1_rows, write_csv

from sparsegrad.suite.errors import ConfigError, DataError
from sparsegrad.suite.run import tasks


@pytest.mark.parametrize("name", list(GLUE_SCHEMAS))
def test_glue_fixture_loads_with_exact_columns(name, glue_files):
    spec = tasks.get_task(name)
    raw = tasks.load_raw_splits(spec, tasks.TaskSettings(name=name, data_files=glue_files[name]))
    assert set(raw) == {"train", *spec.dev_splits}
    example = raw["train"][0]
    assert len(example["texts"]) == 2
    assert (example["texts"][1] is None) == (len(spec.text_fields) == 1)
    if name == "stsb":
        assert isinstance(example["label"], float) and spec.num_labels == 1
    else:
        assert isinstance(example["label"], int) and 0 <= example["label"] < spec.num_labels


def test_mnli_reports_matched_and_mismatched(glue_files):
    spec = tasks.get_task("mnli")
    settings = tasks.TaskSettings(name="mnli", data_files=glue_files["mnli"])
    raw = tasks.load_raw_splits(spec, settings)
    heldout = tasks.arrange_splits(spec, settings, raw, "heldout", heldout_fraction=0.25)
    assert heldout.selection_name == "heldout" and len(heldout.selection) == 12
    assert len(heldout.train) == 36
    assert list(heldout.report) == ["validation_matched", "validation_mismatched"]
    official = tasks.arrange_splits(spec, settings, raw, "official")
    assert official.selection_name == "validation_matched" and len(official.train) == 48


def test_regression_labels_on_a_classification_task_are_rejected(tmp_path):
    rows = glue_rows("stsb", 8, 0)  # float labels 0..5
    path = write_csv(tmp_path / "train.csv", [{"sentence": r["sentence1"], "label": r["label"]} for r in rows])
    spec = tasks.get_task("cola")
    with pytest.raises(DataError, match="regression"):
        tasks.load_raw_splits(spec, tasks.TaskSettings(name="cola", data_files={"train": str(path)}))


def test_missing_column_names_glue_schema(tmp_path):
    path = write_csv(tmp_path / "train.csv", [{"text": "a", "label": 1}])
    with pytest.raises(DataError, match="sentence1, sentence2, label"):
        tasks.load_raw_splits(tasks.get_task("rte"), tasks.TaskSettings(name="rte", data_files={"train": str(path)}))


def test_hidden_test_labels_and_out_of_range_labels():
    spec = tasks.get_task("sst2")
    with pytest.raises(DataError, match="hidden test label"):
        tasks.check_label(spec, -1, "x")
    with pytest.raises(DataError, match="2-class head"):
        tasks.check_label(spec, 2, "x")
    assert tasks.check_label(spec, 1.0, "x") == 1


def test_unknown_task_and_main_metric_direction():
    with pytest.raises(ConfigError, match="Valid tasks: cola"):
        tasks.get_task("imdb")
    spec = tasks.get_task("mrpc")
    assert tasks.main_metric(spec, tasks.TaskSettings(name="mrpc")) == ("accuracy", True)
    assert tasks.main_metric(spec, tasks.TaskSettings(name="mrpc", main_metric="f1")) == ("f1", True)
    with pytest.raises(ConfigError, match="contradicts"):
        tasks.main_metric(spec, tasks.TaskSettings(name="mrpc", direction="minimize"))
    assert tasks.main_metric(tasks.get_task("oasst1"), tasks.TaskSettings(name="oasst1")) == ("loss", False)


def test_oasst1_threads_root_to_leaf():
    rows = oasst1_rows(2, 0, "t")
    threads = tasks.oasst1_threads(rows)
    # each tree: root -> a0 -> p0 -> q0 (4 messages) and root -> a1 (2 messages)
    assert sorted(len(t["messages"]) for t in threads) == [2, 2, 4, 4]
    for t in threads:
        roles = [m["role"] for m in t["messages"]]
        assert roles == ["user", "assistant"] * (len(roles) // 2)
    assert tasks.oasst1_threads(rows, languages=["de"]) == []


def test_oasst1_fixture_loads(oasst1_files):
    spec = tasks.get_task("oasst1")
    raw = tasks.load_raw_splits(spec, tasks.TaskSettings(name="oasst1", data_files=oasst1_files))
    assert len(raw["train"]) == 60 and len(raw["validation"]) == 8


def test_missing_data_file_is_named(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        tasks.load_raw_splits(tasks.get_task("sst2"),
                              tasks.TaskSettings(name="sst2", data_files={"train": str(tmp_path / "nope.csv")}))


def test_hub_unreachable_names_offline_alternatives(monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from sparsegrad.suite.errors import HubUnreachableError

    with pytest.raises(HubUnreachableError, match="task=movie_sentiment.*data_files"):
        tasks.load_raw_splits(tasks.get_task("rte"), tasks.TaskSettings(name="rte"))


def test_caps_are_deterministic():
    items = list(range(100))
    assert tasks._cap(items, 10, 0) == tasks._cap(items, 10, 0)
    assert len(tasks._cap(items, 10, 0)) == 10 and tasks._cap(items, None, 0) == items
