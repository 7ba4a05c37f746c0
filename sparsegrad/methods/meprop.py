"""``meprop``: :class:`~sparsegrad.layers.MePropLinear` on the targets.

Options: ``meprop_mode`` "weight" (top-k of dL/dW with ``k`` entries, the paper's baseline: a sparse
weight gradient stepped by the lazy sparse Adam) or "output" (top-k of dL/dY per row, Sun et al. 2017,
``meprop_k_per_row`` entries per row: the weight gradient is dense, AdamW steps it);
``sparse_by_dense`` drops zero rows of dL/dY. Merging keeps the weight as it is.
"""

from __future__ import annotations

from torch import nn

from ..layers import MEPROP_MODES, MePropLinear
from ..registry import Method, register_method

__all__ = ["MeProp"]


@register_method
class MeProp(Method):
    name = "meprop"
    options = ("k", "meprop_mode", "meprop_k_per_row", "sparse_by_dense")
    layer_types = (MePropLinear,)

    def check(self, cfg) -> None:
        if cfg.meprop_mode not in MEPROP_MODES:
            raise ValueError(f"unknown meprop_mode {cfg.meprop_mode!r}; valid: {', '.join(MEPROP_MODES)}")

    def wrap(self, linear: nn.Module, cfg, target, basis=None) -> nn.Module:
        k = cfg.k if cfg.meprop_mode == "weight" else cfg.meprop_k_per_row
        return MePropLinear.from_linear(linear, k, cfg.meprop_mode, sparse_by_dense=cfg.sparse_by_dense)

    def sparse_parameter(self, module: MePropLinear):
        return module.weight if module.sparse_weight_grad else None
