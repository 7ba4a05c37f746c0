"""LeadingBlockLinear: SparseGrad restricted to the leading block of the transition basis.

Why. The exact :class:`~sparsegrad.methods.sparsegrad.layer.SparseGradLinear` keeps the top-k entries of the whole
rotated gradient ``dL/dW~ = u_out^T (dL/dW) R`` (``R = u_in``, HOSVD orientation). To find them it
must form all of ``dL/dW~``: rotations cost ``T (in^2 + out^2)`` multiply-adds per layer and step
(per token) or ``out in (in + out)`` (once per step), on top of the ``T in out`` of the plain weight
gradient, and it must fold a k-sparse change of W~ back into the effective weight. The transition
basis orders its directions by gradient energy (columns of ``u_in`` / ``u_out`` by decreasing Gram
eigenvalue), and on real gradients the top-k entries of ``dL/dW~`` concentrate in its leading rows
and columns (measured in ``results/bench/*.md``). This layer trains only that leading block.

Math (row vectors, ``y = x W^T + b``, W out x in). With ``U_r = u_out[:, :r]`` (out x r) and
``V_c = R[:, :c]`` (in x c; ``R = u_in`` for orientation "hosvd", ``u_in^T`` for "official")::

    W = W0 + U_r B V_c^T                      (B: r x c, trainable, starts at 0)
      = u_out (W~0 + [B 0; 0 0]) R^T          i.e. W~[:r, :c] += B: SparseGrad on the leading block
    y = x W^T + b                              (exact: W is kept materialised, see below)
    dL/dB  = U_r^T (dL/dY)^T X V_c = (G U_r)^T (X V_c)        = dL/dW~[:r, :c]
    dL/dX  = G W,        dL/db = sum_tokens G

so ``dL/dB`` is exactly the leading block of the exact method's ``dL/dW~``, computed with
``T (out r + in c + r c)`` multiply-adds as ``(G U_r)^T (X V_c)`` (LoRA with rank r on the output side
and c on the input side), or ``T c (in + out) + out r c`` as ``U_r^T (G^T (X V_c))``, or the mirror
order, whichever is cheapest (:func:`block_gradient`), and no ``in^2``/``out^2`` rotation is ever done. With ``k < r c`` the gradient keeps only its
``k`` largest-magnitude entries (exact-k, as :func:`sparsegrad.kernels.topk_coo`) and is returned as
sparse COO (optimise it with :class:`sparsegrad.LazySparseAdam`, see :func:`build_optimizer`);
with ``k = r c`` (``block_factor=1``) the block is trained densely by any optimizer.

The effective weight ``W`` is a buffer (no gradient, no optimizer state). When ``B`` has changed
since the last forward (an optimizer step), the change ``D = B - B_applied`` is folded in once:
``W += (U_r D) V_c^T`` — ``out r c + out c in`` multiply-adds per step, no extra weight copy. The
fold accumulates float32 rounding of order ``eps |W|`` per step (a random walk; ~1e-6 relative after
thousands of steps), checked against a float64 recomposition in ``tests/bench``.

In a bf16/fp16 layer B and W have float32 master copies (buffers ``block_master``, ``weight_master``):
the optimizer steps ``block_master`` (see :func:`sparsegrad.build_optimizer`), the fold adds to
``weight_master`` in float32 and rounds it into ``weight`` — a fold into the bf16 W directly would
lose a small change of B to rounding.

Rows of dL/dY that are entirely zero (padding) are dropped before the backward products when
``sparse_by_dense`` is on (paper §3.3), as in the exact layer.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from sparsegrad.kernels import apply_to_rows, drop_zero_rows, resolve_k, scatter_rows, topk_coo
from sparsegrad.layer_common import (
    ORIENTATIONS,
    TOPK_AT,
    check_data_parallel,
    copy_weight_and_bias,
    current_master,
    float32_master,
    needs_master,
    plain_linear,
    save_linear_context,
)
from sparsegrad.optim import SparseGradOptimizer
from sparsegrad.optim import build_optimizer as build_sparsegrad_optimizer
from sparsegrad.targets import find_targets, set_submodule

__all__ = ["LeadingBlockLinear", "leading_block_shape", "apply_leading_block", "merge_leading_block",
           "build_optimizer", "block_gradient", "block_gradient_macs"]  # fmt: skip


def leading_block_shape(out_features: int, in_features: int, entries: int) -> tuple[int, int]:
    """(rows, cols) of a leading block with at least ``entries`` entries and the matrix's aspect ratio."""
    entries = min(max(1, int(entries)), out_features * in_features)
    scale = math.sqrt(entries / (out_features * in_features))
    rows = min(out_features, max(1, round(out_features * scale)))
    cols = min(in_features, max(1, math.ceil(entries / rows)))
    return rows, cols


