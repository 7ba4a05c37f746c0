"""LeadingBlockLinear against float64 references: forward, gradients, folding, top-k, model surgery."""

from __future__ import annotations

import pytest
import torch
from method_fixtures import make_batches, make_model, random_orthogonal
from torch import nn

import sparsegrad
from sparsegrad.methods.leading_block.layer import (
    LeadingBlockLinear,
    apply_leading_block,
    build_optimizer,
    leading_block_shape,
    merge_leading_block,
)

IN, OUT = 12, 20


def _linear(seed=0, dtype=torch.float64):
    torch.manual_seed(seed)
    return nn.Linear(IN, OUT).to(dtype)


def _basis(dtype=torch.float64):
    return random_orthogonal(IN, 1, dtype), random_orthogonal(OUT, 2, dtype)


def _x(tokens=9, zero_rows=(), seed=3, dtype=torch.float64):
    x = torch.randn(tokens, IN, generator=torch.Generator().manual_seed(seed), dtype=dtype)
    return x


def _reference(linear, u_in, u_out, rows, cols, block, x, upstream, orientation="hosvd"):
    """float64: y, dL/dx, dL/db and the leading block of dL/dW~ through a plain linear."""
    r_mat = u_in if orientation == "hosvd" else u_in.t()
    w = linear.weight.detach() + u_out[:, :rows] @ block @ r_mat[:, :cols].t()
    w = w.clone().requires_grad_(True)
    b = linear.bias.detach().clone().requires_grad_(True)
    xr = x.clone().requires_grad_(True)
    y = xr @ w.t() + b
    (y * upstream).sum().backward()
    g_tilde = u_out.t() @ w.grad @ r_mat
    return y.detach(), xr.grad, b.grad, g_tilde[:rows, :cols], w.detach()


