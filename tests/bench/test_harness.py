"""The benchmark harness: run order, ratios, target checks, cost model, a 1-step worker run per method."""

from __future__ import annotations

import json

import pytest

from benchmarks import cli, costs, grid, precision
from benchmarks.machine import machine_info
from benchmarks.measure import MB
from benchmarks.methods import METHODS
from benchmarks.report import basis_sweep_markdown, to_markdown
from benchmarks.runner import run_worker
from benchmarks.shapes import MOVIE_LENGTHS, make_batches, movie_lengths
from benchmarks.summary import summarize
from benchmarks.worker import Spec, run


def _record(shape, method, steps_per_s, peak_mb, opt_mb=1.0, repeat=0, basis=None):
    mb = MB
    return {
        "shape": shape, "method": method, "repeat": repeat, "steps_per_s": steps_per_s,
        "peak_above_loaded_bytes": peak_mb * mb, "peak_train_bytes": peak_mb * mb + 100 * mb,
        "optimizer_state_bytes": opt_mb * mb, "method_buffer_bytes": 0, "trainable_params": 10,
        "model_params": 100, "tokens_per_batch": [10, 20], "padded_tokens_per_batch": 64,
        "model_source": "random", "model_layers": 2, "k": 0.01, "basis": basis,
        "cpu_s_per_step": 2.0 / steps_per_s,
    }  # fmt: skip


def test_plan_alternates_methods_across_repeats():
    preset = grid.Preset(shapes=[grid.Shape("minilm", 16, 128, "movie", methods=["full", "lora"])],
                         steps=1, warmup=1, repeats=2, budget_min=1)  # fmt: skip
    order = [m for _, _, m in grid.plan(preset)]
    assert order == ["full", "lora", "full", "lora"]


def test_summary_ratios_and_targets():
    basis = {"loaded_from_cache": False, "seconds": 10.0, "extra_peak_bytes": 400 * MB}
    recs = [
        _record("s", "full", 1.0, 1000, opt_mb=800), _record("s", "full", 3.0, 1000, opt_mb=800, repeat=1),
        _record("s", "lora", 2.0, 500, opt_mb=400),
        _record("s", "sparsegrad", 1.0, 520, opt_mb=400, basis=basis),
        _record("s", "sparsegrad_regular", 0.2, 600),
        _record("s", "leading_block", 4.0, 500),
    ]  # fmt: skip
    summary = summarize(recs, "cpu")["s"]
    rows = summary["methods"]
    assert rows["full"]["steps_per_s"] == pytest.approx(2.0)  # median of the repeats
    sg = rows["sparsegrad"]
    assert sg["step_time_vs_full"] == pytest.approx(2.0)
    assert sg["step_time_vs_lora"] == pytest.approx(2.0)
    assert sg["peak_vs_lora"] == pytest.approx(520 / 500)
    assert sg["peak_vs_full"] == pytest.approx(0.52)
    assert sg["optimizer_state_vs_full"] == pytest.approx(0.5)
    t = summary["targets"]["sparsegrad"]
    assert t["step_time_vs_lora"]["met"] is False and t["peak_vs_lora"]["met"] is True
    assert t["peak_vs_full"]["met"] is True and t["basis_seconds"]["met"] is True
    assert t["basis_extra_mb"]["met"] is False
    assert t["sd_speedup_vs_regular"]["value"] == pytest.approx(5.0) and t["sd_speedup_vs_regular"]["met"]
    lb = summary["targets"]["leading_block"]
    assert lb["step_time_vs_lora"]["met"] and lb["step_time_vs_full"]["met"]
    assert sg["cpu_time_vs_lora"] == pytest.approx(2.0) and t["cpu_time_vs_full"]["met"] is False
    # GPU figures use the allocator peak (model included)
    gpu = summarize(recs, "cuda")["s"]["methods"]
    assert gpu["lora"]["peak_mb"] == pytest.approx(600)


def test_failed_runs_are_reported_not_ratioed():
    recs = [_record("s", "full", 1.0, 100), {"shape": "s", "method": "lora", "repeat": 0, "error": "boom"}]
    summary = summarize(recs, "cpu")["s"]["methods"]
    assert summary["lora"]["error"] == "boom" and summary["full"]["step_time_vs_lora"] is None


def test_cost_model_matches_the_formulas():
    rows = costs.macs_table("bert-base", None, tokens=2048, rows_nonzero=2048, block_factor=1.0)
    up = next(r for r in rows if r["group"] == "up")
    assert (up["in"], up["out"]) == (768, 3072) and up["matrices"] == 12
    assert up["full"] == 3 * 2048 * 768 * 3072
    assert up["rotation_per_token"] == 2048 * (768**2 + 3072**2)
    assert up["rotation_once"] == 3072 * 768 * (768 + 3072)
    llama = costs.mlp_shapes("llama2-7b", 4)
    assert llama["up"] == (4096, 11008) and llama["matrices_per_group"] == 2  # blocks 0 and 3


