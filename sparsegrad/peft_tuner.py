"""What the PEFT methods of the package share: their config options, a sparse-gradient layer trained as a
change of a frozen linear, and its PEFT tuner.

A PEFT adapter here is the change of a target's weight, ``ΔW`` (out x in, zero at the start), held by one
of the method's own layers (a :class:`~sparsegrad.SparseGradLinear` or a
:class:`~sparsegrad.MePropLinear` without bias) beside the frozen base layer::

    y = x W0^T + b0 + x ΔW^T

so dL/dx is exact and the layer's weight gradient is the method's: for SparseGrad the k largest
entries of ``dL/dΔW~ = u_out^T (dL/dW) R`` (dL/dΔW = dL/dW), for MeProp the k largest of dL/dW. Merging
adds ``ΔW`` to ``W0``; disabling the adapter drops the term; several adapters add up. The layer's
gradient is sparse COO, so it trains with :func:`sparsegrad.build_optimizer` (which finds these layers
as it finds the layers of :func:`sparsegrad.apply_method`) and, under ``transformers.Trainer``, with
:func:`sparsegrad.prepare_trainer`.

The methods' registration with peft is in :mod:`sparsegrad.peft_registration`.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from peft.config import PeftConfig
from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer, check_adapters_to_merge
from torch import nn

from sparsegrad.layer_common import check_topk_at

__all__ = ["DeltaConfig", "DeltaLayer", "DeltaTuner", "default_target_modules", "option"]


def option(default, text: str):
    """A config field with its help text (peft shows ``metadata["help"]``)."""
    return field(default=default, metadata={"help": text})


@dataclass
class DeltaConfig(PeftConfig):
    """What the configs of the sparse-gradient PEFT methods share (``method``: the registered name).

    Args:
        target_modules / exclude_modules / modules_to_save: as peft's (default targets: the MLP linears
            :func:`sparsegrad.find_targets` finds: up and down of BERT, RoBERTa, LLaMA, Mistral, Qwen2).
        k: entries of the weight gradient kept per layer and step (an int count or a float fraction of
            in*out; the paper keeps about 1%).
        topk_at, sparse_by_dense: as for the method's layer.
        dense_weight_grad: the k-sparse gradient as a dense tensor (zeros elsewhere), for optimizers without
            sparse support (``torch.optim.AdamW``, whose moments then move entries outside each step's
            top-k); default: sparse COO, for :func:`sparsegrad.build_optimizer`'s lazy Adam.
        init_weights: True: ΔW = 0 (the adapter starts as the identity); False: random, for tests.
    """

    method: ClassVar[str] = ""

    target_modules: list[str] | str | None = option(None, "the linears to adapt (names, suffixes or a regular expression)")
    exclude_modules: list[str] | str | None = option(None, "linears to leave alone")
    k: int | float = option(0.01, "entries of the weight gradient per layer and step (count or fraction)")
    topk_at: str = option("backward", "'backward' or 'step'")
    sparse_by_dense: bool = option(True, "drop all-zero rows of dL/dY (paper 3.3)")
    dense_weight_grad: bool = option(False, "the k-sparse gradient as a dense tensor, for a dense optimizer")
    init_weights: bool = option(True, "True: ΔW = 0; False: random (tests)")
    modules_to_save: list[str] | None = option(None, "other modules to train and save")

    def __post_init__(self) -> None:
        super().__post_init__()
        from sparsegrad.peft_registration import peft_type, register_peft_methods

        self.peft_type = peft_type(self.method)
        register_peft_methods()  # a config built without going through `import sparsegrad` first
        if isinstance(self.target_modules, list):
            self.target_modules = set(self.target_modules)
        if isinstance(self.exclude_modules, list):
            self.exclude_modules = set(self.exclude_modules)
        check_topk_at(self.topk_at)
        if self.dense_weight_grad and self.topk_at != "backward":
            raise ValueError("dense_weight_grad (the top-k of each backward pass, dense, for a dense optimizer) and "
                             "topk_at='step' (the top-k taken by the lazy sparse Adam's step) exclude each other")  # fmt: skip


def default_target_modules() -> dict[str, str]:
    """peft's ``target_modules`` (a regular expression) per ``model_type``: the MLP linears that
    :func:`sparsegrad.find_targets` finds by default."""
    from sparsegrad.targets import DEFAULT_PATTERNS

    return {model_type: "|".join(f"(?:.*(?:{p}))" for p in patterns.values())
            for model_type, patterns in DEFAULT_PATTERNS.items()}  # fmt: skip


class DeltaLayer(nn.Module, BaseTunerLayer):
    """A PEFT tuner layer: the frozen ``base_layer`` (an ``nn.Linear``) plus, per adapter, a layer of the
    method holding the change ``ΔW`` (see the module doc). Subclasses name the container of those
    layers (``adapter_layer_names``, e.g. ``("sparsegrad_delta",)``) and build them (:meth:`make_delta`).
    ``other_param_names`` are plain dicts adapter -> value."""

    adapter_layer_names: ClassVar[tuple[str, ...]] = ()
    other_param_names: ClassVar[tuple[str, ...]] = ()
    #: the standard deviation of a random change (``init_weights=False``, for tests: a non-zero adapter)
    random_init_std: ClassVar[float] = 0.1

    def __init__(self, base_layer: nn.Module, adapter_name: str, config, **kwargs) -> None:
        super().__init__()
        if not isinstance(base_layer, nn.Linear):
            raise TypeError(
                f"{type(self).__name__} adapts torch.nn.Linear layers only, got {type(base_layer).__name__}; "
                "choose target_modules that name linear layers"
            )
        self.base_layer = base_layer
        setattr(self, self.adapter_layer_names[0], nn.ModuleDict())
        for name in self.other_param_names:
            setattr(self, name, {})
        self._disable_adapters = False
        self.merged_adapters = []
        self.in_features, self.out_features = base_layer.in_features, base_layer.out_features
        self.kwargs = kwargs
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, config, **kwargs)

    @property
    def deltas(self) -> nn.ModuleDict:
        """adapter name -> the layer holding its ΔW."""
        return getattr(self, self.adapter_layer_names[0])

    def make_delta(self, start: nn.Linear, config, adapter_name: str, **kwargs) -> nn.Module:
        """The method's layer holding ΔW, built from ``start`` (a bias-free linear whose weight is the
        initial ΔW)."""
        raise NotImplementedError

    @torch.no_grad()
    def randomize(self, delta: nn.Module) -> None:
        """Give a fresh ΔW random entries (``init_weights=False``: for tests, a non-zero adapter);
        default: all of them, normal with ``random_init_std``."""
        delta.weight.normal_(std=self.random_init_std)
        master = getattr(delta, "weight_master", None)
        if master is not None:
            master.copy_(delta.weight)

    def update_layer(self, adapter_name: str, config, inference_mode: bool = False, **kwargs) -> None:
        base = self.get_base_layer()
        start = torch.nn.utils.skip_init(nn.Linear, self.in_features, self.out_features, bias=False,
                                         device=base.weight.device, dtype=base.weight.dtype)  # fmt: skip
        with torch.no_grad():
            start.weight.zero_()
        start.weight.requires_grad_(True)
        delta = self.make_delta(start, config, adapter_name, **kwargs)
        if not config.init_weights and delta.weight.device.type != "meta":  # meta: the values come from a file
            self.randomize(delta)
        self.deltas[adapter_name] = delta
        self._move_adapter_to_device_of_base_layer(adapter_name)
        self.set_adapter(self.active_adapters, inference_mode=inference_mode)

    @torch.no_grad()
    def get_delta_weight(self, adapter: str) -> torch.Tensor:
        """ΔW of ``adapter`` (out x in) in the layer's dtype (from its float32 master copy where it has one)."""
        return self.deltas[adapter].to_linear().weight.detach()

    @torch.no_grad()
    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        """``W0 <- W0 + ΔW`` for the given (default: active) adapters; ``safe_merge`` checks the sum for
        NaN/inf before writing it."""
        for name in check_adapters_to_merge(self, adapter_names):
            if name not in self.deltas:
                continue
            weight = self.get_base_layer().weight
            merged = (weight.to(torch.float32) + self.get_delta_weight(name).to(torch.float32)).to(weight.dtype)
            if safe_merge and not torch.isfinite(merged).all():
                raise ValueError(f"NaNs detected in the merged weights. The adapter {name} seems to be broken")
            weight.copy_(merged)
            self.merged_adapters.append(name)

    @torch.no_grad()
    def unmerge(self) -> None:
        """Undo :meth:`merge` (``W0 <- W0 - ΔW``, last merged first)."""
        if not self.merged:
            warnings.warn("Already unmerged. Nothing to do.", stacklevel=2)
            return
        while self.merged_adapters:
            name = self.merged_adapters.pop()
            if name in self.deltas:
                weight = self.get_base_layer().weight
                weight.copy_((weight.to(torch.float32) - self.get_delta_weight(name).to(torch.float32)).to(weight.dtype))

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        result = self.base_layer(x, *args, **kwargs)
        if self.merged:
            return result
        for name in self.active_adapters:
            if name not in self.deltas:
                continue
            delta = self.deltas[name]
            result = result + delta(self._cast_input_dtype(x, delta.weight.dtype)).to(result.dtype)
        return result

    def supports_lora_conversion(self, adapter_name: str = "default") -> bool:
        return False

    def __repr__(self) -> str:
        return f"{self.adapter_layer_names[0].partition('_')[0]}." + super().__repr__()


