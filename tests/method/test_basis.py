"""The preliminary phase: Gram-route HOSVD factors vs tensorly, and no side effects on the model."""

import numpy as np
import pytest
import torch
from method_fixtures import make_batches, make_model
from torch import nn

from sparsegrad import estimate_basis, find_targets
from sparsegrad.methods.sparsegrad.basis import Basis, eigenbasis


def _align_signs(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Flip columns of b to match the signs of a."""
    signs = np.sign(np.sum(a * b, axis=0))
    signs[signs == 0] = 1
    return b * signs


def test_gram_route_equals_tensorly_hosvd():
    tl = pytest.importorskip("tensorly")
    from tensorly.decomposition import tucker

    tl.set_backend("numpy")
    rng = np.random.default_rng(0)
    n, d_out, d_in = 9, 7, 5
    # anisotropic stack: well separated mode spectra, so columns (not just subspaces) are unique
    stack = rng.standard_normal((n, d_out, d_in)) * np.linspace(3, 0.3, d_out)[None, :, None]
    stack *= np.linspace(2, 0.5, d_in)[None, None, :]
    ref = tucker(stack, rank=[n, d_out, d_in], n_iter_max=0, init="svd")
    grads = torch.from_numpy(stack)
    gram_out = sum(g @ g.T for g in grads)
    gram_in = sum(g.T @ g for g in grads)
    u_out, e_out = eigenbasis(gram_out, torch.float64)
    u_in, e_in = eigenbasis(gram_in, torch.float64)
    for ours, theirs in ((u_out.numpy(), ref.factors[1]), (u_in.numpy(), ref.factors[2])):
        np.testing.assert_allclose(_align_signs(theirs, ours), theirs, atol=1e-10)
        np.testing.assert_allclose(ours.T @ ours, np.eye(ours.shape[0]), atol=1e-12)
    assert torch.all(e_out[:-1] >= e_out[1:]) and torch.all(e_in[:-1] >= e_in[1:])
    # the core u_out^T G u_in is tensorly's core (modes 1, 2) up to the same signs
    core = np.einsum("oa,noi,ib->nab", u_out.numpy(), stack, u_in.numpy())
    ref_core = np.einsum("oa,noi,ib->nab", ref.factors[1], stack, ref.factors[2])
    np.testing.assert_allclose(np.abs(core), np.abs(ref_core), atol=1e-10)


def test_estimate_basis_matches_explicit_stack_and_leaves_model_untouched():
    model = make_model("bert", seed=0)
    batches = make_batches("bert", n=3)
    # a mixed starting state: some params frozen, one with a stale .grad
    model.bert.embeddings.word_embeddings.weight.requires_grad_(False)
    model.classifier.weight.grad = torch.ones_like(model.classifier.weight)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    model.eval()

    basis = estimate_basis(model, batches, steps=2, dtype=torch.float64)

    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert torch.equal(model.classifier.weight.grad, torch.ones_like(model.classifier.weight))
    assert all(p.grad is None for n, p in model.named_parameters() if n != "classifier.weight")
    assert not model.training

    targets = find_targets(model)
    assert set(basis.groups) == {"up", "down"}
    assert basis.stats["steps"] == 2 and basis.stats["n_gradients"] == {"up": 4, "down": 4}
    # explicit reference: stack the gradients of the same passes, HOSVD via SVD of the unfoldings
    model.train()
    stacks = {"up": [], "down": []}
    for batch in batches[:2]:
        model.zero_grad()
        model(**batch).loss.backward()
        for t in targets:
            stacks[t.group].append(model.get_submodule(t.name).weight.grad.double().clone())
    model.zero_grad()
    for group, grads in stacks.items():
        stack = torch.stack(grads)  # (N, out, in)
        n, d_out, d_in = stack.shape
        ref_out = torch.linalg.svd(stack.permute(1, 0, 2).reshape(d_out, -1), full_matrices=False)[0]
        ref_in = torch.linalg.svd(stack.permute(2, 0, 1).reshape(d_in, -1), full_matrices=False)[0]
        u_in, u_out = basis[group]
        for ours, ref in ((u_out.double(), ref_out), (u_in.double(), ref_in)):
            r = min(ref.shape[1], 8)  # leading, well separated directions
            cos = (ours[:, :r] * ref[:, :r]).sum(0).abs()
            assert torch.all(cos > 1 - 1e-4), cos
            eye = torch.eye(ours.shape[0], dtype=torch.float64)
            torch.testing.assert_close(ours.T @ ours, eye, atol=1e-5, rtol=0)


def test_per_layer_basis_llama_and_save_load(tmp_path):
    model = make_model("llama", seed=0, n_layers=4)
    basis = estimate_basis(model, make_batches("llama", n=2), steps=2, per_layer=True, every_nth_block=3)
    names = [t.name for t in find_targets(model, every_nth_block=3)]
    assert sorted(basis.groups) == sorted(names)
    assert {name.split(".")[2] for name in names} == {"0", "3"}
    assert basis.for_layer(names[0]).u_in.shape == (32, 32)
    path = tmp_path / "basis.pt"
    basis.save(path)
    loaded = Basis.load(path)
    assert torch.equal(loaded.for_layer(names[1]).u_out, basis.for_layer(names[1]).u_out)


def test_estimate_basis_explains_missing_loss():
    model = make_model("bert")
    batch = make_batches("bert", n=1)[0]
    batch.pop("labels")
    with pytest.raises(ValueError, match="no .loss"):
        estimate_basis(model, [batch], steps=1)
    assert all(p.requires_grad for p in model.parameters())


def test_targets_given_as_names_or_modules():
    model = make_model("bert")
    batches = make_batches("bert", n=1)
    name = "bert.encoder.layer.1.output.dense"
    by_name = estimate_basis(model, batches, targets=[name], steps=1, dtype=torch.float64)
    by_module = estimate_basis(model, batches, targets={name: model.get_submodule(name)}, steps=1,
                               dtype=torch.float64)  # fmt: skip
    assert set(by_name.groups) == set(by_module.groups) == {"down"}
    torch.testing.assert_close(by_name["down"].u_in, by_module["down"].u_in)
    with pytest.raises(ValueError, match="not MLP linears"):
        estimate_basis(model, batches, targets=["bert.pooler.dense"], steps=1)


@pytest.mark.parametrize("n_rows", [5, 60])  # fewer token rows than features (factored) and more (direct)
def test_gram_accumulator_routes_agree_with_the_weight_gradient(n_rows):
    from sparsegrad.methods.sparsegrad.basis import _GramAccumulator, gram_macs

    gen = torch.Generator().manual_seed(0)
    d_in, d_out = 24, 40
    g = torch.randn(n_rows + 3, d_out, generator=gen, dtype=torch.float64)
    g[-3:] = 0  # padding rows: dropped before the products
    x = torch.randn(n_rows + 3, d_in, generator=gen, dtype=torch.float64)
    acc = _GramAccumulator(torch.float64, torch.device("cpu"))
    acc.add_factors("k", g, x)
    acc.add_factors("k", g[:2], x[:2])
    acc.finish()  # factored slices are buffered and folded together
    w1, w2 = g.t() @ x, g[:2].t() @ x[:2]
    torch.testing.assert_close(acc.gram_out["k"], w1 @ w1.t() + w2 @ w2.t(), rtol=1e-12, atol=1e-10)
    torch.testing.assert_close(acc.gram_in["k"], w1.t() @ w1 + w2.t() @ w2, rtol=1e-12, atol=1e-10)
    assert acc.counts["k"] == 2
    assert gram_macs(n_rows, d_in, d_out) == ((False, False) if n_rows == 5 else (True, True))


def test_symmetric_product_fills_the_upper_triangle():
    from sparsegrad.methods.sparsegrad.basis import add_symmetric_product, upper_symmetric

    gen = torch.Generator().manual_seed(1)
    for n in (40, 1500):  # a full update, and the blocked upper-triangle update
        z = torch.randn(n, 30, generator=gen, dtype=torch.float64)
        c = torch.zeros(n, n, dtype=torch.float64)
        add_symmetric_product(c, z, z.t())
        add_symmetric_product(c, z[:, :3], z[:, :3].t())
        ref = z @ z.t() + z[:, :3] @ z[:, :3].t()
        torch.testing.assert_close(c.triu(), ref.triu(), rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(upper_symmetric(c), ref, rtol=1e-12, atol=1e-12)


def test_non_linear_targets_use_their_weight_gradient():
    """A target that is not an nn.Linear (here a linear with its own forward) falls back to folding
    its weight gradient; the basis equals the one of the same model built from nn.Linear."""

    class OwnLinear(nn.Module):
        def __init__(self, linear):
            super().__init__()
            self.weight, self.bias = linear.weight, linear.bias

        def forward(self, x):
            return x @ self.weight.t() + self.bias

    batches = make_batches("bert", n=2)
    ref = estimate_basis(make_model("bert"), batches, steps=2, dtype=torch.float64)
    model = make_model("bert")
    for layer in model.bert.encoder.layer:
        layer.intermediate.dense = OwnLinear(layer.intermediate.dense)
        layer.output.dense = OwnLinear(layer.output.dense)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    targets = find_targets(make_model("bert"))  # the same names; find_targets itself looks for nn.Linear
    ours = estimate_basis(model, batches, targets, steps=2, dtype=torch.float64)
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert all(p.grad is None for p in model.parameters())
    for group in ("up", "down"):
        torch.testing.assert_close(ours[group].eig_out, ref[group].eig_out, rtol=1e-5, atol=1e-12)
        torch.testing.assert_close(ours[group].eig_in, ref[group].eig_in, rtol=1e-5, atol=1e-12)
        for a, b in zip(ours[group], ref[group]):  # leading, well separated directions
            torch.testing.assert_close(a[:, :4], b[:, :4], rtol=1e-4, atol=1e-5)


def test_factors_are_column_major_and_shared_by_the_layers():
    import sparsegrad

    batches = make_batches("bert", n=1)
    basis = estimate_basis(make_model("bert"), batches, steps=1)
    u_in, u_out = basis["up"]
    assert u_out.stride() == (1, u_out.shape[0]) and u_in.stride() == (1, u_in.shape[0])
    model = sparsegrad.apply_method(make_model("bert"), {"name": "sparsegrad", "k": 10}, basis=basis)
    up = model.bert.encoder.layer[1].intermediate.dense
    assert up.u_out.data_ptr() == u_out.data_ptr()  # no copy while the caller keeps the basis