def test_movie_lengths_follow_the_stored_distribution():
    lengths = movie_lengths(2000, 128, seed=0)
    assert min(lengths) >= min(MOVIE_LENGTHS) and max(lengths) <= 128
    assert 22 < sum(lengths) / len(lengths) < 32  # the sentences average ~27 tokens
    assert max(movie_lengths(100, 16, seed=0)) == 16


def test_batches_pad_and_trim():
    from transformers import BertConfig

    spec = Spec(model="tiny-bert", batch=4, seq=64, padding="movie")
    padded = make_batches(spec, BertConfig(vocab_size=1000), 2, seed=0)
    assert padded[0]["input_ids"].shape == (4, 64) and int(padded[0]["attention_mask"].sum()) < 4 * 64
    trimmed = make_batches(spec, BertConfig(vocab_size=1000), 2, seed=0, trim=True)
    assert trimmed[0]["input_ids"].shape[1] == int(trimmed[0]["attention_mask"].sum(1).max())


@pytest.mark.parametrize("method", METHODS)
def test_one_step_worker_run_every_method(method, tmp_path):
    spec = Spec(model="tiny-bert", batch=4, seq=16, method=method, steps=1, warmup=1, threads=1,
                basis_steps=2, basis_cache=str(tmp_path / "basis.pt"))  # fmt: skip
    result = run(spec)
    assert result["steps_per_s"] > 0 and len(result["step_seconds"]) == 1
    assert result["optimizer_state_bytes"] > 0 and result["peak_train_bytes"] > 0
    # live tensor bytes, as the training runs gauge them: above the loaded model at least the optimizer state
    assert result["memory_gauge"] == "live_tensor_bytes"
    assert result["peak_above_loaded_bytes"] >= result["optimizer_state_bytes"]
    assert result["rss_peak_train_bytes"] > result["peak_train_bytes"]
    if method in ("sparsegrad", "sparsegrad_regular", "leading_block"):
        assert result["basis"]["loaded_from_cache"] is False and result["basis"]["seconds"] > 0
        assert result["basis"]["gauged"] and result["basis"]["extra_peak_bytes"] > 0
        assert result["method_buffer_bytes"] > 0
    json.dumps(result)


def test_basis_only_runs_and_their_table():
    rows = []
    for micro in (None, 2):
        spec = Spec(model="tiny-bert", batch=4, seq=16, method="sparsegrad", threads=1, basis_steps=2,
                    basis_micro_batch=micro, basis_only=True)  # fmt: skip
        result = run(spec)
        assert "steps_per_s" not in result  # no training
        assert result["basis"]["micro_batch"] == micro and result["basis"]["seconds"] > 0
        rows.append({**result, "shape": "tiny", "load": (0.5, 0, 0), "memory_run": result["basis"]})
    md = "\n".join(basis_sweep_markdown(rows, "cpu"))
    assert "| whole batch |" in md and "| 2 |" in md and "≤ 15 s" in md


def test_llama_shape_trains_every_third_block_mlp_only(tmp_path):
    spec = Spec(model="tiny-llama", batch=2, seq=16, padding="none", method="sparsegrad", steps=1, warmup=0,
                threads=1, basis_steps=1, basis_cache=str(tmp_path / "b.pt"))  # fmt: skip
    result = run(spec)
    assert result["steps_per_s"] > 0
    # every 3rd block of 4 (blocks 0, 3), MLP only: the biases-free up/down weights are the sparse ones
    assert result["trainable_params"] == 2 * 2 * 32 * 48


def test_subprocess_worker_and_markdown(tmp_path):
    spec = {"model": "tiny-bert", "batch": 2, "seq": 8, "method": "full", "steps": 1, "warmup": 0, "threads": 1}
    res = run_worker(spec, timeout_s=300)
    assert "error" not in res, res.get("error")
    res.update(shape="tiny", method="full", repeat=0, load_before=(0, 0, 0), load_after=(0, 0, 0))
    shape = grid.Shape("tiny-bert", 2, 8, "movie", methods=["full"])
    report = {
        "device": "cpu", "device_name": "test cpu", "preset": "custom", "command": "x", "date": "today",
        "machine": machine_info("cpu", 1), "load_before": [0.1, 0, 0], "load_after": [0.2, 0, 0],
        "steps": 1, "warmup": 0, "repeats": 1, "block_factor": 2.0, "notes": ["n"], "seconds": 1.0,
        "shape_defs": [{**shape.__dict__, "key": "tiny"}], "summary": summarize([res], "cpu"),
        "skipped": [{"shape": "tiny", "method": "lora", "repeat": 0, "why": "budget"}], "energy_md": None,
    }  # fmt: skip
    md = to_markdown(report)
    assert "| full |" in md and "Skipped runs" in md and "multiply-adds" in md
    report["records"] = [res]
    path = tmp_path / "cpu.json"
    path.write_text(json.dumps(report, default=str))
    assert cli.main(["--render", str(path)]) == 0
    assert (tmp_path / "cpu.md").read_text() == md


