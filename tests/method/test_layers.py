"""SparseGradLinear / MePropLinear against float64 references of the math in sparsegrad.methods.sparsegrad.layer."""

import copy
import io

import pytest
import torch
from method_fixtures import random_orthogonal
from torch import nn

from sparsegrad import MePropLinear, SparseGradLinear
from sparsegrad.kernels import topk_coo

D_IN, D_OUT = 24, 40


def _setup(dtype=torch.float64, seed=0):
    torch.manual_seed(seed)
    linear = nn.Linear(D_IN, D_OUT).to(dtype)
    u_in = random_orthogonal(D_IN, seed + 1, dtype)
    u_out = random_orthogonal(D_OUT, seed + 2, dtype)
    x = torch.randn(3, 7, D_IN, dtype=dtype)
    grad_y = torch.randn(3, 7, D_OUT, dtype=dtype)
    grad_y[1, 2:] = 0  # padded positions: zero rows of dL/dY
    grad_y[2, 5:] = 0
    return linear, u_in, u_out, x, grad_y


def _reference(linear, x, grad_y):
    """Gradients of the original layer: dL/dx, dL/dW, dL/db."""
    ref = copy.deepcopy(linear)
    xr = x.clone().requires_grad_(True)
    y = ref(xr)
    y.backward(grad_y)
    return y.detach(), xr.grad, ref.weight.grad, ref.bias.grad


def _run(layer, x, grad_y):
    xr = x.clone().requires_grad_(True)
    y = layer(xr)
    y.backward(grad_y)
    return y.detach(), xr.grad, layer.weight.grad, layer.bias.grad


