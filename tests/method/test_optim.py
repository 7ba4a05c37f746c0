"""LazySparseAdam, clipping with sparse gradients, schedules, state bytes, and exact resume."""

import io

import pytest
import torch
from method_fixtures import make_batches, make_model
from torch import nn

import sparsegrad
from sparsegrad.optim import LazySparseAdam, clip_grad_norm, make_schedule


def _sparse_grads(shape, steps, nnz, seed=0):
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(steps):
        flat = torch.randperm(shape[0] * shape[1], generator=gen)[:nnz].sort().values
        idx = torch.stack([flat // shape[1], flat % shape[1]])
        out.append(torch.sparse_coo_tensor(idx, torch.randn(nnz, generator=gen), shape, check_invariants=True).coalesce())
    return out


@pytest.mark.parametrize("layout", ["dense", "compact"])
def test_lazy_sparse_adam_equals_torch_sparse_adam(layout):
    grads = _sparse_grads((12, 10), steps=6, nnz=15)
    p_ref = nn.Parameter(torch.randn(12, 10, generator=torch.Generator().manual_seed(1)))
    p_ours = nn.Parameter(p_ref.detach().clone())
    ref = torch.optim.SparseAdam([p_ref], lr=0.01)
    ours = LazySparseAdam([p_ours], lr=0.01, state_layout=layout)
    for g in grads:
        p_ref.grad, p_ours.grad = g.clone(), g.clone()
        ref.step()
        ours.step()
    torch.testing.assert_close(p_ours, p_ref, rtol=0, atol=1e-7)
    touched = torch.zeros(120, dtype=torch.bool)
    for g in grads:
        touched[g.indices()[0] * 10 + g.indices()[1]] = True
    if layout == "compact":
        assert ours.state[p_ours]["keys"].numel() == int(touched.sum())


def test_compact_state_is_smaller_and_reported():
    model = make_model("bert")
    basis = sparsegrad.estimate_basis(model, make_batches("bert", n=1), steps=1)
    model = sparsegrad.apply_method(model, {"name": "sparsegrad", "k": 0.02}, basis=basis)
    sizes = {}
    for layout in ("dense", "compact"):
        opt = sparsegrad.build_optimizer(model, lr=1e-3, schedule="constant", sparse_state=layout)
        for batch in make_batches("bert", n=2):
            model(**batch).loss.backward()
            opt.step()
            opt.zero_grad()
        sizes[layout] = opt.state_bytes_by_part()["sparse"]
        assert opt.state_bytes() == sum(opt.state_bytes_by_part().values())
    assert 0 < sizes["compact"] < sizes["dense"]


def test_clipping_with_sparse_grads_matches_dense_reference():
    torch.manual_seed(0)
    dense_p = nn.Parameter(torch.randn(5, 4))
    sparse_p = nn.Parameter(torch.randn(6, 3))
    dense_p.grad = torch.randn(5, 4) * 3
    # uncoalesced: index (1, 2) appears twice, so the dense-equivalent entry is their sum
    idx = torch.tensor([[1, 4, 1], [2, 0, 2]])
    sparse_p.grad = torch.sparse_coo_tensor(idx, torch.tensor([2.0, -5.0, 1.5]), (6, 3), check_invariants=True)
    ref_a, ref_b = dense_p.grad.clone(), sparse_p.grad.to_dense()
    ref_a_p, ref_b_p = nn.Parameter(torch.zeros(5, 4)), nn.Parameter(torch.zeros(6, 3))
    ref_a_p.grad, ref_b_p.grad = ref_a, ref_b
    ref_norm = torch.nn.utils.clip_grad_norm_([ref_a_p, ref_b_p], max_norm=1.0)
    norm = clip_grad_norm([dense_p, sparse_p], max_norm=1.0)
    torch.testing.assert_close(norm, ref_norm)
    torch.testing.assert_close(dense_p.grad, ref_a_p.grad)
    assert sparse_p.grad.is_sparse
    torch.testing.assert_close(sparse_p.grad.to_dense(), ref_b_p.grad)


def test_torch_norm_and_clipping_take_sparse_grads_as_their_dense_equivalent():
    """The norm kernel sparsegrad registers for sparse COO tensors (torch has none): every ord, with
    duplicate coordinates and implicit zeros; torch's own clip_grad_norm_ then equals ours."""
    import sparsegrad.integrations  # noqa: F401  (registers the kernel)

    idx = torch.tensor([[1, 4, 1, 0], [2, 0, 2, 1]])
    sparse = torch.sparse_coo_tensor(idx, torch.tensor([2.0, -5.0, 1.5, 0.25]), (6, 3), check_invariants=True)
    full = torch.sparse_coo_tensor(torch.tensor([[0, 0], [0, 1]]), torch.tensor([-3.0, 4.0]), (1, 2), check_invariants=True)
    for x in (sparse, full):
        for ord in (2, 1, 0.5, 3, float("inf"), 0, -1, float("-inf")):
            torch.testing.assert_close(torch.linalg.vector_norm(x, ord), torch.linalg.vector_norm(x.to_dense(), ord))
    dense = sparse.to_dense()
    torch.testing.assert_close(torch.linalg.vector_norm(sparse, keepdim=True, dtype=torch.float64),
                               torch.linalg.vector_norm(dense, keepdim=True, dtype=torch.float64))  # fmt: skip
    torch.testing.assert_close(torch.linalg.vector_norm(sparse, 2, dim=0), torch.linalg.vector_norm(dense, 2, dim=0))
    torch.manual_seed(0)
    ours, theirs = [nn.Parameter(torch.zeros(5, 4)), nn.Parameter(torch.zeros(6, 3))], []
    ours[0].grad, ours[1].grad = torch.randn(5, 4) * 3, sparse
    for p in ours:
        theirs.append(nn.Parameter(p.detach().clone()))
        theirs[-1].grad = p.grad.clone()
    torch.testing.assert_close(torch.nn.utils.clip_grad_norm_(theirs, max_norm=1.0), clip_grad_norm(ours, max_norm=1.0))
    for a, b in zip(ours, theirs):
        assert b.grad.is_sparse == a.grad.is_sparse
        torch.testing.assert_close(b.grad.to_dense(), a.grad.to_dense())


def _factors(schedule, warmup, total, n):
    clock = make_schedule(schedule, warmup, total)
    out = []
    for _ in range(n):
        out.append(clock.get_last_lr()[0])
        clock.optimizer.step()
        clock.step()
    return out


def test_schedules():
    assert _factors("linear", 0, 10, 6)[0] == 1.0 and _factors("linear", 0, 10, 6)[5] == 0.5
    assert _factors("linear", 4, 12, 9)[1] == 0.25 and _factors("linear", 4, 12, 9)[8] == 0.5
    assert _factors("constant", 2, None, 4) == [0.0, 0.5, 1.0, 1.0]
    with pytest.raises(ValueError, match="total_steps"):
        sparsegrad.build_optimizer(make_model("bert"), schedule="linear")
    with pytest.raises(ValueError, match="unknown schedule 'linar'.*valid: .*constant.*linear"):
        sparsegrad.build_optimizer(make_model("bert"), schedule="linar", total_steps=3)


def test_optimizer_learning_rates_follow_the_schedule_and_refuse_a_second_scheduler():
    model = make_model("bert")
    opt = sparsegrad.build_optimizer(model, lr=1.0, schedule="linear", warmup_steps=2, total_steps=6)
    assert isinstance(opt, torch.optim.Optimizer)
    seen = []
    for _ in range(6):
        seen.append(opt.get_last_lr()[0])
        opt.step()
    assert seen == [0.0, 0.5, 1.0, 0.75, 0.5, 0.25]
    # a scheduler of another library writes the learning rate too: refused at the next step
    opt = sparsegrad.build_optimizer(model, lr=1.0, schedule="linear", total_steps=6)
    torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 0.5)
    with pytest.raises(RuntimeError, match="schedule=None"):
        opt.step()
    # schedule=None: the other scheduler drives it
    opt = sparsegrad.build_optimizer(model, lr=1.0, schedule=None)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 0.5 ** step)
    for step in range(3):
        assert [g["lr"] for g in opt.dense.param_groups] == [0.5**step] * len(opt.dense.param_groups)
        opt.step()
        sched.step()


