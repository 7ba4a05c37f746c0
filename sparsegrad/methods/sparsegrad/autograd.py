"""The autograd function of :class:`sparsegrad.methods.sparsegrad.layer.SparseGradLinear`: its forward (the regular
3-product formulation or one product with the effective weight) and its backward (exact dL/dx and bias
gradient; the k-sparse dL/dW~, or the dense gradient when the top-k is taken at the optimizer step).

The layer supplies the basis, budget, formulation and storage; see :mod:`sparsegrad.methods.sparsegrad.layer` for the math.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from sparsegrad.kernels import cheapest_rotation_sides, drop_zero_rows, mark_bits, scatter_rows, topk_coo
from sparsegrad.layer_common import save_linear_context

__all__ = ["SparseGradFunction", "rotated_weight_grad"]


class SparseGradFunction(torch.autograd.Function):
    """Autograd of SparseGradLinear; ``layer`` supplies the basis, budget and formulation."""

    @staticmethod
    def forward(ctx, x, weight, bias, w_eff, layer):
        u_out, r_mat = layer.u_out, layer.right_rotation()
        if layer.formulation == "regular":
            x_saved = x @ r_mat  # x~ = x R, saved as the authors do
            y = F.linear(F.linear(x_saved, weight), u_out, bias)
        else:
            x_saved = x
            y = F.linear(x, w_eff, bias)
        save_linear_context(ctx, x, bias, layer, x_saved, weight, w_eff)
        return y

    @staticmethod
    def backward(ctx, grad_y):
        layer = ctx.layer
        x_saved, weight, w_eff = ctx.saved_tensors
        u_out, r_mat = layer.u_out, layer.right_rotation()
        n_tokens = grad_y.shape[0]
        rows, g, xs = drop_zero_rows(grad_y, x_saved, layer.sparse_by_dense, weight.dtype)
        need_x, need_w, need_b = ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[2]
        grad_x = grad_w = grad_b = None

        # topk_at "step" with storage "weight": the parameter is W and its gradient dL/dW, rotated and
        # sparsified once per optimizer step (select_gradient); no rotation in the backward pass.
        unrotated = layer.topk_at == "step" and layer.storage == "weight"
        if layer.formulation == "regular":
            g_rot = g @ u_out  # dL/dY~ = dL/dY u_out, per token
            if need_x:
                grad_x = scatter_rows((g_rot @ weight) @ r_mat.t(), rows, n_tokens)
            if need_w:
                grad_dense = g_rot.t() @ xs
        else:
            if need_x:
                grad_x = scatter_rows(g @ w_eff, rows, n_tokens)
            if need_w:
                grad_dense = g.t() @ xs if unrotated else rotated_weight_grad(g, xs, u_out, r_mat)
        if need_w:
            if layer.topk_at == "step":
                grad_w = grad_dense
            else:
                grad_w = topk_coo(grad_dense, layer.k, overwrite=True)  # grad_dense is this call's temporary
                del grad_dense
                mark_bits(layer.updated_mask, grad_w.indices()[0] * layer.in_features + grad_w.indices()[1])
                if getattr(layer, "dense_weight_grad", False):  # the same k entries, dense, for a dense optimizer
                    grad_w = grad_w.to_dense()
            layer.note_gradient()
        if need_b and ctx.has_bias:
            grad_b = g.sum(0)
        if grad_x is not None:
            grad_x = grad_x.to(ctx.x_dtype)
        return grad_x, grad_w, grad_b, None, None


def rotated_weight_grad(g: torch.Tensor, x: torch.Tensor, u_out: torch.Tensor, r_mat: torch.Tensor):
    """dL/dW~ = u_out^T (g^T x) R with each rotation on its cheaper side (per token or once)."""
    n_rows, d_out = g.shape
    d_in = x.shape[1]
    per_token_in, per_token_out = cheapest_rotation_sides(n_rows, d_in, d_out)
    if per_token_in:
        x = x @ r_mat
    if per_token_out:
        g = g @ u_out
    grad = g.t() @ x
    if not per_token_out:
        grad = u_out.t() @ grad
    if not per_token_in:
        grad = grad @ r_mat
    return grad
