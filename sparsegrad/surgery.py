"""Model surgery: apply a fine-tuning method to the MLP linears of a model, and merge it back.

``apply_method(model, cfg)`` finds the target linears (:func:`sparsegrad.find_targets`), sets
``requires_grad`` for the chosen setting, and hands the targets to the method registered under
``cfg.name`` (:mod:`sparsegrad.registry`; the built-in ones, one module each, in
:mod:`sparsegrad.methods`):

* ``full``       — targets stay ``nn.Linear`` and train densely;
* ``lora``       — peft LoRA adapters on the targets (the returned model is a ``PeftModel``);
* ``meprop``     — :class:`~sparsegrad.methods.sparsegrad.layer.MePropLinear` (mode "weight" or "output");
* ``sparsegrad`` — :class:`~sparsegrad.methods.sparsegrad.layer.SparseGradLinear` in a transition basis;
* ``leading_block`` — :class:`~sparsegrad.methods.leading_block.layer.LeadingBlockLinear`: SparseGrad restricted to
  the leading ``~block_factor * k`` entries of the transition basis (same basis as ``sparsegrad``).

Settings: ``train_non_mlp=True`` (the paper's encoder setting) keeps every non-target parameter
trainable in every method — embeddings, attention, LayerNorm, pooler and classifier head;
``train_non_mlp=False`` (the paper's LLaMA setting, with ``every_nth_block=3``) trains only the
selected MLP linears. Target biases always train densely.

``merge(model)`` turns every swapped layer back into a plain module (LoRA: ``merge_and_unload``), so
the result saves and loads with plain transformers.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from sparsegrad import (
    methods as _builtin_methods,  # noqa: F401  (registers full, lora, meprop, sparsegrad, leading_block)
)
from sparsegrad.data_parallel import prepare_data_parallel, release_data_parallel
from sparsegrad.integrations import watch_sparse_parameters
from sparsegrad.methods.sparsegrad.basis import Basis, estimate_basis
from sparsegrad.registry import METHODS, get_method, registered_methods, swapped_modules
from sparsegrad.targets import Target, find_targets, set_submodule

__all__ = ["METHODS", "MethodConfig", "apply_method", "merge", "set_submodule"]


@dataclass
class MethodConfig:
    """What :func:`apply_method` does. Also accepted as a plain dict with these keys.

    k: gradient budget per MLP linear for sparsegrad / leading_block / meprop "weight" (int count, or
        float fraction of in*out; the paper keeps ~1%: 28000 of 768*3072 for BERT-base).
    block_factor: leading_block only: the trained block is the leading block with at least
        ``block_factor * k`` entries; the top-k of its gradient train (dense when it has exactly k).
    meprop_mode: "weight" (top-k of dL/dW, the paper's baseline) or "output" (top-k of dL/dY per row,
        Sun et al. 2017) with ``meprop_k_per_row`` entries kept per row (count or fraction of out).
    meprop_optimizer: "lazy_adam" (mode "weight": the sparse top-k gradient goes to the lazy sparse
        Adam, only the top-k coordinates move) or "adamw" (the authors' MeProp: the same top-k
        gradient as a dense tensor under dense AdamW, whose momentum keeps moving the other weights);
        None: "lazy_adam" in mode "weight", "adamw" in mode "output" (its gradient is dense).
    lora_rank / lora_alpha / lora_dropout: peft LoRA (paper: rank 7 base encoders, 10 large,
        32 LLaMA-2); ``lora_alpha=None`` means alpha = rank (scale 1).
    lora_variant: "standard" (peft as configured by lora_alpha / lora_dropout) or "authors" (the
        authors' BERT/RoBERTa LoRA: alpha = 1, i.e. scale 1/r, A Kaiming-uniform drawn as their
        in x r matrix, B zero, no dropout; lora_alpha and lora_dropout must be left unset / 0).
    orientation: "hosvd" (Tucker core) or "official" (the authors' code); formulation: "auto" or
        "regular"; sparse_by_dense: drop zero rows of dL/dY (paper §3.3); storage: "weight" (keep only
        W; the default except for the regular formulation; needs :func:`sparsegrad.build_optimizer`) or
        "rotated" (keep W~ and a cached W; any sparse optimizer), see :class:`SparseGradLinear`.
    topk_at: when the top-k of a sparse weight gradient is taken (sparsegrad, leading_block, meprop
        "weight"): "backward" (every backward pass, the paper's; under data parallelism each process
        keeps its own top-k and only those entries are exchanged, :mod:`sparsegrad.data_parallel`) or
        "step" (once per optimizer step, from the dense gradient summed over gradient accumulation and
        all-reduced across data-parallel processes; the optimizer takes it).
    target_patterns: group -> regex (default by model_type); every_nth_block: keep blocks whose index
        is divisible by it (LLaMA setting: 3); train_non_mlp: see module docstring.
    basis_steps / basis_per_layer / basis_micro_batch: used when apply_method estimates the basis from
        ``batches`` (see :func:`sparsegrad.estimate_basis`)
        (sparsegrad and leading_block).
    options: options of a registered method that are not fields here (its ``extra_options``); a
        plain dict given to :meth:`from_any` may carry them at the top level. Read with :meth:`option`.

    Which options a method reads, and their valid values, are declared by the method itself
    (``options`` and ``check`` of its :class:`sparsegrad.Method`).
    """

    name: str = "sparsegrad"
    k: int | float = 0.01
    meprop_mode: str = "weight"
    meprop_k_per_row: int | float = 0.05
    meprop_optimizer: str | None = None
    lora_rank: int = 7
    lora_alpha: float | None = None
    lora_dropout: float = 0.0
    lora_variant: str = "standard"
    orientation: str = "hosvd"
    formulation: str = "auto"
    storage: str | None = None
    sparse_by_dense: bool = True
    target_patterns: dict[str, str] | None = None
    every_nth_block: int | None = None
    train_non_mlp: bool = True
    basis_steps: int | None = None
    basis_per_layer: bool = False
    basis_micro_batch: int | None = None
    block_factor: float = 2.0
    topk_at: str = "backward"
    options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        method = get_method(self.name)  # ValueError with the valid names
        unknown = sorted(set(self.options or {}) - set(method.extra_options))
        if unknown:
            raise ValueError(f"unknown option(s) {unknown} for method {self.name!r}; its own options: "
                             f"{sorted(method.extra_options) or 'none'}")  # fmt: skip
        method.check(self)

    @property
    def method(self):
        """The registered :class:`sparsegrad.Method` this config names."""
        return get_method(self.name)

    def option(self, key: str):
        """A method's own option (``extra_options``): its value here, or the method's default."""
        extra = self.method.extra_options
        if key not in extra:
            raise KeyError(f"method {self.name!r} has no option {key!r}; its own options: {sorted(extra) or 'none'}")
        return (self.options or {}).get(key, extra[key])

    @classmethod
    def from_any(cls, cfg) -> MethodConfig:
        """A MethodConfig from a MethodConfig, a Mapping (e.g. an OmegaConf/dict node), or None."""
        if cfg is None:
            return cls()
        if isinstance(cfg, cls):
            return cfg
        if isinstance(cfg, str):
            return cls(name=cfg)
        if dataclasses.is_dataclass(cfg):
            cfg = dataclasses.asdict(cfg)
        if not isinstance(cfg, Mapping):
            cfg = dict(cfg)
        fields = {f.name for f in dataclasses.fields(cls)}
        values = dict(cfg)
        extra = dict(get_method(values.get("name", cls.name)).extra_options)
        options = dict(values.pop("options", None) or {})
        for key in [key for key in values if key not in fields and key in extra]:
            options[key] = values.pop(key)  # a method's own option given at the top level
        unknown = sorted(set(values) - fields)
        if unknown:
            raise ValueError(f"unknown method option(s) {unknown}; valid: {sorted((fields - {'options'}) | set(extra))}")
        if values.get("target_patterns") is not None:
            values["target_patterns"] = dict(values["target_patterns"])
        return cls(**values, options=options)


def _set_trainable(model: nn.Module, targets: list[Target], train_non_mlp: bool) -> None:
    for p in model.parameters():
        p.requires_grad_(train_non_mlp)
    for t in targets:
        module = model.get_submodule(t.name)
        for p in module.parameters():
            p.requires_grad_(True)


def apply_method(
    model: nn.Module,
    cfg=None,
    *,
    basis: Basis | None = None,
    batches: Iterable[Mapping] | None = None,
) -> nn.Module:
    """Apply a method to ``model`` in place and return the model to train (a PeftModel for "lora").

    ``cfg``: a :class:`MethodConfig`, a dict of its fields, or a method name. For a method that needs a
    transition basis ("sparsegrad", "leading_block") pass ``basis=estimate_basis(model, batches, ...)`` (estimated
    on the same targets), or ``batches`` to let this call estimate it with ``cfg.basis_steps`` batches.
    """
    cfg = MethodConfig.from_any(cfg)
    method = get_method(cfg.name)
    targets = find_targets(model, cfg.target_patterns, cfg.every_nth_block)
    if method.needs_basis and basis is None:
        if batches is None:
            raise ValueError(
                f"method {cfg.name!r} needs a transition basis: pass basis=sparsegrad.estimate_basis(model, "
                "batches, steps=...) or batches=... (dicts fed as model(**batch), with labels)"
            )
        basis = estimate_basis(
            model, batches, targets, steps=cfg.basis_steps, per_layer=cfg.basis_per_layer,
            micro_batch=cfg.basis_micro_batch,
        )
    _set_trainable(model, targets, cfg.train_non_mlp)
    model = method.apply(model, cfg, targets, basis)
    model.sparsegrad_method = cfg
    watch_sparse_parameters(model)  # an optimizer other than build_optimizer's is refused at its first step
    # per-backward top-k: DistributedDataParallel leaves the sparse weights to the optimizer's exchange
    return prepare_data_parallel(model)


def merge(model: nn.Module) -> nn.Module:
    """Turn every swapped layer back into a plain module; returns the plain model.

    Each registered method undoes its model-level wrapper and merges the layers it swapped in. LoRA: ``merge_and_unload()`` (returns the base transformers model). SparseGradLinear:
    ``W = u_out W~ R^T``. MePropLinear: its weight as is. LeadingBlockLinear: W with its block folded in.
    """
    release_data_parallel(model)
    for method in registered_methods():
        model = method.unwrap_model(model)
    for name, module, method in list(swapped_modules(model)):
        set_submodule(model, name, method.merge_layer(module))
    if hasattr(model, "sparsegrad_method"):
        del model.sparsegrad_method
    return model