def test_max_grad_norm_zero_means_no_clipping():
    batches = make_batches("bert", n=1, seed=5)
    runs = {}
    for norm in (0.0, None, 1e-3):
        model = make_model("bert")
        opt = sparsegrad.build_optimizer(model, lr=1e-2, schedule="constant", max_grad_norm=norm)
        model(**batches[0]).loss.backward()
        opt.step()
        runs[norm] = torch.cat([p.detach().flatten() for p in model.parameters()])
    torch.testing.assert_close(runs[0.0], runs[None], rtol=0, atol=0)
    assert not torch.equal(runs[0.0], runs[1e-3])
    with pytest.raises(ValueError, match="max_grad_norm must be >= 0"):
        sparsegrad.build_optimizer(make_model("bert"), schedule="constant", max_grad_norm=-1.0)


def _train(model, opt, batches):
    losses = []
    for batch in batches:
        loss = model(**batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("layout", ["dense", "compact"])
def test_resume_continues_like_an_uninterrupted_run(layout):
    batches = make_batches("bert", n=6, seed=3)
    basis = sparsegrad.estimate_basis(make_model("bert"), batches[:1], steps=1)
    cfg = {"name": "sparsegrad", "k": 0.05}
    kwargs = {"lr": 3e-3, "schedule": "linear", "warmup_steps": 1, "total_steps": 6, "max_grad_norm": 1.0,
              "sparse_state": layout, "weight_decay": 0.01}  # fmt: skip

    def fresh():
        model = sparsegrad.apply_method(make_model("bert"), cfg, basis=basis)
        return model, sparsegrad.build_optimizer(model, **kwargs)

    model_a, opt_a = fresh()
    losses_a = _train(model_a, opt_a, batches)

    model_b, opt_b = fresh()
    losses_b = _train(model_b, opt_b, batches[:3])
    buf_model, buf_opt = io.BytesIO(), io.BytesIO()
    torch.save(model_b.state_dict(), buf_model)
    torch.save(opt_b.state_dict(), buf_opt)
    model_c, opt_c = fresh()
    model_c.load_state_dict(torch.load(io.BytesIO(buf_model.getvalue()), weights_only=True))
    opt_c.load_state_dict(torch.load(io.BytesIO(buf_opt.getvalue()), weights_only=True))
    losses_c = _train(model_c, opt_c, batches[3:])

    assert losses_b == losses_a[:3]
    torch.testing.assert_close(torch.tensor(losses_c), torch.tensor(losses_a[3:]), rtol=1e-6, atol=1e-7)
    state_a, state_c = model_a.state_dict(), model_c.state_dict()
    for key in state_a:
        if state_a[key].is_floating_point():
            torch.testing.assert_close(state_c[key], state_a[key], rtol=1e-5, atol=1e-6)
        else:
            assert torch.equal(state_c[key], state_a[key]), key
    assert opt_c.step_count == 6


def test_gradient_accumulation_sums_sparse_gradients():
    """Two backward passes before a step: the uncoalesced sparse sum equals the summed gradient."""
    batches = make_batches("bert", n=2, seed=9)
    basis = sparsegrad.estimate_basis(make_model("bert"), batches[:1], steps=1)
    model = sparsegrad.apply_method(make_model("bert"), {"name": "sparsegrad", "k": 30}, basis=basis)
    layer = model.bert.encoder.layer[0].intermediate.dense
    separate = []
    for batch in batches:
        model.zero_grad(set_to_none=True)
        model(**batch).loss.backward()
        separate.append(layer.weight.grad.to_dense())
    model.zero_grad(set_to_none=True)
    for batch in batches:
        model(**batch).loss.backward()
    assert layer.weight.grad.is_sparse
    torch.testing.assert_close(layer.weight.grad.to_dense(), separate[0] + separate[1])
    opt = sparsegrad.build_optimizer(model, lr=1e-3, schedule="constant", sparse_state="compact")
    before = layer.rotated_weight(torch.float64)
    opt.step()
    changed = ((layer.rotated_weight(torch.float64) - before).abs() > 1e-5).sum().item()
    assert 30 <= changed <= 60  # lazy: only the coordinates of W~ in the accumulated gradient moved


@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_weight_storage_trains_like_rotated_storage(weight_decay):
    """storage "weight" (only W kept, steps applied as u_out ΔW~ R^T) follows the trajectory of storage
    "rotated" (W~ kept) in float64, with weight decay too (the whole W~ decays, which is decaying W)."""
    batches = make_batches("bert", n=4, seed=5)
    basis = sparsegrad.estimate_basis(make_model("bert", dtype=torch.float64), batches[:1], steps=1,
                                      dtype=torch.float64, factor_dtype=torch.float64)
    runs = {}
    for storage in ("weight", "rotated"):
        model = sparsegrad.apply_method(make_model("bert", dtype=torch.float64),
                                        {"name": "sparsegrad", "k": 0.05, "storage": storage}, basis=basis)  # fmt: skip
        opt = sparsegrad.build_optimizer(model, lr=1e-2, schedule="constant", weight_decay=weight_decay)
        runs[storage] = (model, _train(model, opt, batches))
    (model_w, losses_w), (model_r, losses_r) = runs["weight"], runs["rotated"]
    merged_w, merged_r = sparsegrad.merge(model_w), sparsegrad.merge(model_r)
    torch.testing.assert_close(torch.tensor(losses_w), torch.tensor(losses_r), rtol=1e-10, atol=1e-12)
    for (name, a), (_, b) in zip(merged_w.state_dict().items(), merged_r.state_dict().items()):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11, msg=name)


def test_cached_weight_is_refreshed_incrementally_and_stays_exact():
    batches = make_batches("bert", n=4, seed=2)
    basis = sparsegrad.estimate_basis(make_model("bert"), batches[:1], steps=1)
    model = sparsegrad.apply_method(make_model("bert"), {"name": "sparsegrad", "k": 0.05, "storage": "rotated"},
                                    basis=basis)  # fmt: skip
    opt = sparsegrad.build_optimizer(model, lr=1e-2, schedule="constant", weight_decay=0.1)
    _train(model, opt, batches)
    layers = [m for m in model.modules() if isinstance(m, sparsegrad.SparseGradLinear)]
    for layer in layers:
        assert layer._n_incremental >= 3  # no full recomputation after the optimizer's steps
        assert layer._eff_key == layer._cache_key()
        exact = layer.to_linear().weight
        assert (layer.effective_weight - exact).norm() / exact.norm() < 1e-6