@pytest.mark.parametrize("orientation", ["hosvd", "official"])
def test_forward_and_gradients_match_float64_reference(orientation):
    lin = _linear()
    u_in, u_out = _basis()
    layer = LeadingBlockLinear.from_linear(lin, u_in, u_out, k=15, rows=5, cols=4, orientation=orientation)
    assert layer.k == 15 and layer.sparse_block_grad
    layer = LeadingBlockLinear.from_linear(lin, u_in, u_out, k=20, rows=5, cols=4, orientation=orientation)
    assert layer.k == 20 and not layer.sparse_block_grad
    with torch.no_grad():
        layer.block.copy_(torch.randn(5, 4, dtype=torch.float64))
    x = _x()
    upstream = torch.randn(9, OUT, dtype=torch.float64)
    upstream[[2, 5]] = 0  # padded rows: sparse-by-dense drops them
    y_ref, gx_ref, gb_ref, gblock_ref, w_ref = _reference(lin, u_in, u_out, 5, 4, layer.block.detach(), x,
                                                          upstream, orientation)  # fmt: skip
    xr = x.clone().requires_grad_(True)
    y = layer(xr)
    torch.testing.assert_close(y, y_ref, rtol=1e-12, atol=1e-12)
    (y * upstream).sum().backward()
    torch.testing.assert_close(xr.grad, gx_ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(layer.bias.grad, gb_ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(layer.block.grad, gblock_ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(layer.to_linear().weight, w_ref, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("order", ["project_both", "project_input_first", "project_output_first", None])
def test_every_association_order_of_the_block_gradient_is_exact(order):
    from sparsegrad.methods.leading_block.layer import block_gradient

    gen = torch.Generator().manual_seed(5)
    g = torch.randn(9, OUT, generator=gen, dtype=torch.float64)
    x = torch.randn(9, IN, generator=gen, dtype=torch.float64)
    u_in, u_out = _basis()
    ref = (u_out.t() @ g.t() @ x @ u_in)[:6, :4]
    torch.testing.assert_close(block_gradient(g, x, u_out[:, :6], u_in[:, :4], order), ref, rtol=1e-12, atol=1e-12)


def test_initial_function_is_the_original_and_3d_input_works():
    lin = _linear(dtype=torch.float32)
    u_in, u_out = _basis(torch.float32)
    layer = LeadingBlockLinear.from_linear(lin, u_in, u_out, k=0.1)
    x = torch.randn(2, 5, IN)
    torch.testing.assert_close(layer(x), lin(x))
    assert layer.block.shape == (layer.rows, layer.cols) and layer.rows * layer.cols >= layer.k


def test_topk_inside_block_is_exact_k_coo_of_the_largest_entries():
    lin = _linear()
    u_in, u_out = _basis()
    layer = LeadingBlockLinear.from_linear(lin, u_in, u_out, k=7, rows=6, cols=5, sparse_by_dense=False)
    x = _x()
    upstream = torch.randn(9, OUT, dtype=torch.float64)
    *_, gblock_ref, _ = _reference(lin, u_in, u_out, 6, 5, torch.zeros(6, 5, dtype=torch.float64), x, upstream)
    (layer(x) * upstream).sum().backward()
    g = layer.block.grad
    assert g.is_sparse and g._nnz() == 7
    dense = g.to_dense()
    keep = gblock_ref.abs().reshape(-1).topk(7).indices
    expected = torch.zeros(30, dtype=torch.float64)
    expected[keep] = gblock_ref.reshape(-1)[keep]
    torch.testing.assert_close(dense.reshape(-1), expected, rtol=1e-12, atol=1e-12)


def test_fold_tracks_many_updates_against_float64_recomposition():
    lin = _linear(dtype=torch.float32)
    u_in, u_out = _basis(torch.float32)
    layer = LeadingBlockLinear.from_linear(lin, u_in, u_out, k=12, rows=4, cols=3)
    w0 = lin.weight.detach().double()
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3, IN)
    for _ in range(200):
        with torch.no_grad():
            layer.block.add_(1e-3 * torch.randn(4, 3, generator=gen))
        layer(x)
    ref = w0 + u_out[:, :4].double() @ layer.block.detach().double() @ u_in[:, :3].double().t()
    err = (layer.weight.double() - ref).abs().max()
    assert err < 1e-5, err
    # The leading block of W~ moved by exactly B; nothing else moved.
    w_tilde = u_out.double().t() @ (layer.weight.double() - w0) @ u_in.double()
    torch.testing.assert_close(w_tilde[:4, :3], layer.block.detach().double(), rtol=0, atol=1e-5)
    w_tilde[:4, :3] = 0
    assert w_tilde.abs().max() < 1e-5


def test_state_dict_round_trip_keeps_the_function():
    lin = _linear(dtype=torch.float32)
    u_in, u_out = _basis(torch.float32)
    a = LeadingBlockLinear.from_linear(lin, u_in, u_out, k=12, rows=4, cols=3)
    with torch.no_grad():
        a.block.fill_(0.1)
    x = torch.randn(4, IN)
    y = a(x)
    b = LeadingBlockLinear(IN, OUT, 4, 3, k=12)
    b.load_state_dict(a.state_dict())
    torch.testing.assert_close(b(x), y)


def test_leading_block_shape_keeps_aspect_and_budget():
    r, c = leading_block_shape(3072, 768, 28000)
    assert r * c >= 28000 and abs(r / c - 4) < 0.2
    assert leading_block_shape(10, 10, 1000) == (10, 10)


def test_model_surgery_trains_and_merges_to_a_plain_model():
    model = make_model("bert")
    batches = make_batches("bert", n=6)
    basis = sparsegrad.estimate_basis(model, batches[:2], steps=2)
    ref = make_model("bert")
    ref.eval()
    model = apply_leading_block(model, basis, k=0.05, block_factor=2.0)
    swapped = [m for m in model.modules() if isinstance(m, LeadingBlockLinear)]
    assert len(swapped) == 4 and all(m.sparse_block_grad for m in swapped)
    ups = [m for m in swapped if m.out_features == 64]
    assert ups[0].u_out.data_ptr() == ups[1].u_out.data_ptr()  # one copy of the basis per group
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(**batches[0]).logits, ref(**batches[0]).logits, rtol=1e-5, atol=1e-5)
    model.train()
    opt = build_optimizer(model, lr=1e-2)
    assert opt.sparse is not None and opt.dense is not None
    for batch in batches[2:]:
        model(**batch).loss.backward()
        opt.step()
        opt.zero_grad()
    moved = [int(m.block.ne(0).sum()) for m in swapped]
    assert all(0 < n <= m.k * 4 for n, m in zip(moved, swapped))
    model.eval()
    with torch.no_grad():
        before = model(**batches[0]).logits
    plain = merge_leading_block(model)
    assert not any(isinstance(m, LeadingBlockLinear) for m in plain.modules())
    with torch.no_grad():
        torch.testing.assert_close(plain(**batches[0]).logits, before, rtol=1e-5, atol=1e-5)
