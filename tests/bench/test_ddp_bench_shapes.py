"""The data-parallel benchmark's batch shapes: parsing, padding, and the halves each process takes."""

import pytest
import torch

from benchmarks import ddp


def test_shapes_parse_and_refuse_bad_input():
    assert ddp.parse_shapes("16x64:none, 16x128:movie") == [
        {"batch": 16, "seq": 64, "padding": "none"}, {"batch": 16, "seq": 128, "padding": "movie"}]
    assert ddp.parse_shapes("8x32") == [{"batch": 8, "seq": 32, "padding": "none"}]
    for bad in ("16x64:zeros", "15x64", "16by64", ""):
        with pytest.raises(ValueError, match="--shapes"):
            ddp.parse_shapes(bad)


def test_padded_batches_mask_the_padding_and_split_over_the_processes():
    opts = {"batch": 16, "seq": 128, "padding": "movie", "steps": 3, "warmup": 1}
    whole = ddp._batch(opts, 2, None)
    lengths = whole["attention_mask"].sum(1)
    assert lengths.max() <= 128 and lengths.min() >= 1 and lengths.float().mean() < 64  # short sentences
    assert (whole["input_ids"][whole["attention_mask"] == 0] == 0).all()
    halves = [ddp._batch(opts, 2, rank) for rank in range(ddp.WORLD)]
    for key in whole:
        assert torch.equal(torch.cat([h[key] for h in halves]), whole[key])
    real = ddp.real_tokens_per_process(opts)
    by_hand = sum(int(ddp._batch(opts, s, None)["attention_mask"].sum()) for s in (1, 2, 3)) / 3 / ddp.WORLD
    assert real == pytest.approx(by_hand)
    unpadded = {**opts, "padding": "none"}
    assert ddp._batch(unpadded, 2, 0)["attention_mask"].all()
    assert ddp.real_tokens_per_process(unpadded) == 16 * 128 / ddp.WORLD


def test_targets_note_compares_the_sparse_exchange_with_full_ft():
    rows = [{"method": "full", "cpu_s": 4.0, "mlp_bytes": 1000},
            {"method": "sparsegrad_backward", "cpu_s": 4.8, "mlp_bytes": 20}]
    note = ddp._targets_note(rows)
    assert "CPU time per step 1.200x (target <= 1.3x: met)" in note
    assert "MLP matrices 0.020x (target <= 0.1x: met)" in note
    rows[1]["cpu_s"] = 8.0
    assert "2.000x (target <= 1.3x: not met)" in ddp._targets_note(rows)
    assert ddp._targets_note(rows[:1]) == ""  # nothing to compare without the sparse mode


def test_ddp_is_built_without_the_per_forward_buffer_broadcast():
    import inspect

    from torch.nn.parallel import DistributedDataParallel

    (key, value), = ddp.no_forward_buffer_sync().items()
    assert value is False and key in inspect.signature(DistributedDataParallel.__init__).parameters
