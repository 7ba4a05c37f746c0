"""apply_method / merge on whole tiny models: targets, trainable flags, training, round trips."""

import pytest
import torch
from method_fixtures import make_batches, make_model
from torch import nn

import sparsegrad
from sparsegrad import MePropLinear, SparseGradLinear, account, find_targets
from sparsegrad.methods.leading_block.layer import LeadingBlockLinear

METHOD_CFGS = {
    "full": {"name": "full"},
    "lora": {"name": "lora", "lora_rank": 4, "lora_alpha": 8},
    "meprop": {"name": "meprop", "k": 0.1},
    "meprop_output": {"name": "meprop", "meprop_mode": "output", "meprop_k_per_row": 0.25},
    "sparsegrad": {"name": "sparsegrad", "k": 0.1},
    "sparsegrad_official": {"name": "sparsegrad", "k": 0.1, "orientation": "official"},
    "leading_block": {"name": "leading_block", "k": 0.1, "block_factor": 2.0},
}


def _apply(model, kind, cfg):
    basis = None
    if cfg["name"] in ("sparsegrad", "leading_block"):
        basis = sparsegrad.estimate_basis(model, make_batches(kind, n=2, seed=7), steps=2,
                                          every_nth_block=cfg.get("every_nth_block"))  # fmt: skip
    return sparsegrad.apply_method(model, cfg, basis=basis)


def test_targets_per_architecture():
    bert = [(t.name, t.group) for t in find_targets(make_model("bert"))]
    assert bert == [
        ("bert.encoder.layer.0.intermediate.dense", "up"), ("bert.encoder.layer.0.output.dense", "down"),
        ("bert.encoder.layer.1.intermediate.dense", "up"), ("bert.encoder.layer.1.output.dense", "down"),
    ]  # fmt: skip
    assert not any("attention" in name for name, _ in bert)
    roberta = [t.name for t in find_targets(make_model("roberta"))]
    assert roberta[0] == "roberta.encoder.layer.0.intermediate.dense" and len(roberta) == 4
    llama = find_targets(make_model("llama", n_layers=7), every_nth_block=3)
    assert [(t.block, t.group) for t in llama] == [(b, g) for b in (0, 3, 6) for g in ("up", "down")]
    assert all(t.name.endswith(("mlp.up_proj", "mlp.down_proj")) for t in llama)


def test_errors_speak_to_the_user():
    with pytest.raises(ValueError, match="valid: full, lora, meprop, sparsegrad"):
        sparsegrad.MethodConfig(name="adapter")
    with pytest.raises(ValueError, match="unknown method option"):
        sparsegrad.MethodConfig.from_any({"name": "full", "rank": 3})
    with pytest.raises(ValueError, match=r"no target linears found with patterns .*nn.Linear modules, e.g."):
        sparsegrad.apply_method(make_model("bert"), {"name": "full", "target_patterns": {"up": "nomatch$"}})
    with pytest.raises(ValueError, match="needs a transition basis"):
        sparsegrad.apply_method(make_model("bert"), {"name": "sparsegrad"})
    with pytest.raises(ValueError, match="'leading_block' needs a transition basis"):
        sparsegrad.apply_method(make_model("bert"), {"name": "leading_block"})
    with pytest.raises(ValueError, match="block_factor must be > 0"):
        sparsegrad.MethodConfig(name="leading_block", block_factor=0)
    with pytest.raises(ValueError, match="no default MLP target patterns"):
        find_targets(nn.Sequential(nn.Linear(2, 2)))


@pytest.mark.parametrize("method", list(METHOD_CFGS))
def test_encoder_setting_keeps_non_mlp_trainable(method):
    model = _apply(make_model("bert"), "bert", METHOD_CFGS[method])
    flags = dict(model.named_parameters())
    for name, p in flags.items():
        if "LayerNorm" in name or "attention" in name or "classifier" in name or "embeddings" in name:
            assert p.requires_grad, name
    swapped = [m for m in model.modules() if isinstance(m, (SparseGradLinear, MePropLinear))]
    if method.startswith(("sparsegrad", "meprop")):
        assert len(swapped) == 4 and all(m.weight.requires_grad for m in swapped)
    if method == "lora":
        frozen = [n for n, p in flags.items() if not p.requires_grad]
        assert frozen and all(n.endswith("base_layer.weight") for n in frozen)
        assert any("lora_A" in n for n in flags)


@pytest.mark.parametrize("method", ["full", "lora", "meprop", "sparsegrad", "leading_block"])
def test_llama_setting_trains_only_selected_mlps(method):
    cfg = {**METHOD_CFGS[method], "every_nth_block": 3, "train_non_mlp": False}
    model = _apply(make_model("llama", n_layers=4), "llama", cfg)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable
    for name in trainable:
        assert ".layers.0.mlp." in name or ".layers.3.mlp." in name, name
        assert "gate_proj" not in name


