"""The method registry: a method defined in this file runs through apply -> train -> merge -> account
without a change anywhere else, and every registered method passes the same matrix."""

import pytest
import torch
import torch.nn.functional as F
from method_fixtures import make_batches, make_model
from torch import nn

import sparsegrad
from sparsegrad import LayerBudget, Method, register_method, unregister_method
from sparsegrad.suite.run import methods as suite_methods


# -- a toy method: train only the rows of W with the largest gradient norm, ``rows`` of them per step ------
class _TopRowsFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, layer):
        ctx.save_for_backward(x, weight)
        ctx.layer, ctx.has_bias = layer, bias is not None
        return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, grad_y):
        x, weight = ctx.saved_tensors
        g, xs = grad_y.reshape(-1, grad_y.shape[-1]), x.reshape(-1, x.shape[-1])
        grad_w = g.t() @ xs
        top = grad_w.norm(dim=1).topk(ctx.layer.rows).indices.sort().values
        ctx.layer.touched[top] = True
        cols = torch.arange(weight.shape[1]).repeat(top.numel())
        indices = torch.stack([top.repeat_interleave(weight.shape[1]), cols])
        grad_w = torch.sparse_coo_tensor(indices, grad_w[top].reshape(-1), weight.shape, check_invariants=True)
        grad_b = g.sum(0) if ctx.has_bias else None
        return grad_y @ weight, grad_w, grad_b, None


class TopRowsLinear(nn.Module):
    def __init__(self, linear: nn.Linear, rows: int) -> None:
        super().__init__()
        self.out_features, self.in_features = linear.weight.shape
        self.rows = rows
        self.weight = nn.Parameter(linear.weight.detach().clone())
        self.bias = nn.Parameter(linear.bias.detach().clone()) if linear.bias is not None else None
        self.register_buffer("touched", torch.zeros(self.out_features, dtype=torch.bool))

    def forward(self, x):
        return _TopRowsFunction.apply(x, self.weight, self.bias, self)

    def to_linear(self) -> nn.Linear:
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None)
        with torch.no_grad():
            linear.weight.copy_(self.weight)
            if self.bias is not None:
                linear.bias.copy_(self.bias)
        return linear


class TopRows(Method):
    name = "top_rows"
    extra_options = {"rows": 2}
    layer_types = (TopRowsLinear,)

    def check(self, cfg):
        if cfg.option("rows") < 1:
            raise ValueError(f"rows must be >= 1, got {cfg.option('rows')}")

    def wrap(self, linear, cfg, target, basis=None):
        return TopRowsLinear(linear, cfg.option("rows"))

    def sparse_parameter(self, module):
        return module.weight

    def budget(self, module):
        k = module.rows * module.in_features
        return LayerBudget(module.weight, (module.out_features, module.in_features), k,
                           int(module.touched.sum()) * module.in_features)  # fmt: skip


@pytest.fixture
def top_rows():
    register_method(TopRows)
    yield TopRows
    unregister_method("top_rows")


def _train(model, batches, optimizer):
    model.train()
    for batch in batches:
        model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()


@torch.no_grad()
def _logits(model, batch):
    model.eval()
    return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


def test_a_method_registered_here_runs_apply_train_merge_account(top_rows):
    assert "top_rows" in sparsegrad.METHODS and "top_rows" in suite_methods.METHOD_KINDS
    assert "top_rows" not in suite_methods.BASIS_KINDS
    with pytest.raises(ValueError, match="rows must be >= 1"):
        sparsegrad.MethodConfig.from_any({"name": "top_rows", "rows": 0})

    model = make_model("bert")
    targets = [t.name for t in sparsegrad.find_targets(model)]
    before = {name: model.get_submodule(name).weight.detach().clone() for name in targets}
    model = sparsegrad.apply_method(model, {"name": "top_rows", "rows": 3, "train_non_mlp": False})
    assert all(isinstance(model.get_submodule(name), TopRowsLinear) for name in targets)
    assert model.sparsegrad_method.option("rows") == 3

    optimizer = sparsegrad.build_optimizer(model, lr=1e-2, schedule="constant")
    target_weights = {id(model.get_submodule(name).weight) for name in targets}
    assert {id(p) for g in optimizer.sparse.param_groups for p in g["params"]} == target_weights
    batches = make_batches("bert", n=3)
    _train(model, batches, optimizer)

    acc = sparsegrad.account(model)
    assert [layer.kind for layer in acc.sparse_layers] == ["top_rows"] * len(targets)
    for layer, name in zip(acc.sparse_layers, targets, strict=True):
        moved = (model.get_submodule(name).weight.detach() != before[name]).any(dim=1)
        assert 3 <= int(moved.sum()) <= 3 * len(batches)  # only the chosen rows moved
        assert layer.k == 3 * layer.shape[1] and layer.updated == int(moved.sum()) * layer.shape[1]
    biases = sum(model.get_submodule(name).bias.numel() for name in targets)
    assert acc.trainable_dense == biases  # MLP-only setting: the weights are sparse, the biases dense

    trained = _logits(model, batches[0])
    merged = sparsegrad.merge(model)
    assert all(type(merged.get_submodule(name)) is nn.Linear for name in targets)
    assert not hasattr(merged, "sparsegrad_method")
    torch.testing.assert_close(_logits(merged, batches[0]), trained)

    settings = suite_methods.MethodSettings(name="top_rows", kind="top_rows", k=0.5, options={"rows": 2})
    assert suite_methods.method_config(settings) == {"name": "top_rows", "train_non_mlp": True, "rows": 2}


def test_registry_errors_speak_to_the_user(top_rows):
    with pytest.raises(ValueError, match="already registered"):
        register_method(TopRows)
    with pytest.raises(ValueError, match="unknown method option"):
        sparsegrad.MethodConfig.from_any({"name": "full", "rows": 2})  # another method's option
    with pytest.raises(ValueError, match="valid: full, lora, meprop, sparsegrad, leading_block, shira, top_rows"):
        sparsegrad.get_method("topk_rows")
    with pytest.raises(TypeError, match="Method subclass or instance"):
        register_method(TopRowsLinear)


SMALL = {"k": 0.1, "lora_rank": 4, "lora_alpha": 8}  # small settings for every option a method reads


@pytest.mark.parametrize("name", list(sparsegrad.METHODS))
def test_every_registered_method_trains_merges_and_accounts(name):
    method = sparsegrad.get_method(name)
    cfg = {"name": name, **{key: value for key, value in SMALL.items() if key in method.options}}
    model = make_model("bert")
    batches = make_batches("bert", n=3)
    basis = sparsegrad.estimate_basis(model, batches[:2], steps=2) if method.needs_basis else None
    model = sparsegrad.apply_method(model, cfg, basis=basis)
    optimizer = sparsegrad.build_optimizer(model, lr=1e-2, schedule="constant")
    _train(model, batches, optimizer)

    acc = sparsegrad.account(model)
    assert acc.method == name and acc.trainable_dense > 0
    for layer in acc.sparse_layers:
        assert layer.kind == name and 0 < layer.updated <= layer.shape[0] * layer.shape[1]
    trained = _logits(model, batches[0])
    merged = sparsegrad.merge(model)
    assert not any(sparsegrad.registry.method_for_layer(m) for m in merged.modules())
    torch.testing.assert_close(_logits(merged, batches[0]), trained, rtol=1e-4, atol=1e-5)
