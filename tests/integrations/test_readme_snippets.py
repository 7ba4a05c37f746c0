"""The Trainer and accelerate snippets of README.md run as written (tiny random BERT, a few steps)."""

import re
from pathlib import Path

import pytest
import torch
from method_fixtures import make_batches, make_model

import sparsegrad

README = Path(__file__).resolve().parents[2] / "README.md"


def snippets() -> list[str]:
    section = README.read_text().split("### With transformers Trainer, TRL and accelerate", 1)[1]
    section = section.split("\n## ", 1)[0]
    return re.findall(r"```python\n(.*?)```", section, re.S)


def test_the_section_has_the_trainer_and_accelerate_snippets():
    found = snippets()
    assert len(found) == 2 and "Trainer(" in found[0] and "Accelerator(" in found[1]


def _basis(batches):
    return sparsegrad.estimate_basis(make_model("bert"), batches, steps=2)


def test_trainer_snippet(tmp_path, monkeypatch):
    batches = make_batches("bert", n=4, batch_size=4, seed=8)
    rows = [{k: v[i] for k, v in b.items()} for b in batches for i in range(4)]
    model = sparsegrad.apply_method(make_model("bert"), {"name": "sparsegrad", "k": 0.05}, basis=_basis(batches))
    before = model.bert.encoder.layer[0].intermediate.dense.weight.detach().clone()
    snippet = snippets()[0].replace("max_steps=1000, warmup_steps=100", "max_steps=4, warmup_steps=1, use_cpu=True, "
                                    "report_to=[], save_strategy='no', per_device_train_batch_size=4, logging_steps=1")
    monkeypatch.chdir(tmp_path)
    scope = {"sparsegrad": sparsegrad, "model": model, "train_set": rows}
    exec(compile(snippet, str(README), "exec"), scope)
    trainer = scope["trainer"]
    assert trainer.state.global_step == 4
    lrs = [h["learning_rate"] for h in trainer.state.log_history if "learning_rate" in h]
    assert lrs == pytest.approx([0.0, 2e-5, 2e-5 * 2 / 3, 2e-5 / 3])  # Trainer's warm-up and linear decay
    assert not torch.equal(model.bert.encoder.layer[0].intermediate.dense.weight, before)


def test_accelerate_snippet(monkeypatch):
    from accelerate.state import AcceleratorState, GradientState

    batches = make_batches("bert", n=4, batch_size=4, seed=8)
    model = make_model("bert")
    ids = batches[0]["input_ids"]
    with torch.no_grad():
        before = model(input_ids=ids).logits
    loader = torch.utils.data.DataLoader([{k: v[i] for k, v in b.items()} for b in batches for i in range(4)],
                                         batch_size=4)  # fmt: skip
    snippet = snippets()[1].replace("total_steps=1000", "total_steps=2").replace("lr=2e-5", "lr=1e-2")
    scope = {"sparsegrad": sparsegrad, "model": model, "basis": _basis(batches), "loader": loader}
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    try:
        exec(compile(snippet, str(README), "exec"), scope)
    finally:
        AcceleratorState._reset_state(True)
        GradientState._reset_state()
    merged = scope["model"]
    assert type(merged.bert.encoder.layer[0].intermediate.dense) is torch.nn.Linear
    merged.eval()
    with torch.no_grad():
        assert not torch.allclose(merged(input_ids=ids).logits, before)
