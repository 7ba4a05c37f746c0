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

from dataclasses import dataclass, field

from peft.config import PeftConfig

from sparsegrad.layer_common import ORIENTATIONS, STORAGES, check_choice, check_topk_at

__all__ = ["SparseGradConfig", "BASIS_SOURCES"]

#: where the transition basis of a fresh adapter comes from
BASIS_SOURCES = ("data", "random", "identity")


def _help(text: str) -> dict:
    return {"help": text}


@dataclass
class SparseGradConfig(PeftConfig):
    """The configuration of a SparseGrad adapter.

    Args:
        target_modules: the linears to adapt, as peft names them (module names, suffixes or one regular
            expression); default: the MLP linears of the architecture (``up``/``down`` of BERT, RoBERTa,
            LLaMA, Mistral, Qwen2: the layers :func:`sparsegrad.find_targets` finds).
        exclude_modules: linears to leave alone.
        k: the budget per layer and step, entries of dL/dΔW~ (an int count or a float fraction of
            in*out; the paper keeps about 1%).
        basis: "data" (estimated by :func:`sparsegrad.initialize_sparsegrad_basis`; training before that
            call raises), "random" (a random orthogonal basis per group, from ``basis_seed``: for tests)
            or "identity" (no rotation: the top-k of dL/dW itself, MeProp's selection).
        basis_per_layer: one basis per layer instead of one per group. A group is the set of targets
            whose names differ only in their block index (``layers.*.mlp.up_proj``): the paper's up and
            down groups.
        basis_steps / basis_micro_batch: batches and rows per backward pass used by
            :func:`sparsegrad.initialize_sparsegrad_basis` (see :func:`sparsegrad.estimate_basis`).
        basis_seed: seed of ``basis="random"``.
        orientation, storage, topk_at, sparse_by_dense: as for :class:`sparsegrad.SparseGradLinear`
            (``storage`` "weight" keeps ΔW and needs :func:`sparsegrad.build_optimizer`; "rotated" keeps
            ΔW~ and a cached ΔW, and trains with any optimizer that takes a sparse gradient).
        dense_weight_grad: the k-sparse gradient as a dense tensor, for optimizers without sparse support
            (``torch.optim.AdamW``: its moments then move entries outside each step's top-k); implies
            ``storage="rotated"``.
        init_weights: True: ΔW = 0 (the adapter starts as the identity). False: a random ΔW, for tests.
        modules_to_save: other modules to train and save.
    """

    target_modules: list[str] | str | None = field(
        default=None, metadata=_help("the linears to adapt (names, suffixes or a regular expression)"))
    exclude_modules: list[str] | str | None = field(default=None, metadata=_help("linears to leave alone"))
    k: int | float = field(default=0.01, metadata=_help("entries of dL/dΔW~ per layer and step (count or fraction)"))
    basis: str = field(default="data", metadata=_help(f"basis of a fresh adapter: one of {BASIS_SOURCES}"))
    basis_per_layer: bool = field(default=False, metadata=_help("one basis per layer instead of per group"))
    basis_steps: int | None = field(default=None, metadata=_help("batches for initialize_sparsegrad_basis"))
    basis_micro_batch: int | None = field(default=None, metadata=_help("rows per backward pass of the estimate"))
    basis_seed: int = field(default=0, metadata=_help("seed of basis='random'"))
    orientation: str = field(default="hosvd", metadata=_help(f"one of {ORIENTATIONS}"))
    storage: str | None = field(default=None, metadata=_help(f"one of {STORAGES} (None: 'weight')"))
    topk_at: str = field(default="backward", metadata=_help("'backward' or 'step'"))
    sparse_by_dense: bool = field(default=True, metadata=_help("drop all-zero rows of dL/dY (paper 3.3)"))
    dense_weight_grad: bool = field(default=False, metadata=_help("the k-sparse gradient as a dense tensor"))
    init_weights: bool = field(default=True, metadata=_help("True: ΔW = 0; False: random (tests)"))
    modules_to_save: list[str] | None = field(default=None, metadata=_help("other modules to train and save"))

    def __post_init__(self) -> None:
        super().__post_init__()
        from sparsegrad.peft_registration import peft_type, register_peft_methods

        self.peft_type = peft_type("sparsegrad")
        register_peft_methods()  # a config built without going through `import sparsegrad` first
        if isinstance(self.target_modules, list):
            self.target_modules = set(self.target_modules)
        if isinstance(self.exclude_modules, list):
            self.exclude_modules = set(self.exclude_modules)
        check_choice("basis", self.basis, BASIS_SOURCES)
        check_choice("orientation", self.orientation, ORIENTATIONS)
        if self.storage is not None:
            check_choice("storage", self.storage, STORAGES)
        check_topk_at(self.topk_at)
        if self.dense_weight_grad:
            if self.storage == "weight" or self.topk_at != "backward":
                raise ValueError("dense_weight_grad=True needs storage='rotated' (a dense optimizer adds the gradient "
                                 "to the parameter, which must then be ΔW~) and topk_at='backward'")  # fmt: skip
            self.storage = "rotated"