class DeltaTuner(BaseTuner):
    """A PEFT tuner swapping each target ``nn.Linear`` for a :class:`DeltaLayer` (``tuner_layer_cls``)."""

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        cls.target_module_mapping = default_target_modules()

    def layer_kwargs(self, config, adapter_name: str, target: nn.Module, current_key: str) -> dict:
        """Extra keyword arguments of the layer built for the target ``current_key`` (none by default)."""
        return {}

    def _create_and_replace(self, config, adapter_name, target, target_name, parent, current_key, **optional_kwargs):
        base = target.get_base_layer() if isinstance(target, self.tuner_layer_cls) else target
        kwargs = self.layer_kwargs(config, adapter_name, base, current_key)
        if isinstance(target, self.tuner_layer_cls):
            target.update_layer(adapter_name, config, **kwargs)
            return
        if isinstance(target, BaseTunerLayer):
            raise TypeError(f"{current_key!r} already carries a {type(target).__name__} adapter of another method; "
                            f"{type(self).__name__} adapts plain torch.nn.Linear layers")  # fmt: skip
        new_module = self.tuner_layer_cls(target, adapter_name, config, **kwargs)
        if adapter_name not in self.active_adapters:
            new_module.requires_grad_(False)
        self._replace_module(parent, target_name, new_module, target)