BLOCK_GRAD_ORDERS = ("project_both", "project_input_first", "project_output_first")


def block_gradient_macs(n_rows: int, d_in: int, d_out: int, rows: int, cols: int) -> dict[str, int]:
    """Multiply-adds of the three association orders of dL/dB = U_r^T G^T X V_c."""
    return {
        "project_both": n_rows * (d_out * rows + d_in * cols + rows * cols),  # (G U_r)^T (X V_c)
        "project_input_first": n_rows * cols * (d_in + d_out) + d_out * rows * cols,  # U_r^T (G^T (X V_c))
        "project_output_first": n_rows * rows * (d_out + d_in) + rows * d_in * cols,  # ((G U_r)^T X) V_c
    }


def block_gradient(g: torch.Tensor, x: torch.Tensor, u_out: torch.Tensor, u_in: torch.Tensor,
                   order: str | None = None) -> torch.Tensor:
    """dL/dB = U_r^T G^T X V_c (G: rows x out, X: rows x in) in the association order with the fewest
    multiply-adds (or the given ``order``, one of :data:`BLOCK_GRAD_ORDERS`)."""
    if order is None:
        costs = block_gradient_macs(g.shape[0], x.shape[1], g.shape[1], u_out.shape[1], u_in.shape[1])
        order = min(costs, key=costs.get)
    if order == "project_both":
        return (g @ u_out).t() @ (x @ u_in)
    if order == "project_input_first":
        return u_out.t() @ (g.t() @ (x @ u_in))
    if order == "project_output_first":
        return ((g @ u_out).t() @ x) @ u_in
    raise ValueError(f"unknown order {order!r}; valid: {', '.join(BLOCK_GRAD_ORDERS)}")


class _LeadingBlockFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, block, bias, layer):
        save_linear_context(ctx, x, bias, layer, x, layer.weight)
        return F.linear(x, layer.weight, bias)

    @staticmethod
    def backward(ctx, grad_y):
        layer = ctx.layer
        x, weight = ctx.saved_tensors
        n_tokens = grad_y.shape[0]
        rows, g, xs = drop_zero_rows(grad_y, x, layer.sparse_by_dense, weight.dtype)
        grad_x = grad_block = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = scatter_rows(g @ weight, rows, n_tokens).to(ctx.x_dtype)
        if ctx.needs_input_grad[1]:
            grad_block = block_gradient(g, xs, layer.u_out, layer.u_in)
            if layer.k < grad_block.numel() and layer.topk_at == "backward":
                grad_block = topk_coo(grad_block, layer.k)
        if ctx.needs_input_grad[2] and ctx.has_bias:
            grad_b = g.sum(0)
        return grad_x, grad_block, grad_b, None


