"""The "leading_block" method (sparsegrad.methods.leading_block.layer.LeadingBlockLinear) through the public API:
apply_method, build_optimizer, account, merge."""

import pytest
import torch
from method_fixtures import make_batches, make_model
from torch import nn

import sparsegrad
from sparsegrad.methods.leading_block.layer import LeadingBlockLinear
from sparsegrad.methods.leading_block.layer import build_optimizer as fixed_support_optimizer


def _layers(model):
    return [m for m in model.modules() if isinstance(m, LeadingBlockLinear)]


def test_apply_method_trains_the_leading_block_and_merges_to_a_plain_bert():
    batches = make_batches("bert", n=3, batch_size=8, seed=3)
    ref = make_model("bert", seed=2).eval()
    model = make_model("bert", seed=2)
    cfg = sparsegrad.MethodConfig(name="leading_block", k=0.05, block_factor=2.0, basis_steps=2,
                                  train_non_mlp=False)  # fmt: skip
    model = sparsegrad.apply_method(model, cfg, batches=batches[:2])  # the basis is estimated as for sparsegrad
    layers = _layers(model)
    assert len(layers) == 4 and all(m.sparse_block_grad for m in layers)
    assert all(m.k == round(0.05 * 32 * 64) and m.rows * m.cols >= 2 * m.k for m in layers)
    ups = [m for m in layers if m.out_features == 64]
    assert ups[0].u_out.data_ptr() == ups[1].u_out.data_ptr()  # one copy of the group's basis
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(n.endswith(("dense.block", "dense.bias")) for n in trainable), trainable
    probe = {k: v for k, v in batches[2].items() if k != "labels"}
    model.eval()
    with torch.no_grad():  # B = 0: the swapped model computes the original function
        torch.testing.assert_close(model(**probe).logits, ref(**probe).logits, rtol=1e-5, atol=1e-5)
    model.train()

    opt = sparsegrad.build_optimizer(model, lr=3e-2, schedule="constant", max_grad_norm=1.0)
    blocks = {id(m.block) for m in layers}
    assert opt.sparse is not None and {id(p) for p in opt.sparse.param_groups[0]["params"]} == blocks
    assert not blocks & {id(p) for g in opt.dense.param_groups for p in g["params"]}
    batch = batches[2]
    losses = []
    for _ in range(8):
        loss = model(**batch).loss
        loss.backward()
        assert all(m.block.grad.is_sparse for m in layers)
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.01, losses

    report = sparsegrad.account(model)
    assert report.method == "leading_block"
    assert [layer.kind for layer in report.sparse_layers] == ["leading_block"] * 4
    assert [layer.k for layer in report.sparse_layers] == [m.k for m in layers]
    assert all(m.k <= layer.updated <= m.rows * m.cols for layer, m in zip(report.sparse_layers, layers))
    assert report.trainable_dense == sum(m.bias.numel() for m in layers)
    assert report.trainable_per_step == report.trainable_dense + sum(m.k for m in layers)

    model.eval()
    with torch.no_grad():
        before = model(**probe).logits
    merged = sparsegrad.merge(model)
    assert not _layers(merged) and not hasattr(merged, "sparsegrad_method")
    assert type(merged).__name__ == "BertForSequenceClassification"
    assert all(type(merged.get_submodule(t.name)) is nn.Linear for t in sparsegrad.find_targets(merged))
    with torch.no_grad():
        torch.testing.assert_close(merged(**probe).logits, before, rtol=1e-5, atol=1e-5)
        assert not torch.allclose(before, ref(**probe).logits)


@pytest.mark.parametrize("orientation", ["hosvd", "official"])
def test_method_matches_apply_leading_block(orientation):
    batches = make_batches("bert", n=2, seed=4)
    basis = sparsegrad.estimate_basis(make_model("bert"), batches[:1], steps=1)
    from sparsegrad.methods.leading_block.layer import apply_leading_block

    a = sparsegrad.apply_method(make_model("bert"), {"name": "leading_block", "k": 40, "block_factor": 3.0,
                                                     "orientation": orientation}, basis=basis)  # fmt: skip
    b = apply_leading_block(make_model("bert"), basis, 40, block_factor=3.0, orientation=orientation)
    for la, lb in zip(_layers(a), _layers(b), strict=True):
        assert (la.rows, la.cols, la.k) == (lb.rows, lb.cols, lb.k)
        torch.testing.assert_close(la.u_in, lb.u_in)
        torch.testing.assert_close(la.u_out, lb.u_out)


def test_dense_block_goes_to_adamw_and_fixed_support_optimizer_is_the_same_mechanism():
    batches = make_batches("bert", n=2, seed=6)
    basis = sparsegrad.estimate_basis(make_model("bert"), batches[:1], steps=1)
    dense = sparsegrad.apply_method(make_model("bert"), {"name": "leading_block", "k": 32, "block_factor": 1.0},
                                    basis=basis)  # fmt: skip
    assert not any(m.sparse_block_grad for m in _layers(dense))  # 32 = 8x4 = 4x8: the block is exactly k
    opt = sparsegrad.build_optimizer(dense, lr=1e-3, schedule="constant")
    assert opt.sparse is None
    assert {id(m.block) for m in _layers(dense)} <= {id(p) for g in opt.dense.param_groups for p in g["params"]}

    cfg = {"name": "leading_block", "k": 40}
    m1 = sparsegrad.apply_method(make_model("bert"), cfg, basis=basis)
    m2 = sparsegrad.apply_method(make_model("bert"), cfg, basis=basis)
    o1 = sparsegrad.build_optimizer(m1, lr=1e-2, schedule="constant", sparse_state="compact")
    o2 = fixed_support_optimizer(m2, lr=1e-2)
    assert type(o1) is type(o2) and o2.sparse.state_layout == "compact"
    for model, opt in ((m1, o1), (m2, o2)):
        for batch in batches:
            model(**batch).loss.backward()
            opt.step()
            opt.zero_grad()
    for la, lb in zip(_layers(m1), _layers(m2), strict=True):
        torch.testing.assert_close(la.block, lb.block)


def test_backward_under_bf16_autocast_keeps_parameter_dtypes():
    batches = make_batches("bert", n=2, seed=8)
    basis = sparsegrad.estimate_basis(make_model("bert"), batches[:1], steps=1)
    model = sparsegrad.apply_method(make_model("bert"), {"name": "leading_block", "k": 40}, basis=basis)
    opt = sparsegrad.build_optimizer(model, lr=1e-2, schedule="constant")
    for _ in range(2):  # the second forward folds the first step's change of B under autocast
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(**batches[1]).loss
        loss.backward()
        for m in _layers(model):
            assert m.block.grad.is_sparse and m.block.grad.dtype == torch.float32
            assert m.bias.grad.dtype == torch.float32
        opt.step()
        opt.zero_grad()
    merged = sparsegrad.merge(model)
    assert all(p.dtype == torch.float32 for p in merged.parameters())
