"""MeProp's PEFT tuner: :class:`MePropModel` (what ``get_peft_model`` builds for a
:class:`~sparsegrad.methods.meprop.config.MePropConfig`) and its layer :class:`MePropLayer`: the frozen
base linear plus, per adapter, a bias-free :class:`~sparsegrad.MePropLinear` (mode "weight") holding
ΔW, whose gradient is the top-k of dL/dW (see :mod:`sparsegrad.peft_tuner`). The saved adapter holds,
per layer, ΔW and the record of updated coordinates.
"""

from __future__ import annotations

from torch import nn

from sparsegrad.methods.meprop.layer import MePropLinear
from sparsegrad.peft_tuner import DeltaLayer, DeltaTuner

__all__ = ["MePropLayer", "MePropModel"]


class MePropLayer(DeltaLayer):
    """A linear adapted by MeProp: the frozen base layer plus, per adapter, a MePropLinear with ΔW."""

    adapter_layer_names = ("meprop_delta",)

    def make_delta(self, start: nn.Linear, config, adapter_name: str, **kwargs) -> nn.Module:
        return MePropLinear.from_linear(start, config.k, "weight", sparse_by_dense=config.sparse_by_dense,
                                        topk_at=config.topk_at, dense_weight_grad=config.dense_weight_grad)  # fmt: skip


class MePropModel(DeltaTuner):
    """The PEFT tuner of MeProp: swaps each target linear for a :class:`MePropLayer`."""

    prefix = "meprop_"
    tuner_layer_cls = MePropLayer
