"""``MePropConfig``: the paper's MeProp baseline as a PEFT method (``get_peft_model(model, MePropConfig(...))``).

Each target linear keeps W0 frozen and gains a change ΔW trained MeProp's way (see
:mod:`sparsegrad.peft_tuner`): per step the k largest entries of dL/dW, in the original space. Only
MeProp's mode "weight" fits this shape: mode "output" (meProp of Sun et al.) sparsifies dL/dY before
dL/dx is computed, so the frozen base layer's backward pass would have to change too, which an
adapter beside it cannot do (use ``sparsegrad.apply_method(model, {"name": "meprop", "meprop_mode":
"output"})`` for it).
"""

from __future__ import annotations

from dataclasses import dataclass

from sparsegrad.peft_tuner import DeltaConfig

__all__ = ["MePropConfig"]


@dataclass
class MePropConfig(DeltaConfig):
    """The configuration of a MeProp adapter: the options of :class:`~sparsegrad.peft_tuner.DeltaConfig`
    (``dense_weight_grad=True`` is the authors' MeProp under dense AdamW)."""

    method = "meprop"
