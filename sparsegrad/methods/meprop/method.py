"""``meprop``: :class:`~sparsegrad.methods.sparsegrad.layer.MePropLinear` on the targets.

Options: ``meprop_mode`` "weight" (top-k of dL/dW with ``k`` entries, the paper's baseline: a sparse
weight gradient stepped by the lazy sparse Adam) or "output" (top-k of dL/dY per row, Sun et al. 2017,
``meprop_k_per_row`` entries per row: the weight gradient is dense, AdamW steps it);
``sparse_by_dense`` drops zero rows of dL/dY; ``meprop_optimizer`` (mode "weight"): "lazy_adam" (default:
the lazy sparse Adam moves only the top-k coordinates) or "adamw" (the authors' variant: the same top-k
gradient as a dense tensor under dense AdamW, whose momentum keeps moving weights outside the top-k).
``topk_at`` (mode "weight", with "lazy_adam") as ``sparsegrad``. Merging keeps the weight as it is.
"""

from __future__ import annotations

from torch import nn

from sparsegrad.layer_common import MEPROP_MODES, check_topk_at
from sparsegrad.methods.meprop.layer import MePropLinear
from sparsegrad.registry import Method, register_method

__all__ = ["MeProp", "MEPROP_OPTIMIZERS", "meprop_optimizer"]

MEPROP_OPTIMIZERS = ("lazy_adam", "adamw")


def meprop_optimizer(cfg) -> str:
    """The optimizer a MeProp config trains its weights with: ``cfg.meprop_optimizer``, or by default
    "lazy_adam" in mode "weight" and "adamw" in mode "output" (a dense gradient)."""
    if cfg.meprop_optimizer is not None:
        return cfg.meprop_optimizer
    return "lazy_adam" if cfg.meprop_mode == "weight" else "adamw"


@register_method
class MeProp(Method):
    name = "meprop"
    options = ("k", "meprop_mode", "meprop_k_per_row", "meprop_optimizer", "sparse_by_dense", "topk_at")
    layer_types = (MePropLinear,)

    def check(self, cfg) -> None:
        if cfg.meprop_mode not in MEPROP_MODES:
            raise ValueError(f"unknown meprop_mode {cfg.meprop_mode!r}; valid: {', '.join(MEPROP_MODES)}")
        check_topk_at(cfg.topk_at)
        if cfg.meprop_optimizer is not None and cfg.meprop_optimizer not in MEPROP_OPTIMIZERS:
            raise ValueError(f"unknown meprop_optimizer {cfg.meprop_optimizer!r}; valid: "
                             f"{', '.join(MEPROP_OPTIMIZERS)} (or null: lazy_adam in mode 'weight')")  # fmt: skip
        if cfg.meprop_mode == "output" and cfg.meprop_optimizer == "lazy_adam":
            raise ValueError("meprop_mode='output' gives a dense weight gradient, which AdamW trains; "
                             "use meprop_optimizer='adamw' or null, or meprop_mode='weight' for the lazy sparse Adam")  # fmt: skip
        if cfg.topk_at == "step" and cfg.meprop_mode == "weight" and meprop_optimizer(cfg) == "adamw":
            raise ValueError("topk_at='step' takes the top-k in the lazy sparse Adam's step; meprop_optimizer="
                             "'adamw' takes it in every backward pass for dense AdamW: use one of them")  # fmt: skip

    def wrap(self, linear: nn.Module, cfg, target, basis=None) -> nn.Module:
        k = cfg.k if cfg.meprop_mode == "weight" else cfg.meprop_k_per_row
        dense = cfg.meprop_mode == "weight" and meprop_optimizer(cfg) == "adamw"
        topk_at = cfg.topk_at if cfg.meprop_mode == "weight" else "backward"  # "output": dense weight gradient
        return MePropLinear.from_linear(linear, k, cfg.meprop_mode, sparse_by_dense=cfg.sparse_by_dense,
                                        dense_weight_grad=dense, topk_at=topk_at)  # fmt: skip

    def sparse_parameter(self, module: MePropLinear):
        return module.weight if module.sparse_weight_grad else None
