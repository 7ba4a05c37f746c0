"""Precision of the method layer: float32 master copies on bf16 models, bit-exact optimizer resume,
the float32 autocast cache and one meaning of weight decay.

References are computed in float64 from the gradients the tested run actually produced, so a test
measures what the bf16 arithmetic keeps, not a difference of trajectories."""

import copy
import io

import pytest
import torch
from method_fixtures import make_batches, make_model

import sparsegrad
from sparsegrad.methods.leading_block.layer import LeadingBlockLinear
from sparsegrad.optim import LazySparseAdam, sparse_param, sparse_weight_modules

LR_CODE = 9e-5  # the learning rate of the authors' LLaMA code


def _small_llama(dtype, seed=0):
    """One LLaMA block with 64 x 160 MLP matrices (10,240 entries: k = 0.22% is 23 entries)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=160, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64,
                      pad_token_id=0, tie_word_embeddings=False)  # fmt: skip
    return LlamaForCausalLM(cfg).to(dtype)


def _effective_change64(layer, start) -> torch.Tensor:
    """The change of the layer's W since ``start`` (a float64 snapshot from _trained_value), in float64."""
    now = _trained_value(layer)
    delta = now - start
    if isinstance(layer, sparsegrad.SparseGradLinear) and layer.storage == "rotated":
        r = layer.right_rotation().double()
        return layer.u_out.double() @ delta @ r.t()
    return delta


def _trained_value(layer) -> torch.Tensor:
    """The most precise W (weight storage, MeProp, leading block) or W~ (rotated storage), float64."""
    if isinstance(layer, LeadingBlockLinear):
        layer.fold()
        w = layer.weight_master if layer.weight_master is not None else layer.weight
    else:
        w = layer.weight_master if layer.weight_master is not None else layer.weight
    return w.detach().double().clone()


def _reference_change64(layer, grads, lr) -> torch.Tensor:
    """The float64 lazy-Adam update of the recorded gradients, as a change of W in float64."""
    p = torch.nn.Parameter(torch.zeros(sparse_param(layer).shape, dtype=torch.float64))
    opt = LazySparseAdam([p], lr=lr)
    for g in grads:
        p.grad = g.double()
        opt.step()
    delta = p.detach()
    if isinstance(layer, sparsegrad.SparseGradLinear):
        return layer.u_out.double() @ delta @ layer.right_rotation().double().t()
    if isinstance(layer, LeadingBlockLinear):
        return layer.u_out.double() @ delta @ layer.u_in.double().t()
    return delta


METHOD_CASES = {
    "sparsegrad-weight": {"name": "sparsegrad", "storage": "weight"},
    "sparsegrad-rotated": {"name": "sparsegrad", "storage": "rotated"},
    "meprop": {"name": "meprop"},
    "leading_block": {"name": "leading_block"},
}


@pytest.mark.parametrize("case", sorted(METHOD_CASES))
def test_bf16_model_keeps_the_float32_update_of_sparse_steps(case):
    """10 steps at lr 9e-5 with k = 0.22% of each MLP matrix on a bf16 model: the change of W held by
    the float32 master copy is the float64 lazy-Adam update of the same gradients (>= 99% of it)."""
    batches = make_batches("llama", n=10, seed=4)
    cfg = {**METHOD_CASES[case], "k": 0.0022, "train_non_mlp": False}
    model = _small_llama(torch.bfloat16)
    basis = None
    if cfg["name"] in ("sparsegrad", "leading_block"):
        basis = sparsegrad.estimate_basis(_small_llama(torch.float32), batches[:2], steps=2)
    model = sparsegrad.apply_method(model, cfg, basis=basis)
    layers = sparse_weight_modules(model)
    assert layers and all(m.master_pairs() for m in layers.values())
    opt = sparsegrad.build_optimizer(model, lr=LR_CODE, schedule="constant")
    start = {name: _trained_value(m) for name, m in layers.items()}
    grads = {name: [] for name in layers}
    for batch in batches:
        model(**batch).loss.backward()
        for name, m in layers.items():
            grads[name].append(sparse_param(m).grad.coalesce().clone())
        opt.step()
        opt.zero_grad()
    for name, m in layers.items():
        ref = _reference_change64(m, grads[name], LR_CODE)
        got = _effective_change64(m, start[name])
        share = float((got * ref).sum() / (ref * ref).sum())
        assert share >= 0.99, (name, share)
        assert float((got - ref).norm() / ref.norm()) < 0.01, name
        # the bf16 parameter the forward uses is the master rounded
        master = m.block_master if isinstance(m, LeadingBlockLinear) else m.weight_master
        assert torch.equal(sparse_param(m).detach(), master.to(torch.bfloat16))


