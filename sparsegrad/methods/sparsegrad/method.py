"""``sparsegrad``: :class:`~sparsegrad.methods.sparsegrad.layer.SparseGradLinear` in a transition basis (the paper's method).

Options: ``k`` (entries of dL/dW~ per step: count or fraction of in*out), ``orientation`` ("hosvd" or
"official"), ``formulation`` ("auto" or "regular"), ``storage`` ("weight": keep only W, the lazy sparse
Adam hands each step to the layer, which adds ``u_out ΔW~ R^T`` to W; "rotated": keep W~ and a cached W
that the layer refreshes from the step; None: automatic; both storages follow one trajectory, weight
decay included), ``sparse_by_dense``, and the basis options
``basis_steps`` / ``basis_per_layer`` / ``basis_micro_batch`` used when apply_method estimates the basis;
``topk_at`` ("backward": top-k of every backward pass's dL/dW~, the paper's; "step": the gradient stays
dense until the optimizer step, which rotates and selects once, as data parallelism needs).
The layers of a group share one converted copy of the group's basis. Merging: ``W = u_out W~ R^T``.
"""

from __future__ import annotations

from torch import nn

from sparsegrad.layer_common import FORMULATIONS, ORIENTATIONS, STORAGES, check_topk_at
from sparsegrad.methods.sparsegrad.layer import SparseGradLinear
from sparsegrad.registry import Method, register_method
from sparsegrad.targets import set_submodule

__all__ = ["SparseGrad", "check_orientation"]


def check_orientation(orientation: str) -> None:
    if orientation not in ORIENTATIONS:
        raise ValueError(f"unknown orientation {orientation!r}; valid: {', '.join(ORIENTATIONS)}")


@register_method
class SparseGrad(Method):
    name = "sparsegrad"
    options = ("k", "orientation", "formulation", "storage", "sparse_by_dense", "topk_at", "basis_steps",
               "basis_per_layer", "basis_micro_batch")  # fmt: skip
    needs_basis = True
    layer_types = (SparseGradLinear,)

    def check(self, cfg) -> None:
        check_orientation(cfg.orientation)
        check_topk_at(cfg.topk_at)
        if cfg.formulation not in FORMULATIONS:
            raise ValueError(f"unknown formulation {cfg.formulation!r}; valid: {', '.join(FORMULATIONS)}")
        if cfg.storage is not None and cfg.storage not in STORAGES:
            raise ValueError(f"unknown storage {cfg.storage!r}; valid: {', '.join(STORAGES)} (or null: automatic)")

    def apply(self, model: nn.Module, cfg, targets: list, basis=None) -> nn.Module:
        prepared: dict[int, tuple] = {}  # one converted copy per basis, shared by the group's layers
        for t in targets:
            set_submodule(model, t.name, self.wrap(model.get_submodule(t.name), cfg, t, basis, prepared))
        return model

    def wrap(self, linear: nn.Module, cfg, target, basis=None, prepared: dict | None = None) -> nn.Module:
        prepared = {} if prepared is None else prepared
        group_basis = basis.for_layer(target.name, target.group)
        if id(group_basis) not in prepared:
            prepared[id(group_basis)] = SparseGradLinear.prepare_basis(
                group_basis.u_in, group_basis.u_out, linear.weight, cfg.orientation
            )
        u_in, u_out = prepared[id(group_basis)]
        return SparseGradLinear.from_linear(
            linear, u_in, u_out, cfg.k, orientation=cfg.orientation, formulation=cfg.formulation,
            storage=cfg.storage, sparse_by_dense=cfg.sparse_by_dense, topk_at=cfg.topk_at,
        )  # fmt: skip

    def sparse_parameter(self, module: SparseGradLinear):
        # dense_weight_grad (a PEFT option): the k-sparse gradient comes dense and trains under AdamW
        return None if getattr(module, "dense_weight_grad", False) else module.weight

    def attach_optimizer(self, module: SparseGradLinear, sparse_optimizer) -> None:
        if not module.weight.requires_grad:
            return
        # storage "weight": the layer turns the step of W~ into one of W; storage "rotated": it adds
        # the step to W~ and folds it into its cached W; both decay the whole matrix (and step the
        # float32 master copy of a bf16/fp16 layer)
        sparse_optimizer.register_applier(module.weight, module.apply_rotated_step)
