"""The convergence stop: patience on the held-out metric, on fixture sequences and in the training loop."""

from __future__ import annotations

import pytest
from suite_fixtures import data_files_override

from sparsegrad.suite.run.convergence import EarlyStopping, converged, hit_cap


def run_sequence(stopper: EarlyStopping, values: list[float]) -> tuple[int, int]:
    """Feed values until the stopper says stop; returns (evaluations seen, index of the best)."""
    best_index = -1
    for i, v in enumerate(values):
        if stopper.update(v):
            best_index = i
        if stopper.should_stop:
            return i + 1, best_index
    return len(values), best_index


def test_stops_after_patience_evaluations_without_improvement():
    values = [0.50, 0.60, 0.70, 0.69, 0.70, 0.65, 0.90]  # 0.70 again is no improvement
    seen, best = run_sequence(EarlyStopping(patience=3), values)
    assert (seen, best) == (6, 2)


def test_improvement_resets_patience():
    values = [0.5, 0.4, 0.6, 0.55, 0.61, 0.6, 0.6, 0.9]
    seen, best = run_sequence(EarlyStopping(patience=2), values)
    assert (seen, best) == (7, 4)


def test_losses_improve_downwards_and_min_delta_counts():
    values = [2.0, 1.5, 1.49, 1.3, 1.31]
    seen, best = run_sequence(EarlyStopping(patience=2, higher_is_better=False, min_delta=0.05), values)
    assert (seen, best) == (5, 3)  # 1.49 is within min_delta of 1.5: not an improvement


def test_nan_never_improves_and_no_patience_never_stops():
    stopper = EarlyStopping(patience=None)
    assert run_sequence(stopper, [float("nan"), 0.1, 0.0, 0.0, 0.0]) == (5, 1)
    assert not stopper.should_stop


def test_record_helpers():
    assert converged({"training": {"stop_reason": EarlyStopping(4).reason()}}) is True
    assert converged({"training": {"stop_reason": "max_steps reached"}}) is False
    assert hit_cap({"training": {"stop_reason": "max_steps reached"}})
    assert converged({}) is None


@pytest.mark.parametrize("patience", [2])
def test_training_loop_stops_by_the_criterion(run_tiny, glue_files, patience):
    """A learning rate too small to move the metric: the run stops after `patience` flat evaluations,
    well before its step cap, and restores the first (best) checkpoint."""
    record = run_tiny(["model=tiny_bert", "method=full", "task=sst2", "trainer.max_steps=40", "trainer.epochs=20",
                       "trainer.eval_every=1", f"trainer.patience={patience}", "trainer.lr=1e-9",
                       data_files_override(glue_files["sst2"])])
    assert converged(record) and not hit_cap(record)
    selection = [e for e in record["evaluations"] if e["role"] == "selection"]
    values = [e["metrics"]["accuracy"] for e in selection]
    stopper = EarlyStopping(patience)
    seen, best = run_sequence(stopper, values)
    assert seen == len(selection) < 40
    assert record["best"]["step"] == selection[best]["step"]


def test_mlp_only_setting_trains_the_mlps_and_the_head(run_tiny, glue_files):
    """model=tiny_bert_mlp: every non-MLP parameter frozen except the classification head."""
    record = run_tiny(["model=tiny_bert_mlp", "method=lora", "task=sst2", data_files_override(glue_files["sst2"])])
    assert record["status"] == "completed" and record["model"] == "tiny_bert_mlp"
    paper = run_tiny(["model=tiny_bert", "method=lora", "task=sst2", data_files_override(glue_files["sst2"])])
    # LoRA adapters (rank 4 on 2 layers x (32x64, 64x32)) + MLP biases + head (32x2 + 2) only
    assert record["parameters"]["trainable_dense"] < paper["parameters"]["trainable_dense"] / 5


def test_task_head_of_a_peft_model():
    import torch.nn as nn

    from sparsegrad.suite.run.heads import task_head_parameters, unfreeze_task_head

    class Backbone(nn.Module):
        def __init__(self):
            super().__init__()
            self.layer = nn.Linear(4, 4)

    class Model(nn.Module):
        base_model_prefix = "bert"

        def __init__(self):
            super().__init__()
            self.bert = Backbone()
            self.classifier = nn.Linear(4, 2)

    m = Model()
    for p in m.parameters():
        p.requires_grad_(False)
    assert unfreeze_task_head(m) == ["classifier.weight", "classifier.bias"]
    assert not m.bert.layer.weight.requires_grad and m.classifier.weight.requires_grad
    assert [n for n, _ in task_head_parameters(nn.Linear(2, 2))] == []
