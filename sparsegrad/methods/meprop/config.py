"""``MePropConfig``: the paper's MeProp baseline as a PEFT method (``get_peft_model(model, MePropConfig(...))``).

Each target linear keeps W0 frozen and gains a change ΔW trained MeProp's way (see
:mod:`sparsegrad.peft_tuner`): per step the k largest entries of dL/dW, in the original space. Only
MeProp's mode "weight" fits this shape: mode "output" (meProp of Sun et al.) sparsifies dL/dY before
dL/dx is computed, so the frozen base layer's backward pass would have to change too, which an
adapter beside it cannot do (use ``sparsegrad.apply_method(model, {"name": "meprop", "meprop_mode":
"output"})`` for it).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from peft.config import PeftConfig

from sparsegrad.layer_common import check_topk_at

__all__ = ["MePropConfig"]


def _help(text: str) -> dict:
    return {"help": text}


@dataclass
class MePropConfig(PeftConfig):
    """The configuration of a MeProp adapter.

    Args:
        target_modules / exclude_modules / modules_to_save: as peft's (default targets: the MLP linears).
        k: entries of dL/dW kept per layer and step (an int count or a float fraction of in*out).
        topk_at, sparse_by_dense: as for :class:`sparsegrad.MePropLinear`.
        dense_weight_grad: give the top-k gradient as a dense tensor (zeros elsewhere) for a dense
            optimizer (the authors' MeProp under AdamW, whose momentum keeps moving the other entries);
            default: sparse COO, for :func:`sparsegrad.build_optimizer`'s lazy Adam.
        init_weights: True: ΔW = 0; False: a random ΔW, for tests.
    """

    target_modules: list[str] | str | None = field(
        default=None, metadata=_help("the linears to adapt (names, suffixes or a regular expression)"))
    exclude_modules: list[str] | str | None = field(default=None, metadata=_help("linears to leave alone"))
    k: int | float = field(default=0.01, metadata=_help("entries of dL/dW per layer and step (count or fraction)"))
    topk_at: str = field(default="backward", metadata=_help("'backward' or 'step'"))
    sparse_by_dense: bool = field(default=True, metadata=_help("drop all-zero rows of dL/dY"))
    dense_weight_grad: bool = field(default=False, metadata=_help("the top-k gradient as a dense tensor"))
    init_weights: bool = field(default=True, metadata=_help("True: ΔW = 0; False: random (tests)"))
    modules_to_save: list[str] | None = field(default=None, metadata=_help("other modules to train and save"))

    def __post_init__(self) -> None:
        super().__post_init__()
        from sparsegrad.peft_registration import peft_type, register_peft_methods

        self.peft_type = peft_type("meprop")
        register_peft_methods()
        if isinstance(self.target_modules, list):
            self.target_modules = set(self.target_modules)
        if isinstance(self.exclude_modules, list):
            self.exclude_modules = set(self.exclude_modules)
        check_topk_at(self.topk_at)
        if self.dense_weight_grad and self.topk_at == "step":
            raise ValueError("dense_weight_grad (the top-k of each backward pass, dense, for a dense optimizer) and "
                             "topk_at='step' (the top-k taken by the lazy sparse Adam's step) exclude each other")  # fmt: skip
