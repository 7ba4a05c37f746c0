"""MePropLinear: an ``nn.Linear`` whose backward pass keeps the top-k entries in the original space (no
basis change) — the SparseGrad paper's MeProp baseline (top-k of dL/dW) and meProp of Sun et al., 2017
(top-k of each row of dL/dY).

The layer only; :mod:`sparsegrad.methods.meprop.method` registers it as the method ``"meprop"``. Shared helpers
(master copies, option checks) are in :mod:`sparsegrad.layer_common`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from sparsegrad.kernels import (
    apply_to_rows,
    count_bits,
    drop_zero_rows,
    mark_bits,
    new_bitmask,
    resolve_k,
    scatter_rows,
    topk_coo,
    topk_rows,
)
from sparsegrad.layer_common import (
    MEPROP_MODES,
    TOPK_AT,
    check_choice,
    check_data_parallel,
    copy_weight_and_bias,
    current_master,
    float32_master,
    plain_linear,
    save_linear_context,
)

__all__ = ["MePropLinear"]


class _MePropFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, layer):
        save_linear_context(ctx, x, bias, layer, x, weight)
        return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, grad_y):
        layer = ctx.layer
        x, weight = ctx.saved_tensors
        n_tokens = grad_y.shape[0]
        rows, g, xs = drop_zero_rows(grad_y, x, layer.sparse_by_dense, weight.dtype)
        if layer.mode == "output":  # after the row drop: top-k keeps a non-zero row non-zero
            g = topk_rows(g, layer.k)
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = scatter_rows(g @ weight, rows, n_tokens).to(ctx.x_dtype)
        if ctx.needs_input_grad[1]:
            grad_w = g.t() @ xs
            if layer.mode == "weight" and layer.topk_at == "step":
                pass  # dense until the optimizer step (select_gradient)
            elif layer.mode == "weight":
                grad_w = topk_coo(grad_w, layer.k)
                idx = grad_w.indices()
                mark_bits(layer.updated_mask, idx[0] * layer.in_features + idx[1])
                if layer.dense_weight_grad:  # the same top-k entries, as a dense tensor for AdamW
                    grad_w = grad_w.to_dense()
            else:
                mark_bits(layer.updated_mask, grad_w.reshape(-1).ne(0).nonzero().squeeze(1))
        if ctx.needs_input_grad[2] and ctx.has_bias:
            grad_b = g.sum(0)
        return grad_x, grad_w, grad_b, None


class MePropLinear(nn.Module):
    """A Linear layer with a top-k sparsified backward pass in the original space (no basis change).

    ``mode="weight"`` (the SparseGrad paper's MeProp baseline): the weight gradient is the top-``k``
    entries of dL/dW by magnitude, as sparse COO (``k``: count or fraction of in*out); dL/dx and the
    bias gradient are exact.

    ``mode="output"`` (meProp of Sun et al., 2017): each row of dL/dY keeps its top-``k`` entries
    (``k``: count or fraction of out per row); dL/dx, the dense dL/dW and the bias gradient are all
    computed from that sparsified dL/dY.

    ``topk_at`` (mode "weight"): "backward" (top-k of each backward pass's dL/dW) or "step" (dL/dW kept
    dense until the optimizer step, which takes the top-k of the summed gradient; see
    :data:`sparsegrad.layer_common.TOPK_AT`).

    ``dense_weight_grad=True`` (mode "weight"): the same top-k gradient as a dense tensor (zeros
    elsewhere), for a dense optimizer — the authors' MeProp baseline ran under dense AdamW, whose
    momentum keeps moving weights outside each step's top-k. The default sparse COO gradient goes to
    the lazy sparse Adam (only the top-k coordinates move).

    In a bf16/fp16 layer ``weight_master`` is a float32 master copy of W (see :class:`sparsegrad.methods.sparsegrad.layer.SparseGradLinear`).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        k: int | float,
        mode: str = "weight",
        bias: bool = True,
        *,
        sparse_by_dense: bool = True,
        topk_at: str = "backward",
        dense_weight_grad: bool = False,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        check_choice("meprop mode", mode, MEPROP_MODES)
        check_choice("topk_at", topk_at, TOPK_AT)
        if mode == "output" and topk_at == "step":
            raise ValueError(
                "meprop mode 'output' sparsifies dL/dY in every backward pass (its weight gradient is dense); "
                "topk_at='step' applies to mode 'weight'"
            )
        if dense_weight_grad and topk_at == "step":
            raise ValueError(
                "dense_weight_grad (meprop_optimizer='adamw': the top-k of each backward pass as a dense "
                "tensor under AdamW) and topk_at='step' (the top-k taken by the lazy sparse Adam's step) "
                "exclude each other; use meprop_optimizer='lazy_adam' with topk_at='step'"
            )
        self.topk_at = topk_at
        self.dense_weight_grad = dense_weight_grad
        factory = {"device": device, "dtype": dtype}
        self.in_features = in_features
        self.out_features = out_features
        self.mode = mode
        self.k = resolve_k(k, in_features * out_features if mode == "weight" else out_features)
        self.sparse_by_dense = sparse_by_dense
        self.weight = nn.Parameter(torch.empty(out_features, in_features, **factory))
        self.bias = nn.Parameter(torch.zeros(out_features, **factory)) if bias else None
        self.register_buffer("updated_mask", new_bitmask(out_features * in_features, device))
        nn.init.normal_(self.weight, std=0.02)
        self.register_buffer("weight_master", float32_master(self.weight))

    @property
    def sparse_weight_grad(self) -> bool:
        """Whether the weight gradient is a sparse COO tensor (needs a sparse-capable optimizer)."""
        return self.mode == "weight" and not self.dense_weight_grad

    def master_pairs(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """``[(weight, weight_master)]`` in a bf16/fp16 layer, else ``[]``."""
        master = current_master(self, "weight", "weight_master")
        return [] if master is None else [(self.weight, master)]

    @classmethod
    def from_linear(cls, linear: nn.Linear, k: int | float, mode: str = "weight", **options) -> MePropLinear:
        w = linear.weight
        layer = cls(
            w.shape[1], w.shape[0], k, mode, bias=linear.bias is not None, device=w.device, dtype=w.dtype,
            **options,
        )  # fmt: skip
        copy_weight_and_bias(layer, linear)
        layer.weight.requires_grad_(w.requires_grad)
        return layer

    def to_linear(self) -> nn.Linear:
        return plain_linear(self.weight, self.bias)  # the parameter is the master rounded

    @torch.no_grad()
    def select_gradient(self, grad: torch.Tensor) -> torch.Tensor:
        """``topk_at="step"``: the top-k (COO) of the dense dL/dW summed over the step's backward passes."""
        selected = topk_coo(grad, self.k)
        idx = selected.indices()
        mark_bits(self.updated_mask, idx[0] * self.in_features + idx[1])
        return selected

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_data_parallel(self, self.weight if self.sparse_weight_grad else None)
        return apply_to_rows(_MePropFunction, x, self.out_features, self.weight, self.bias, self)

    def num_updated(self) -> int:
        return count_bits(self.updated_mask)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, k={self.k}, "
            f"mode={self.mode}, bias={self.bias is not None}, topk_at={self.topk_at}, "
            f"dense_weight_grad={self.dense_weight_grad}"
        )
