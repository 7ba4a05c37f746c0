"""Saving is never silently wrong: unmerged checkpoints load into plain transformers as the trained
function, LoRA in the paper's setting saves its other trainable modules, a merged SmolLM2 saves and
reloads; estimate_basis works under autocast."""

import pytest
import torch
from method_fixtures import make_batches, make_model
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

import sparsegrad

CONFIGS = {
    "sparsegrad": {"name": "sparsegrad", "k": 0.05},
    "sparsegrad_rotated": {"name": "sparsegrad", "k": 0.05, "storage": "rotated"},
    "meprop": {"name": "meprop", "k": 0.05},
    "leading_block": {"name": "leading_block", "k": 0.05, "block_factor": 2.0},
}


def train(model, batches, steps=4, lr=3e-2):
    optimizer = sparsegrad.build_optimizer(model, lr=lr, schedule="constant")
    for batch in (batches * steps)[:steps]:
        model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return model


def logits(model, batch):
    model.eval()
    with torch.no_grad():
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


@pytest.mark.parametrize("method", list(CONFIGS))
def test_unmerged_save_pretrained_loads_into_plain_transformers(method, tmp_path):
    batches = make_batches("bert", n=2, seed=4)
    basis = sparsegrad.estimate_basis(make_model("bert"), batches, steps=2)
    model = train(sparsegrad.apply_method(make_model("bert"), CONFIGS[method], basis=basis), batches)
    # an optimizer step after the last forward: the saved weights must include it
    model.save_pretrained(tmp_path)
    plain = AutoModelForSequenceClassification.from_pretrained(tmp_path)
    assert not any(hasattr(m, "u_in") for m in plain.modules())
    expected = logits(sparsegrad.merge(model), batches[0])
    torch.testing.assert_close(logits(plain, batches[0]), expected, rtol=1e-5, atol=1e-5)


def test_rotated_checkpoint_reloads_the_rotated_weight_exactly(tmp_path):
    batches = make_batches("bert", n=2, seed=4)
    basis = sparsegrad.estimate_basis(make_model("bert"), batches, steps=2)

    def fresh():
        return sparsegrad.apply_method(make_model("bert"), CONFIGS["sparsegrad_rotated"], basis=basis)

    model = train(fresh(), batches)
    state = model.state_dict()
    layer = model.bert.encoder.layer[0].intermediate.dense
    key = "bert.encoder.layer[0].intermediate.dense".replace("[0]", ".0")
    torch.testing.assert_close(state[f"{key}.weight"], layer.to_linear().weight)  # W, as nn.Linear holds it
    assert torch.equal(state[f"{key}.rotated_weight"], layer.weight)  # W~, exactly
    again = fresh()
    again.load_state_dict(state)
    assert torch.equal(again.bert.encoder.layer[0].intermediate.dense.weight, layer.weight)


def test_lora_in_the_paper_setting_saves_and_reloads_everything_it_trained(tmp_path):
    from peft import PeftModel

    batches = make_batches("bert", n=2, seed=6)
    model = train(sparsegrad.apply_method(make_model("bert"), {"name": "lora", "lora_rank": 2}), batches)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    def mlp_weight(name):  # the frozen LoRA targets: intermediate.dense and (MLP) output.dense weights
        return name.endswith("dense.weight") and ("intermediate" in name or ".attention." not in name) and (
            "encoder.layer" in name)

    plain_trainable = sum(p.numel() for n, p in make_model("bert").named_parameters() if not mlp_weight(n))
    lora = sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)
    assert trainable == plain_trainable + lora  # no second, trainable copy of the non-MLP modules
    model.save_pretrained(tmp_path)
    expected = logits(model, batches[0])
    reloaded = PeftModel.from_pretrained(make_model("bert"), tmp_path)
    torch.testing.assert_close(logits(reloaded, batches[0]), expected, rtol=0, atol=1e-6)
    torch.testing.assert_close(logits(sparsegrad.merge(model), batches[0]), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_merged_smollm2_saves_and_reloads(asset, tmp_path):
    path = asset("smollm2")
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    assert getattr(model.config, "quantization_config", None) is None
    ids = torch.tensor([[1, 422, 1543, 314, 260, 3575, 30]])
    batches = [{"input_ids": ids, "labels": ids}]
    cfg = {"name": "sparsegrad", "k": 0.001, "every_nth_block": 10, "train_non_mlp": False}
    model = sparsegrad.apply_method(model, cfg, batches=batches)
    train(model, batches, steps=1, lr=1e-3)
    merged = sparsegrad.merge(model).eval()
    merged.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids).logits, merged(input_ids=ids).logits)


def test_estimate_basis_under_autocast_returns_the_float32_basis():
    batches = make_batches("bert", n=2, seed=2)
    reference = sparsegrad.estimate_basis(make_model("bert"), batches, steps=2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        basis = sparsegrad.estimate_basis(make_model("bert"), batches, steps=2)
    for key, group in basis.groups.items():
        assert group.u_in.dtype == torch.float32 and group.u_out.dtype == torch.float32
        eye = torch.eye(group.u_in.shape[0])
        torch.testing.assert_close(group.u_in.t() @ group.u_in, eye, rtol=0, atol=1e-4)
        # bf16 forward passes: the leading directions agree with the float32 estimate
        overlap = (group.u_in[:, 0] @ reference.groups[key].u_in[:, 0]).abs()
        assert overlap > 0.9, (key, float(overlap))