@pytest.mark.parametrize("orientation", ["hosvd", "official"])
@pytest.mark.parametrize("formulation,storage", [("auto", "weight"), ("auto", "rotated"), ("regular", "rotated")])
@pytest.mark.parametrize("sparse_by_dense", [True, False])
def test_sparsegrad_linear_matches_float64_reference(orientation, formulation, storage, sparse_by_dense):
    linear, u_in, u_out, x, grad_y = _setup()
    k = 37
    layer = SparseGradLinear.from_linear(
        linear, u_in, u_out, k, orientation=orientation, formulation=formulation, storage=storage,
        sparse_by_dense=sparse_by_dense,
    )  # fmt: skip
    assert layer.storage == storage
    y_ref, gx_ref, gw_ref, gb_ref = _reference(linear, x, grad_y)
    y, gx, gw, gb = _run(layer, x, grad_y)
    r_mat = u_in if orientation == "hosvd" else u_in.t()
    stored = linear.weight if storage == "weight" else u_out.t() @ linear.weight @ r_mat
    torch.testing.assert_close(layer.weight.detach(), stored.detach())
    torch.testing.assert_close(layer.rotated_weight(), u_out.t() @ linear.weight.detach() @ r_mat)
    torch.testing.assert_close(y, y_ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(gx, gx_ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(gb, gb_ref, rtol=1e-12, atol=1e-12)  # unrotated bias gradient
    dw_tilde = u_out.t() @ gw_ref @ r_mat  # dL/dW~ = u_out^T (dL/dW) R
    expected = topk_coo(dw_tilde, k)
    assert gw.is_sparse and gw._nnz() == k
    gw = gw.coalesce()
    assert torch.equal(gw.indices(), expected.indices())
    torch.testing.assert_close(gw.values(), expected.values(), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(layer.to_linear().weight, linear.weight, rtol=1e-12, atol=1e-12)


def test_fraction_budget_and_k_equal_to_all_entries():
    linear, u_in, u_out, x, grad_y = _setup()
    assert SparseGradLinear.from_linear(linear, u_in, u_out, 0.1).k == round(0.1 * D_IN * D_OUT)
    layer = SparseGradLinear.from_linear(linear, u_in, u_out, 1.0)
    _, _, gw_ref, _ = _reference(linear, x, grad_y)
    _, _, gw, _ = _run(layer, x, grad_y)
    torch.testing.assert_close(gw.to_dense(), u_out.t() @ gw_ref @ u_in)


def test_float32_forward_relative_error_below_1e5():
    linear, u_in, u_out, x, grad_y = _setup(torch.float32, seed=3)
    for formulation in ("auto", "regular"):
        layer = SparseGradLinear.from_linear(linear, u_in, u_out, 10, formulation=formulation, storage="rotated")
        layer.current_effective_weight()
        with torch.no_grad():
            layer.weight.add_(0.0)  # bump the version: the cache must be recomputed from W~
            y, y_ref = layer(x), linear(x)
        assert ((y - y_ref).norm() / y_ref.norm()) < 1e-5
        _, gx, _, _ = _run(layer, x, grad_y)
        _, gx_ref, _, _ = _reference(linear, x, grad_y)
        assert ((gx - gx_ref).norm() / gx_ref.norm()) < 1e-5


def test_sparse_by_dense_equals_dense_path_with_padding():
    linear, u_in, u_out, x, grad_y = _setup()
    results = []
    for sbd in (True, False):
        layer = SparseGradLinear.from_linear(linear, u_in, u_out, 50, sparse_by_dense=sbd)
        results.append(_run(layer, x, grad_y))
    (_, gx1, gw1, gb1), (_, gx2, gw2, gb2) = results
    torch.testing.assert_close(gx1, gx2, rtol=1e-13, atol=1e-13)
    torch.testing.assert_close(gb1, gb2, rtol=1e-13, atol=1e-13)
    assert torch.equal(gw1.coalesce().indices(), gw2.coalesce().indices())
    torch.testing.assert_close(gw1.coalesce().values(), gw2.coalesce().values(), rtol=1e-12, atol=1e-13)
    assert torch.equal(gx1[1, 2:], torch.zeros_like(gx1[1, 2:]))  # dropped rows get zero dL/dx


def test_weight_change_invalidates_cached_effective_weight():
    linear, u_in, u_out, x, _ = _setup()
    layer = SparseGradLinear.from_linear(linear, u_in, u_out, 10, storage="rotated")
    with torch.no_grad():
        layer.weight[3, 5] += 0.7
        torch.testing.assert_close(layer(x), layer.to_linear()(x))
        layer.load_state_dict({**layer.state_dict(), "weight": layer.weight * 1.5})
        torch.testing.assert_close(layer(x), layer.to_linear()(x))


def test_incremental_refresh_matches_recomputation():
    linear, u_in, u_out, x, _ = _setup()
    cases = {
        "one row": torch.arange(5),  # few rows touched: rows side, gathered
        "one column": torch.arange(30) * D_IN + 3,  # few columns: columns side, gathered
        "everything": torch.arange(0, D_OUT * D_IN, 7),  # all rows and columns: no gather
    }
    for flat in cases.values():
        layer = SparseGradLinear.from_linear(linear, u_in, u_out, 10, storage="rotated")
        layer.current_effective_weight()
        delta = torch.randn(flat.numel(), dtype=torch.float64)
        version = layer.weight._version
        with torch.no_grad():
            layer.weight.view(-1).index_add_(0, flat, delta)
        layer.note_sparse_update(flat, delta, version)
        assert layer._eff_key == layer._cache_key()  # updated in place, no recompute pending
        torch.testing.assert_close(layer.effective_weight, layer.to_linear().weight, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("orientation", ["hosvd", "official"])
def test_weight_storage_applies_sparse_steps_through_the_basis(orientation):
    """storage "weight": W <- (1 - decay) W + u_out ΔW~ R^T, on every route (rows, columns, dense)."""
    linear, u_in, u_out, x, _ = _setup()
    r_mat = u_in if orientation == "hosvd" else u_in.t()
    cases = {
        "few rows": torch.arange(5),
        "few columns": torch.arange(30) * D_IN + 3,
        "spread": torch.arange(0, D_OUT * D_IN, 7),
        "everything": torch.arange(D_OUT * D_IN),
        "nothing": torch.arange(0),
    }
    for name, flat in cases.items():
        layer = SparseGradLinear.from_linear(linear, u_in, u_out, 10, orientation=orientation)
        delta = torch.randn(flat.numel(), dtype=torch.float64)
        expected_tilde = u_out.t() @ linear.weight.detach() @ r_mat * 0.9
        expected_tilde.view(-1).index_add_(0, flat, delta)
        layer.apply_rotated_step(flat, delta, decay=0.1)
        torch.testing.assert_close(layer.rotated_weight(), expected_tilde, rtol=1e-12, atol=1e-12, msg=name)
        torch.testing.assert_close(layer.weight.detach(), u_out @ expected_tilde @ r_mat.t(), rtol=1e-12,
                                   atol=1e-12, msg=name)  # fmt: skip


def test_weight_storage_refuses_a_foreign_optimizer_step():
    linear, u_in, u_out, x, grad_y = _setup()
    layer = SparseGradLinear.from_linear(linear, u_in, u_out, 10)
    _run(layer, x, grad_y)
    torch.optim.SparseAdam([layer.weight], lr=1e-2).step()  # adds dL/dW~ to W: wrong coordinates
    with pytest.raises(RuntimeError, match="build_optimizer"):
        layer(x)
    layer(x)  # reported once; the user decides
    _run(layer, x, grad_y)
    with torch.no_grad():
        layer.weight.mul_(1.0)  # a deliberate change after a backward pass
    layer.discard_pending_gradient()
    layer(x)
    rotated = SparseGradLinear.from_linear(linear, u_in, u_out, 10, storage="rotated")
    _run(rotated, x, grad_y)
    torch.optim.SparseAdam([rotated.weight], lr=1e-2).step()  # W~ is the parameter: fine
    rotated(x)
    with pytest.raises(ValueError, match="storage='rotated'"):
        SparseGradLinear.from_linear(linear, u_in, u_out, 10, formulation="regular", storage="weight")


@pytest.mark.parametrize("storage", ["weight", "rotated"])
def test_basis_buffers_follow_state_dict_and_to(storage):
    linear, u_in, u_out, x, _ = _setup(torch.float32)
    layer = SparseGradLinear.from_linear(linear, u_in, u_out, 10, orientation="official", storage=storage)
    state = layer.state_dict()
    assert {"weight", "bias", "u_in", "u_out", "updated_mask"} <= set(state)
    # the valid cached W_eff of storage "rotated" travels with the weights (bit-exact resume)
    assert ("effective_weight" in state) == (storage == "rotated")
    if storage == "weight":
        assert torch.equal(state["weight"], linear.weight.detach())  # W itself: the plain Linear's key
    fresh = SparseGradLinear(D_IN, D_OUT, 10, orientation="official", storage=storage)
    fresh.load_state_dict(state)
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), linear(x), rtol=1e-5, atol=1e-5)
    as_double = copy.deepcopy(layer).to(torch.float64)
    assert as_double.u_in.dtype == torch.float64 and as_double.u_out.dtype == torch.float64
    with torch.no_grad():
        torch.testing.assert_close(as_double(x.double()), linear.double()(x.double()), rtol=1e-5, atol=1e-5)
    buf = io.BytesIO()
    torch.save(layer.state_dict(), buf)
    assert "u_in" in torch.load(io.BytesIO(buf.getvalue()), weights_only=True)


def test_updated_mask_tracks_union_of_gradient_support():
    linear, u_in, u_out, x, grad_y = _setup()
    layer = SparseGradLinear.from_linear(linear, u_in, u_out, 20)
    _, _, gw, _ = _run(layer, x, grad_y)
    assert layer.num_updated() == 20
    layer.weight.grad = None
    _run(layer, x, -grad_y * torch.linspace(0, 1, D_OUT, dtype=torch.float64))
    assert 20 <= layer.num_updated() <= 40


def test_bad_basis_shape_is_explained():
    linear, u_in, u_out, _, _ = _setup()
    with pytest.raises(ValueError, match="expected u_in"):
        SparseGradLinear.from_linear(linear, u_out, u_in, 10)
    with pytest.raises(ValueError, match="valid: hosvd, official"):
        SparseGradLinear.from_linear(linear, u_in, u_out, 10, orientation="bogus")


def test_meprop_weight_mode_is_topk_of_original_gradient():
    linear, _, _, x, grad_y = _setup()
    layer = MePropLinear.from_linear(linear, 30, mode="weight")
    y_ref, gx_ref, gw_ref, gb_ref = _reference(linear, x, grad_y)
    y, gx, gw, gb = _run(layer, x, grad_y)
    torch.testing.assert_close(y, y_ref)
    torch.testing.assert_close(gx, gx_ref)
    torch.testing.assert_close(gb, gb_ref)
    expected = topk_coo(gw_ref, 30)
    assert gw.is_sparse and gw._nnz() == 30
    assert torch.equal(gw.coalesce().indices(), expected.indices())
    torch.testing.assert_close(gw.coalesce().values(), expected.values())
    assert torch.equal(layer.to_linear().weight, linear.weight)


def test_meprop_output_mode_sparsifies_grad_output_per_row():
    linear, _, _, x, grad_y = _setup()
    k_row = 6
    layer = MePropLinear.from_linear(linear, k_row, mode="output")
    g = grad_y.reshape(-1, D_OUT)
    idx = g.abs().topk(k_row, dim=1).indices
    g_sparse = torch.zeros_like(g).scatter_(1, idx, g.gather(1, idx)).reshape_as(grad_y)
    _, gx_ref, gw_ref, gb_ref = _reference(linear, x, g_sparse)
    y, gx, gw, gb = _run(layer, x, grad_y)
    torch.testing.assert_close(y, linear(x).detach())
    assert not gw.is_sparse
    torch.testing.assert_close(gx, gx_ref)
    torch.testing.assert_close(gw, gw_ref)
    torch.testing.assert_close(gb, gb_ref)
    full_gx = _reference(linear, x, grad_y)[1]
    assert not torch.allclose(gx, full_gx)  # genuinely sparsified


@pytest.mark.parametrize("cls", ["sparsegrad", "meprop"])
def test_backward_under_bfloat16_autocast(cls):
    linear, u_in, u_out, x, grad_y = _setup(torch.float32)
    if cls == "sparsegrad":
        layer = SparseGradLinear.from_linear(linear, u_in, u_out, 20)
    else:
        layer = MePropLinear.from_linear(linear, 20)
    xr = x.clone().requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(xr)
    assert y.dtype == torch.bfloat16
    y.float().backward(grad_y)
    assert xr.grad.dtype == torch.float32 and layer.weight.grad.dtype == torch.float32
    _, gx_ref, _, _ = _reference(linear, x, grad_y)
    assert (xr.grad - gx_ref).norm() / gx_ref.norm() < 2e-2