def _update_of_run(model, batches, basis) -> dict[str, torch.Tensor]:
    """Train ``model`` (SparseGrad, k = 0.22%, MLP only) 10 steps at lr 9e-5 with the public API; the
    change of each layer's W (the float32 master copy on a bf16 model), in float64."""
    cfg = {"name": "sparsegrad", "k": 0.0022, "train_non_mlp": False}
    model = sparsegrad.apply_method(model, cfg, basis=basis)
    layers = sparse_weight_modules(model)
    start = {name: _trained_value(m) for name, m in layers.items()}
    opt = sparsegrad.build_optimizer(model, lr=LR_CODE, schedule="constant")
    for batch in batches:
        model(**batch).loss.backward()
        opt.step()
        opt.zero_grad()
    return {name: _effective_change64(m, start[name]) for name, m in layers.items()}


def test_basis_of_a_bf16_model_keeps_the_float32_update():
    """estimate_basis on a bf16 model runs its passes in float32: the basis is the one of the same
    weights in float32 (bit for bit), the model comes back unchanged in bf16, and the bf16 run with
    master copies keeps >= 99% of the float32 run's update of every layer (share = <dW_bf16, dW_fp32> /
    |dW_fp32|^2, as above; the float32 run starts from the same weights, in float32, with its own basis).
    With the passes in bf16 (pass_dtype=None) the same run keeps 98.3% (up) and 96.2% (down)."""
    batches = make_batches("llama", n=10, seed=4)
    bf16 = _small_llama(torch.bfloat16)
    before = {k: v.clone() for k, v in bf16.state_dict().items()}
    basis = sparsegrad.estimate_basis(bf16, batches, steps=10)
    assert basis.stats["pass_dtype"] == "float32"
    for key, value in bf16.state_dict().items():
        assert value.dtype == before[key].dtype and torch.equal(value, before[key]), key
    fp32 = _small_llama(torch.bfloat16).float()
    basis32 = sparsegrad.estimate_basis(fp32, batches, steps=10)
    assert basis32.stats["pass_dtype"] is None  # a float32 model is not touched
    for key, group in basis.groups.items():
        assert torch.equal(group.u_in, basis32[key].u_in) and torch.equal(group.u_out, basis32[key].u_out), key
    reference = _update_of_run(fp32, batches, basis32)
    got = _update_of_run(bf16, batches, basis)
    for name, ref in reference.items():
        share = float((got[name] * ref).sum() / (ref * ref).sum())
        assert share >= 0.99, (name, share)


def test_float32_model_has_no_master_copies_and_accounts_them_on_bf16():
    batches = make_batches("llama", n=1)
    cfg = {"name": "sparsegrad", "k": 0.01, "train_non_mlp": False}
    basis = sparsegrad.estimate_basis(make_model("llama"), batches, steps=1)
    fp32 = sparsegrad.apply_method(make_model("llama"), cfg, basis=basis)
    assert sparsegrad.account(fp32).master_bytes == 0
    bf16 = sparsegrad.apply_method(make_model("llama", dtype=torch.bfloat16), cfg, basis=basis)
    layers = [m for m in bf16.modules() if isinstance(m, sparsegrad.SparseGradLinear)]
    assert sparsegrad.account(bf16).master_bytes == sum(4 * m.in_features * m.out_features for m in layers)
    merged = sparsegrad.merge(bf16)
    assert merged.model.layers[0].mlp.up_proj.weight.dtype == torch.bfloat16