class LeadingBlockLinear(nn.Module):
    """A Linear layer whose change is confined to the leading ``rows x cols`` block of W~ (module doc).

    Parameters: ``block`` (B, rows x cols, starts at 0) and ``bias``. Buffers: ``weight`` (the
    effective W, out x in), ``u_in`` (in x cols: leading columns of R), ``u_out`` (out x rows) and
    ``block_applied`` (the value of B folded into ``weight``).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        rows: int,
        cols: int,
        k: int | None = None,
        bias: bool = True,
        *,
        sparse_by_dense: bool = True,
        topk_at: str = "backward",
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        if topk_at not in TOPK_AT:
            raise ValueError(f"unknown topk_at {topk_at!r}; valid: {', '.join(TOPK_AT)}")
        self.topk_at = topk_at
        if not (1 <= rows <= out_features and 1 <= cols <= in_features):
            raise ValueError(f"block {rows}x{cols} does not fit a {out_features}x{in_features} weight")
        factory = {"device": device, "dtype": dtype}
        self.in_features, self.out_features = in_features, out_features
        self.rows, self.cols = rows, cols
        self.k = rows * cols if k is None else min(resolve_k(k, rows * cols), rows * cols)
        self.sparse_by_dense = sparse_by_dense
        self.block = nn.Parameter(torch.zeros(rows, cols, **factory))
        self.bias = nn.Parameter(torch.zeros(out_features, **factory)) if bias else None
        self.register_buffer("weight", torch.empty(out_features, in_features, **factory))
        self.register_buffer("u_in", torch.eye(in_features, cols, **factory))
        self.register_buffer("u_out", torch.eye(out_features, rows, **factory))
        master_dtype = torch.float32 if needs_master(self.block.dtype) else self.block.dtype
        self.register_buffer("block_applied", torch.zeros(rows, cols, device=device, dtype=master_dtype))
        self._applied_version: int | None = None
        nn.init.normal_(self.weight, std=0.02)
        self.register_buffer("block_master", float32_master(self.block))
        self.register_buffer("weight_master", float32_master(self.weight))

    def master_pairs(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """``[(block, block_master)]`` in a bf16/fp16 layer, else ``[]``."""
        self.fold()  # a change of B made before a conversion goes into W first
        master = current_master(self, "block", "block_master")
        if current_master(self, "weight", "weight_master") is not None:
            self.block_applied = self.block_applied.float()
        return [] if master is None else [(self.block, master)]

    @property
    def sparse_block_grad(self) -> bool:
        """Whether the gradient of ``block`` is sparse COO (top-k inside a larger block)."""
        return self.k < self.rows * self.cols

    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        u_in: torch.Tensor,
        u_out: torch.Tensor,
        k: int | float,
        *,
        rows: int | None = None,
        cols: int | None = None,
        block_factor: float = 1.0,
        orientation: str = "hosvd",
        sparse_by_dense: bool = True,
        topk_at: str = "backward",
    ) -> LeadingBlockLinear:
        """Wrap ``linear`` (same function): W0 = its weight, B = 0.

        ``u_in`` (in x in) and ``u_out`` (out x out): the transition basis, columns by decreasing
        energy. ``k``: entries of W~ trained per step (count or fraction of in*out, the same budget as
        SparseGradLinear). The block is ``rows x cols``; by default the leading block with about
        ``block_factor * k`` entries and the matrix's aspect ratio (``block_factor=1``: the block is
        trained densely; ``> 1``: top-k of dL/dB inside it). ``orientation``: "hosvd" (R = u_in) or
        "official" (R = u_in^T). ``topk_at``: "backward" (top-k of each backward pass's dL/dB) or
        "step" (dL/dB dense until the optimizer step, which takes the top-k of the summed gradient).
        """
        if orientation not in ORIENTATIONS:
            raise ValueError(f"unknown orientation {orientation!r}; valid: {', '.join(ORIENTATIONS)}")
        w = linear.weight
        out_f, in_f = w.shape
        if tuple(u_in.shape) != (in_f, in_f) or tuple(u_out.shape) != (out_f, out_f):
            raise ValueError(
                f"basis shapes u_in {tuple(u_in.shape)}, u_out {tuple(u_out.shape)} do not fit a Linear "
                f"with weight {tuple(w.shape)}"
            )
        k_count = resolve_k(k, in_f * out_f)
        if rows is None or cols is None:
            auto_r, auto_c = leading_block_shape(out_f, in_f, math.ceil(block_factor * k_count))
            rows, cols = rows or auto_r, cols or auto_c
        layer = cls(in_f, out_f, rows, cols, k=min(k_count, rows * cols), bias=linear.bias is not None,
                    sparse_by_dense=sparse_by_dense, topk_at=topk_at, device=w.device, dtype=w.dtype)  # fmt: skip
        with torch.no_grad():
            r_mat = u_in if orientation == "hosvd" else u_in.t()
            layer.u_in.copy_(r_mat[:, :cols])
            layer.u_out.copy_(u_out[:, :rows])
        copy_weight_and_bias(layer, linear)
        layer.block.requires_grad_(w.requires_grad)
        layer._applied_version = layer.block._version
        return layer

    @torch.no_grad()
    def fold(self) -> None:
        """Fold a change of B since the last fold into ``weight``: W += U_r (B - B_applied) V_c^T."""
        if self._applied_version == self.block._version:
            return
        block = self.block.detach() if self.block_master is None else self.block_master
        delta = block - self.block_applied
        if bool(delta.ne(0).any()):
            target = self.weight if self.weight_master is None else self.weight_master
            # in the (master) weight's precision, also when the forward runs under autocast
            with torch.autocast(self.weight.device.type, enabled=False):
                u_out, u_in = self.u_out.to(target.dtype), self.u_in.to(target.dtype)
                delta = delta.to(target.dtype)
                # (U_r D) V_c^T costs out r c + out c in; U_r (D V_c^T) costs r c in + out r in.
                if self.rows <= self.cols:
                    target.addmm_(u_out, delta @ u_in.t())
                else:
                    target.addmm_(u_out @ delta, u_in.t())
            if self.weight_master is not None:
                self.weight.copy_(self.weight_master)
            self.block_applied.copy_(block)
        self._applied_version = self.block._version

    @torch.no_grad()
    def select_gradient(self, grad: torch.Tensor) -> torch.Tensor:
        """``topk_at="step"``: the top-k (COO) of the dense dL/dB summed over the step's backward passes."""
        return topk_coo(grad, self.k)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_data_parallel(self, self.block if self.sparse_block_grad else None)
        self.fold()
        return apply_to_rows(_LeadingBlockFunction, x, self.out_features, self.block, self.bias, self)

    def effective_weight(self) -> torch.Tensor:
        self.fold()
        return self.weight

    def to_linear(self) -> nn.Linear:
        """A plain ``nn.Linear`` with the same function (W with B folded in)."""
        return plain_linear(self.effective_weight(), self.bias)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        self.fold()  # "weight" is the effective W: plain transformers loads an unmerged checkpoint correctly
        super()._save_to_state_dict(destination, prefix, keep_vars)
        for name in ("u_in", "u_out"):  # shared by a group's layers; safetensors wants one tensor per key
            if prefix + name in destination:
                destination[prefix + name] = destination[prefix + name].clone()

    def _load_from_state_dict(self, *args, **kwargs):
        super()._load_from_state_dict(*args, **kwargs)
        self._applied_version = None  # weight and block_applied come from the checkpoint, consistent

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, block={self.rows}x{self.cols}, "
                f"k={self.k}, bias={self.bias is not None}, sparse_by_dense={self.sparse_by_dense}, "
                f"topk_at={self.topk_at}")  # fmt: skip


