"""A suite run with the top-k taken once per optimizer step: the run record names the mode."""

import pytest
from suite_fixtures import data_files_override


@pytest.mark.parametrize("method", ["sparsegrad", "meprop", "leading_block"])
def test_run_with_topk_at_step_records_the_mode(run_tiny, glue_files, method, tmp_path):
    record = run_tiny(["model=tiny_bert", f"method={method}", "task=sst2", "method.topk_at=step",
                       data_files_override(glue_files["sst2"])], out=tmp_path / "run")  # fmt: skip
    assert record["status"] == "completed", record["error"]
    assert record["config"]["method"]["topk_at"] == "step"
    params = record["parameters"]
    # 4 optimizer steps, exactly k = 384 coordinates selected per step and matrix
    assert 0 < params["updated_coordinates_union"] <= params["sparse_matrices"] * 4 * 384


def test_default_run_records_the_papers_mode(compose):
    assert compose(["model=tiny_bert", "method=sparsegrad", "task=sst2"]).method.topk_at == "backward"