# ------------------------------------------------------------------------------------------ resume
RESUME_CASES = {
    "full": {"name": "full"},
    "lora": {"name": "lora", "lora_rank": 2},
    "meprop": {"name": "meprop", "k": 0.05},
    "meprop-output": {"name": "meprop", "meprop_mode": "output", "meprop_k_per_row": 0.25},
    "sparsegrad-weight": {"name": "sparsegrad", "k": 0.05, "storage": "weight"},
    "sparsegrad-rotated": {"name": "sparsegrad", "k": 0.05, "storage": "rotated"},
    "leading_block": {"name": "leading_block", "k": 0.05},
    "leading_block-dense": {"name": "leading_block", "k": 0.05, "block_factor": 1.0},
}


def _state_bytes(model, opt) -> bytes:
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buf)
    return buf.getvalue()


DENSE_ONLY = ("full", "lora", "meprop-output", "leading_block-dense")  # no state layout to choose
LAYOUT_CASES = [(c, "dense") for c in sorted(RESUME_CASES)] + [
    (c, "compact") for c in sorted(RESUME_CASES) if c not in DENSE_ONLY
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize(("case", "layout"), LAYOUT_CASES)
def test_resume_is_bit_exact(case, layout, dtype):
    """3 steps, save, load into a fresh model, 3 more steps == 6 uninterrupted steps, bit for bit
    (losses, parameters, buffers, master copies and optimizer state)."""
    batches = make_batches("llama", n=6, seed=3)
    cfg = {**RESUME_CASES[case], "train_non_mlp": False}
    basis = sparsegrad.estimate_basis(make_model("llama"), batches[:1], steps=1)
    kwargs = {"lr": 3e-3, "schedule": "linear", "warmup_steps": 1, "total_steps": 6, "max_grad_norm": 1.0,
              "sparse_state": layout, "weight_decay": 0.01}  # fmt: skip

    def fresh():  # each model its own basis tensors, as in separate processes (loading writes into them)
        torch.manual_seed(0)
        model = sparsegrad.apply_method(make_model("llama", dtype=dtype), cfg, basis=copy.deepcopy(basis))
        return model, sparsegrad.build_optimizer(model, **kwargs)

    def train(model, opt, part):
        losses = []
        for batch in part:
            loss = model(**batch).loss
            loss.backward()
            opt.step()
            opt.zero_grad()
            losses.append(loss.detach())
        return torch.stack(losses)

    model_a, opt_a = fresh()
    losses_a = train(model_a, opt_a, batches)
    model_b, opt_b = fresh()
    train(model_b, opt_b, batches[:3])
    saved = torch.load(io.BytesIO(_state_bytes(model_b, opt_b)), weights_only=True)
    model_c, opt_c = fresh()
    model_c.load_state_dict(saved["model"])
    opt_c.load_state_dict(saved["opt"])
    losses_c = train(model_c, opt_c, batches[3:])

    assert torch.equal(losses_c, losses_a[3:])
    state_a, state_c = model_a.state_dict(), model_c.state_dict()
    assert state_a.keys() == state_c.keys()
    for key in state_a:
        assert state_c[key].dtype == state_a[key].dtype and torch.equal(state_c[key], state_a[key]), key
    opt_state_a = torch.load(io.BytesIO(_state_bytes(model_a, opt_a)), weights_only=True)["opt"]
    opt_state_c = torch.load(io.BytesIO(_state_bytes(model_c, opt_c)), weights_only=True)["opt"]
    _assert_same_tree(opt_state_c, opt_state_a)


def _assert_same_tree(a, b, path="opt"):
    if torch.is_tensor(b):
        assert torch.is_tensor(a) and a.dtype == b.dtype and torch.equal(a, b), path
    elif isinstance(b, dict):
        assert a.keys() == b.keys(), path
        for k in b:
            _assert_same_tree(a[k], b[k], f"{path}.{k}")
    elif isinstance(b, (list, tuple)):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_same_tree(x, y, f"{path}[{i}]")
    else:
        assert a == b, path


def _coo(flat, values, numel):
    return torch.sparse_coo_tensor(flat[None, :], values, (numel,), check_invariants=True).coalesce()


@pytest.mark.parametrize(
    ("numel", "dtype", "master"),
    [(2**24 + 8, torch.float32, False), (1000, torch.bfloat16, False), (1000, torch.bfloat16, True)],
    ids=["fp32-beyond-2^24", "bf16", "bf16-master"],
)
def test_compact_state_resumes_with_exact_keys(numel, dtype, master):
    """Coordinates float32 (above 2^24) or bf16 (above 256) cannot hold survive a save and load: keys
    stay int32, moments keep their dtype, and the resumed run is the uninterrupted one."""
    top = numel - 1
    coords = [torch.tensor([3, top - 6, top - 4, top - 2]), torch.tensor([top - 5, top - 4, top]),
              torch.tensor([3, top - 3, top - 1])]  # fmt: skip
    gen = torch.Generator().manual_seed(0)
    grads = [_coo(c, torch.randn(c.numel(), generator=gen), numel) for c in coords * 2]

    def fresh():
        p = torch.nn.Parameter(torch.zeros(numel, dtype=dtype))
        opt = LazySparseAdam([p], lr=1e-2, weight_decay=0.0, state_layout="compact")
        m = None
        if master:
            m = torch.zeros(numel, dtype=torch.float32)
            opt.register_master(p, m)
        return p, opt, m

    def run(p, opt, part):
        for g in part:
            p.grad = g.to(dtype)
            opt.step()

    p_a, opt_a, m_a = fresh()
    run(p_a, opt_a, grads)
    p_b, opt_b, m_b = fresh()
    run(p_b, opt_b, grads[:3])
    buf = io.BytesIO()
    torch.save({"opt": opt_b.state_dict(), "p": p_b.detach(), "m": m_b}, buf)
    saved = torch.load(io.BytesIO(buf.getvalue()), weights_only=True)
    p_c, opt_c, m_c = fresh()
    with torch.no_grad():
        p_c.copy_(saved["p"])
        if master:
            m_c.copy_(saved["m"])
    opt_c.load_state_dict(saved["opt"])
    state = opt_c.state[p_c]
    assert state["keys"].dtype == torch.int32
    assert torch.equal(state["keys"], opt_b.state[p_b]["keys"])
    assert state["exp_avg"].dtype == (torch.float32 if master else dtype)
    run(p_c, opt_c, grads[3:])
    assert torch.equal(p_c.detach(), p_a.detach())
    for name in ("keys", "exp_avg", "exp_avg_sq"):
        assert torch.equal(opt_c.state[p_c][name], opt_a.state[p_a][name]), name
    assert opt_a.state[p_a]["keys"].numel() == 8  # eight distinct coordinates, eight pairs of moments
    if master:
        assert torch.equal(m_c, m_a)


# --------------------------------------------------------------------------------- autocast cache
def test_cached_weight_is_float32_under_bf16_autocast():
    from method_fixtures import random_orthogonal

    torch.manual_seed(0)
    linear = torch.nn.Linear(24, 40)
    layer = sparsegrad.SparseGradLinear.from_linear(linear, random_orthogonal(24, 1), random_orthogonal(40, 2), 30,
                                                    storage="rotated")  # fmt: skip
    with torch.no_grad():
        layer.weight[2, 3] += 0.5  # invalidates the cache: the next forward rebuilds it
    x = torch.randn(5, 24)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        layer(x)
    eff = layer.effective_weight
    assert eff.dtype == torch.float32
    exact = layer.u_out.double() @ layer.weight.detach().double() @ layer.right_rotation().double().t()
    assert float((eff.double() - exact).norm() / exact.norm()) < 1e-6


# ----------------------------------------------------------------------------------- weight decay
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
def test_both_storages_follow_one_trajectory_with_weight_decay(dtype):
    """Weight decay 0.05 over 12 steps: storage "weight" (decays W) and storage "rotated" (decays W~,
    the same thing) end at the same W to 1e-6."""
    batches = make_batches("bert", n=12, seed=5)
    basis = sparsegrad.estimate_basis(make_model("bert", dtype=torch.float64), batches[:1], steps=1,
                                      dtype=torch.float64, factor_dtype=torch.float64)  # fmt: skip
    merged = {}
    for storage in ("weight", "rotated"):
        model = sparsegrad.apply_method(make_model("bert", dtype=dtype),
                                        {"name": "sparsegrad", "k": 0.05, "storage": storage}, basis=basis)  # fmt: skip
        opt = sparsegrad.build_optimizer(model, lr=1e-2, schedule="constant", weight_decay=0.05)
        for batch in batches:
            model(**batch).loss.backward()
            opt.step()
            opt.zero_grad()
        merged[storage] = sparsegrad.merge(model).state_dict()
    for key, w in merged["weight"].items():
        if w.is_floating_point():
            assert float((w.double() - merged["rotated"][key].double()).abs().max()) < 1e-6, key


def test_lazy_adam_weight_decay_is_adamw_decay_of_the_whole_parameter():
    """Touched coordinates: torch.optim.SparseAdam's step after decoupled decay; untouched ones shrink
    by (1 - lr wd) per step, as under AdamW (float64)."""
    gen = torch.Generator().manual_seed(0)
    p_ref = torch.nn.Parameter(torch.randn(8, 6, generator=gen, dtype=torch.float64))
    p_ours = torch.nn.Parameter(p_ref.detach().clone())
    start = p_ref.detach().clone()
    lr, wd = 0.01, 0.1
    ref = torch.optim.SparseAdam([p_ref], lr=lr)
    ours = LazySparseAdam([p_ours], lr=lr, weight_decay=wd)
    for step in range(5):
        flat = torch.tensor([step, 7, 20 + step])
        idx = torch.stack([flat // 6, flat % 6])
        g = torch.sparse_coo_tensor(idx, torch.randn(3, generator=gen, dtype=torch.float64), (8, 6),
                                    check_invariants=True).coalesce()
        with torch.no_grad():
            p_ref.mul_(1 - lr * wd)
        p_ref.grad, p_ours.grad = g, g.clone()
        ref.step()
        ours.step()
    torch.testing.assert_close(p_ours.detach(), p_ref.detach(), rtol=1e-14, atol=1e-15)
    assert float(p_ours.detach()[7, 5]) == pytest.approx(float(start[7, 5]) * (1 - lr * wd) ** 5, rel=1e-14)  # never touched


# ------------------------------------------------------------------------- the authors' baselines
def test_authors_lora_has_scale_one_over_r_kaiming_a_over_r_zero_b_no_dropout():
    batches = make_batches("bert", n=1)
    base = make_model("bert")
    with torch.no_grad():
        expected = base(**batches[0]).logits
    model = sparsegrad.apply_method(make_model("bert"), {"name": "lora", "lora_rank": 4, "lora_variant": "authors"})
    adapted = [m for m in model.modules() if hasattr(m, "lora_A") and isinstance(getattr(m, "scaling", None), dict)]
    assert adapted
    for m in adapted:
        assert m.scaling["default"] == pytest.approx(1 / 4)
        assert isinstance(m.lora_dropout["default"], torch.nn.Identity)
        a = m.lora_A["default"].weight.detach()
        assert a.shape[0] == 4 and float(a.abs().max()) <= 0.5  # U(-1/sqrt(r), 1/sqrt(r))
        assert float(a.abs().max()) > 0.4  # not peft's U(-1/sqrt(in), 1/sqrt(in)) = U(-0.18, 0.18) here
        assert not m.lora_B["default"].weight.detach().any()
    with torch.no_grad():
        torch.testing.assert_close(model(**batches[0]).logits, expected)  # B = 0: the base model's function
    standard = sparsegrad.apply_method(make_model("bert"), {"name": "lora", "lora_rank": 4})
    assert next(m.scaling["default"] for m in standard.modules()
                if hasattr(m, "lora_A") and isinstance(getattr(m, "scaling", None), dict)) == 1.0
    with pytest.raises(ValueError, match="lora_variant='authors' fixes alpha"):
        sparsegrad.MethodConfig(name="lora", lora_variant="authors", lora_alpha=8)
    with pytest.raises(ValueError, match="valid: standard, authors"):
        sparsegrad.MethodConfig(name="lora", lora_variant="paper")


def test_meprop_under_dense_adamw_moves_weights_outside_the_top_k():
    """The authors' MeProp: the top-k gradient arrives dense, AdamW's momentum keeps moving earlier
    coordinates; the lazy variant moves only the coordinates of some step's top-k."""
    batches = make_batches("bert", n=3, seed=2)
    k = 20
    moved = {}
    for optimizer in ("adamw", "lazy_adam"):
        model = sparsegrad.apply_method(make_model("bert"), {"name": "meprop", "k": k, "meprop_optimizer": optimizer})
        layer = model.bert.encoder.layer[0].intermediate.dense
        before = layer.weight.detach().clone()
        opt = sparsegrad.build_optimizer(model, lr=1e-2, schedule="constant")
        assert (opt.sparse is None) == (optimizer == "adamw")
        union = torch.zeros_like(before, dtype=torch.bool)
        for batch in batches:
            model(**batch).loss.backward()
            g = layer.weight.grad
            dense = g.to_dense() if g.is_sparse else g
            assert g.is_sparse == (optimizer == "lazy_adam") and int(dense.ne(0).sum()) == k
            union |= dense.ne(0)
            opt.step()
            opt.zero_grad()
        changed = layer.weight.detach().ne(before)
        assert not (changed & ~union).any()  # neither moves a coordinate no top-k ever held
        moved[optimizer] = int(changed.sum())
        if optimizer == "lazy_adam":
            assert moved[optimizer] == int(union.sum())
    with pytest.raises(ValueError, match="meprop_mode='output' gives a dense weight gradient"):
        sparsegrad.MethodConfig(name="meprop", meprop_mode="output", meprop_optimizer="lazy_adam")


def test_a_model_converted_to_bf16_after_apply_gets_its_master_copies_at_build_optimizer():
    batches = make_batches("llama", n=2)
    basis = sparsegrad.estimate_basis(make_model("llama"), batches[:1], steps=1)
    for cfg in ({"name": "sparsegrad", "k": 0.05, "storage": "rotated"}, {"name": "meprop", "k": 0.05},
                {"name": "leading_block", "k": 0.05}):
        model = sparsegrad.apply_method(make_model("llama"), {**cfg, "train_non_mlp": False}, basis=basis)
        assert sparsegrad.account(model).master_bytes == 0
        model.to(torch.bfloat16)
        opt = sparsegrad.build_optimizer(model, lr=1e-3, schedule="constant")
        assert sparsegrad.account(model).master_bytes > 0, cfg["name"]
        for batch in batches:
            model(**batch).loss.backward()
            opt.step()
            opt.zero_grad()
        for m in sparse_weight_modules(model).values():
            master = m.block_master if isinstance(m, LeadingBlockLinear) else m.weight_master
            assert master.dtype == torch.float32
            assert torch.equal(sparse_param(m).detach(), master.to(torch.bfloat16))