@pytest.mark.parametrize("kind", ["bert", "roberta", "llama"])
@pytest.mark.parametrize("method", list(METHOD_CFGS))
def test_each_method_lowers_the_training_loss(kind, method):
    # Only the MLP linears learn, so the decrease is the method's own doing.
    cfg = {**METHOD_CFGS[method], "train_non_mlp": False}
    model = _apply(make_model(kind, seed=2), kind, cfg)
    batch = make_batches(kind, n=1, batch_size=8, seed=11)[0]
    lr = 3e-2
    opt = sparsegrad.build_optimizer(model, lr=lr, schedule="constant", max_grad_norm=1.0)
    losses = []
    for _ in range(8):
        loss = model(**batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    # encoders with a frozen random head can only move a little; the causal LM moves a lot
    assert losses[-1] < (losses[0] - 0.01 if kind != "llama" else losses[0] * 0.97), losses


@pytest.mark.parametrize("method", ["lora", "meprop", "sparsegrad", "sparsegrad_official", "leading_block"])
def test_merge_round_trip_through_plain_transformers(method, tmp_path):
    from transformers import AutoModelForSequenceClassification

    kind = "roberta"
    batches = make_batches(kind, n=3, seed=5)
    model = _apply(make_model(kind, seed=4), kind, METHOD_CFGS[method])
    opt = sparsegrad.build_optimizer(model, lr=1e-2, schedule="constant")
    for batch in batches[:2]:
        model(**batch).loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()
    probe = {k: v for k, v in batches[2].items() if k != "labels"}
    with torch.no_grad():
        before = model(**probe).logits
    merged = sparsegrad.merge(model)
    assert not any(isinstance(m, (SparseGradLinear, MePropLinear, LeadingBlockLinear)) for m in merged.modules())
    assert type(merged).__name__ == "RobertaForSequenceClassification"
    with torch.no_grad():
        after = merged(**probe).logits
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-5)
    merged.save_pretrained(tmp_path)
    reloaded = AutoModelForSequenceClassification.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**probe).logits, before, rtol=1e-5, atol=1e-5)


def test_accounting_budget_and_updated_union():
    model = _apply(make_model("bert"), "bert", {"name": "sparsegrad", "k": 100})
    report = account(model)
    assert report.method == "sparsegrad"
    assert [layer.k for layer in report.sparse_layers] == [100] * 4
    assert report.updated_total == 0
    dense_expected = sum(p.numel() for n, p in model.named_parameters()) - 4 * 64 * 32
    assert report.trainable_dense == dense_expected
    opt = sparsegrad.build_optimizer(model, lr=1e-3, schedule="constant")
    for batch in make_batches("bert", n=3):
        model(**batch).loss.backward()
        opt.step()
        opt.zero_grad()
    report = account(model)
    assert all(100 <= layer.updated <= 300 for layer in report.sparse_layers)
    assert report.trainable_per_step == report.trainable_dense + 400
    lora = account(_apply(make_model("bert"), "bert", METHOD_CFGS["lora"]))
    assert lora.lora_params == 4 * 4 * (32 + 64)


def test_apply_method_can_estimate_the_basis_and_shares_it_per_group():
    model = make_model("bert")
    cfg = sparsegrad.MethodConfig(name="sparsegrad", k=50, basis_steps=2)
    model = sparsegrad.apply_method(model, cfg, batches=make_batches("bert", n=3))
    layers = model.bert.encoder.layer
    up0, up1 = layers[0].intermediate.dense, layers[1].intermediate.dense
    assert isinstance(up0, SparseGradLinear) and up0.k == 50
    assert up0.u_out.data_ptr() == up1.u_out.data_ptr()  # one copy of the group's basis
    assert up0.u_out.data_ptr() != layers[0].output.dense.u_in.data_ptr()
    eye = torch.eye(64)
    torch.testing.assert_close(up0.u_out.T @ up0.u_out, eye, atol=1e-5, rtol=0)


def test_unmerged_sparsegrad_model_saves_with_save_pretrained(tmp_path):
    from safetensors.torch import load_file

    batches = make_batches("bert", n=2)
    basis = sparsegrad.estimate_basis(make_model("bert"), batches[:1], steps=1)
    model = sparsegrad.apply_method(make_model("bert"), {"name": "sparsegrad", "k": 40}, basis=basis)
    opt = sparsegrad.build_optimizer(model, lr=1e-2, schedule="constant")
    model(**batches[0]).loss.backward()
    opt.step()
    model.save_pretrained(tmp_path)  # shared, column-major basis buffers must not break safetensors
    state = load_file(str(tmp_path / "model.safetensors"))
    assert sum(key.endswith("u_out") for key in state) == 4
    fresh = sparsegrad.apply_method(make_model("bert", seed=9), {"name": "sparsegrad", "k": 40}, basis=basis)
    fresh.load_state_dict(state)
    model.eval()
    fresh.eval()
    probe = {k: v for k, v in batches[1].items() if k != "labels"}
    with torch.no_grad():
        torch.testing.assert_close(fresh(**probe).logits, model(**probe).logits)