def apply_leading_block(
    model: nn.Module,
    basis,
    k: int | float,
    *,
    block_factor: float = 1.0,
    orientation: str = "hosvd",
    sparse_by_dense: bool = True,
    target_patterns: Mapping[str, str] | None = None,
    every_nth_block: int | None = None,
    train_non_mlp: bool = True,
    topk_at: str = "backward",
) -> nn.Module:
    """Swap the MLP linears of ``model`` for :class:`LeadingBlockLinear` (in place; returns the model).

    ``basis``: a :class:`sparsegrad.Basis` estimated on the same targets. ``train_non_mlp`` as in
    :func:`sparsegrad.apply_method` (every non-target parameter trainable, densely).
    """
    targets = find_targets(model, target_patterns, every_nth_block)
    for p in model.parameters():
        p.requires_grad_(train_non_mlp)
    shared: dict[tuple, torch.Tensor] = {}  # layers of a group share one copy of their basis columns
    for t in targets:
        linear = model.get_submodule(t.name)
        linear.weight.requires_grad_(True)
        if linear.bias is not None:
            linear.bias.requires_grad_(True)
        group_basis = basis.for_layer(t.name, t.group)
        u_in, u_out = group_basis
        layer = LeadingBlockLinear.from_linear(linear, u_in, u_out, k, block_factor=block_factor,
                                               orientation=orientation, sparse_by_dense=sparse_by_dense,
                                               topk_at=topk_at)  # fmt: skip
        for name in ("u_in", "u_out"):
            key = (id(group_basis), name, tuple(getattr(layer, name).shape), layer.weight.device, layer.weight.dtype)
            if key not in shared:
                shared[key] = getattr(layer, name)
            setattr(layer, name, shared[key])
        set_submodule(model, t.name, layer)
    return model


def merge_leading_block(model: nn.Module) -> nn.Module:
    """Turn every LeadingBlockLinear back into ``nn.Linear`` (in place; returns the model)."""
    for name, module in [(n, m) for n, m in model.named_modules() if isinstance(m, LeadingBlockLinear)]:
        linear = module.to_linear()
        linear.train(module.training)
        set_submodule(model, name, linear)
    return model


def build_optimizer(model: nn.Module, lr: float = 1e-4, weight_decay: float = 0.0, **kwargs) -> SparseGradOptimizer:
    """:func:`sparsegrad.build_optimizer` with this module's defaults: ``schedule="constant"`` and
    ``sparse_state="compact"`` (AdamW on dense parameters, dense blocks included; LazySparseAdam on
    top-k blocks). ``kwargs`` go to :func:`sparsegrad.build_optimizer`. Kept for existing callers;
    ``sparsegrad.build_optimizer`` handles LeadingBlockLinear layers itself.
    """
    kwargs.setdefault("schedule", "constant")
    kwargs.setdefault("sparse_state", "compact")
    return build_sparsegrad_optimizer(model, lr=lr, weight_decay=weight_decay, **kwargs)