def test_basis_targets_prefer_the_standalone_measurement():
    run_basis = {"loaded_from_cache": False, "seconds": 20.0, "extra_peak_bytes": 290 * MB, "micro_batch": 4}
    rec = {"shape": "s", "method": "sparsegrad", "steps_per_s": 1.0, "cpu_s_per_step": 1.0, "peak_above_loaded_bytes": 1,
           "peak_train_bytes": 1, "optimizer_state_bytes": 1, "method_buffer_bytes": 1, "trainable_params": 1,
           "model_params": 1, "tokens_per_batch": [1], "padded_tokens_per_batch": 1, "model_source": "x",
           "model_layers": 1, "basis": run_basis}  # fmt: skip
    sweep = [{"shape": "s", "basis": {**run_basis, "micro_batch": None, "seconds": 9.0}, "memory_run": {"extra_peak_bytes": 1}},
             {"shape": "s", "basis": {**run_basis, "seconds": 14.0}, "memory_run": {"extra_peak_bytes": 299 * MB}}]  # fmt: skip
    targets = summarize([rec], "cpu", sweep)["s"]["targets"]["sparsegrad"]
    assert targets["basis_seconds"]["value"] == 14.0 and targets["basis_seconds"]["met"]
    assert round(targets["basis_extra_mb"]["value"]) == 299
    alone = summarize([rec], "cpu")["s"]["targets"]["sparsegrad"]
    assert alone["basis_seconds"]["value"] == 20.0 and not alone["basis_seconds"]["met"]


def test_a_row_registered_here_runs_and_is_reported(monkeypatch, tmp_path):
    """Adding a benchmark row is one BenchMethod: the worker runs it (with its spec overrides), the grid
    accepts it and the report lists it; no other file changes."""
    import sparsegrad
    from benchmarks import methods, report

    def apply_lora_rank2(model, basis, k, fam, spec):
        return sparsegrad.apply_method(model, {"name": "lora", "lora_rank": 2, "train_non_mlp": False})

    monkeypatch.setitem(methods.ROWS, "lora_r2_short", methods.BenchMethod(
        "lora_r2_short", "LoRA rank 2 on sequences of 8", apply_lora_rank2, spec={"seq": 8}))
    result = run(Spec(model="tiny-bert", batch=4, seq=16, method="lora_r2_short", steps=1, warmup=0, threads=1))
    assert result["spec"]["seq"] == 8 and result["padded_tokens_per_batch"] == 4 * 8
    # 2 layers x (up and down adapters of rank 2, each 2 x (in + out), plus the two linears' biases)
    assert result["trainable_params"] == 2 * (2 * 2 * (32 + 64) + 64 + 32)
    args = cli.parse_args(["--models", "tiny-bert", "--methods", "full,lora_r2_short"])
    _, preset = grid.build_preset(args)
    assert preset.shapes[0].methods == ["full", "lora_r2_short"]
    result.update(shape="tiny", method="lora_r2_short", repeat=0)
    block = summarize([result], "cpu")["tiny"]
    assert any(line.startswith("| lora_r2_short | ") for line in report.method_table("tiny", block, {}))

    monkeypatch.setattr(report, "SECTIONS", [*report.SECTIONS[:1], lambda r: ["## An extra section", ""]])
    md = report.to_markdown({"machine": machine_info("cpu", 1), "device": "cpu", "device_name": "cpu",
                             "command": "x", "date": "today", "preset": "custom", "steps": 1, "warmup": 0,
                             "repeats": 1, "seconds": 1.0, "load_before": [0.0] * 3, "load_after": [0.0] * 3})
    assert "`lora_r2_short`: LoRA rank 2 on sequences of 8" in md and md.endswith("## An extra section\n")


def test_unknown_row_names_the_valid_ones():
    with pytest.raises(ValueError, match="unknown benchmark method 'nope'; valid: full, lora"):
        run(Spec(model="tiny-bert", method="nope"))
    with pytest.raises(SystemExit, match="unknown method"):
        grid.build_preset(cli.parse_args(["--methods", "full,nope"]))


def test_bf16_preset_and_master_copies_in_the_report(tmp_path):
    """The bf16 preset loads SmolLM2 in bf16; a bf16 run records its float32 master copies, and the
    report lists them beside the method table."""
    preset = grid.PRESETS["bf16"]
    assert [s.dtype for s in preset.shapes] == ["bfloat16"] and preset.shapes[0].model == "smollm2"
    assert preset.shapes[0].key.endswith("bfloat16") and "full" in preset.shapes[0].methods
    results = []
    for method in ("full", "meprop"):
        spec = Spec(model="tiny-llama", batch=2, seq=16, padding="none", method=method, steps=1, warmup=0,
                    threads=1, dtype="bfloat16")  # fmt: skip
        res = run(spec)
        res.update(shape="tiny bf16", method=method, repeat=0)
        results.append(res)
    full, meprop = results
    assert full["master_bytes"] == 0
    assert meprop["master_bytes"] == 2 * 2 * 4 * 32 * 48  # blocks 0 and 3: up and down, 4 bytes an entry
    block = summarize(results, "cpu")["tiny bf16"]
    assert block["methods"]["meprop"]["master_copy_mb"] == pytest.approx(2 * 2 * 4 * 32 * 48 / MB)
    lines = "\n".join(precision.master_copies("tiny bf16", block, {}))
    assert "- meprop:" in lines and "- full:" not in lines
