"""``leading_block``: :class:`~sparsegrad.methods.leading_block.layer.LeadingBlockLinear` — SparseGrad restricted to
the leading ``~block_factor * k`` entries of the transition basis (same basis as ``sparsegrad``).

Options: ``k``, ``block_factor`` (> 0; 1: the block has exactly k entries and trains densely with
AdamW; > 1: the top-k of its gradient, a sparse ``block`` stepped by the lazy sparse Adam),
``orientation``, ``sparse_by_dense``, ``topk_at`` and the basis options as ``sparsegrad``. Merging folds the block
into W. Accounting reports the block's non-zero entries (those that moved from 0) as updated.
"""

from __future__ import annotations

from torch import nn

from sparsegrad.layer_common import check_topk_at
from sparsegrad.methods.leading_block.layer import LeadingBlockLinear, apply_leading_block
from sparsegrad.methods.sparsegrad.method import check_orientation
from sparsegrad.registry import LayerBudget, Method, register_method

__all__ = ["LeadingBlock"]


@register_method
class LeadingBlock(Method):
    name = "leading_block"
    options = ("k", "block_factor", "orientation", "sparse_by_dense", "topk_at", "basis_steps", "basis_per_layer",
               "basis_micro_batch")  # fmt: skip
    needs_basis = True
    layer_types = (LeadingBlockLinear,)

    def check(self, cfg) -> None:
        if not cfg.block_factor > 0:
            raise ValueError(f"block_factor must be > 0, got {cfg.block_factor!r}")
        check_orientation(cfg.orientation)
        check_topk_at(cfg.topk_at)

    def apply(self, model: nn.Module, cfg, targets: list, basis=None) -> nn.Module:
        return apply_leading_block(
            model, basis, cfg.k, block_factor=cfg.block_factor, orientation=cfg.orientation,
            sparse_by_dense=cfg.sparse_by_dense, target_patterns=cfg.target_patterns,
            every_nth_block=cfg.every_nth_block, train_non_mlp=cfg.train_non_mlp, topk_at=cfg.topk_at,
        )  # fmt: skip

    def sparse_parameter(self, module: LeadingBlockLinear):
        return module.block if module.sparse_block_grad else None

    def budget(self, module: LeadingBlockLinear) -> LayerBudget:
        updated = int(module.block.detach().ne(0).sum())
        return LayerBudget(module.block, (module.out_features, module.in_features), int(module.k), updated)
