"""``SparseGradConfig``: SparseGrad as a PEFT method (``peft.get_peft_model(model, SparseGradConfig(...))``).

Each target linear keeps its weight W0 frozen and gains a change ΔW trained SparseGrad's way (see
:mod:`sparsegrad.peft_tuner`): per step the k largest entries of ``dL/dΔW~ = u_out^T (dL/dW) R`` in the
transition basis of its group. The basis comes from data, in one call after ``get_peft_model``, as EVA's
LoRA initialisation does::

    peft_model = get_peft_model(model, sparsegrad.SparseGradConfig(k=0.01))
    sparsegrad.initialize_sparsegrad_basis(peft_model, dataloader)      # batches with labels
    optimizer = sparsegrad.build_optimizer(peft_model, lr=2e-5, total_steps=1000)
"""

from __future__ import annotations

from dataclasses import dataclass

from sparsegrad.layer_common import ORIENTATIONS, STORAGES, check_choice
from sparsegrad.peft_tuner import DeltaConfig, option

__all__ = ["SparseGradConfig", "BASIS_SOURCES"]

#: where the transition basis of a fresh adapter comes from
BASIS_SOURCES = ("data", "random", "identity")


@dataclass
class SparseGradConfig(DeltaConfig):
    """The configuration of a SparseGrad adapter: the options of
    :class:`~sparsegrad.peft_tuner.DeltaConfig` (``k``: entries of dL/dΔW~) and

    Args:
        basis: "data" (estimated by :func:`sparsegrad.initialize_sparsegrad_basis`; training before that
            call raises), "random" (a random orthogonal basis per group, from ``basis_seed``: for tests)
            or "identity" (no rotation: the top-k of dL/dW itself, MeProp's selection).
        basis_per_layer: one basis per layer instead of one per group. A group is the set of targets
            whose names differ only in their block index (``layers.*.mlp.up_proj``): the paper's up and
            down groups.
        basis_steps / basis_micro_batch: batches and rows per backward pass used by
            :func:`sparsegrad.initialize_sparsegrad_basis` (see :func:`sparsegrad.estimate_basis`).
        basis_seed: seed of ``basis="random"``.
        orientation, storage: as for :class:`sparsegrad.SparseGradLinear` (``storage`` "weight" keeps ΔW
            and needs :func:`sparsegrad.build_optimizer`; "rotated" keeps ΔW~ and a cached ΔW, and trains
            with any optimizer that takes a sparse gradient; ``dense_weight_grad=True`` implies it).
        compact_save: save each layer's ΔW~ on its updated coordinates (flat indices and values) instead of
            its dense ΔW: after T steps at most T * k entries per layer. Loading computes ΔW = u_out ΔW~ R^T
            again, equal to the saved one up to float rounding (the dense default reloads bit for bit).

    ``init_weights=False`` gives a random ΔW~ on k random coordinates (as after one step), for tests.
    """

    method = "sparsegrad"

    basis: str = option("data", f"basis of a fresh adapter: one of {BASIS_SOURCES}")
    basis_per_layer: bool = option(False, "one basis per layer instead of per group")
    basis_steps: int | None = option(None, "batches for initialize_sparsegrad_basis")
    basis_micro_batch: int | None = option(None, "rows per backward pass of the estimate")
    basis_seed: int = option(0, "seed of basis='random'")
    orientation: str = option("hosvd", f"one of {ORIENTATIONS}")
    storage: str | None = option(None, f"one of {STORAGES} (None: 'weight')")
    compact_save: bool = option(False, "save ΔW~ on its updated coordinates only")

    def __post_init__(self) -> None:
        super().__post_init__()
        check_choice("basis", self.basis, BASIS_SOURCES)
        check_choice("orientation", self.orientation, ORIENTATIONS)
        if self.storage is not None:
            check_choice("storage", self.storage, STORAGES)
        if self.dense_weight_grad:
            if self.storage == "weight":
                raise ValueError("dense_weight_grad=True needs storage='rotated' (a dense optimizer adds the gradient "
                                 "to the parameter, which must then be ΔW~)")  # fmt: skip
            self.storage = "rotated"
