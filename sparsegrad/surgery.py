"""Model surgery: apply a fine-tuning method to the MLP linears of a model, and merge it back.

``apply_method(model, cfg)`` finds the target linears (:func:`sparsegrad.find_targets`), sets
``requires_grad`` for the chosen setting and swaps the targets:

* ``full``       — targets stay ``nn.Linear`` and train densely;
* ``lora``       — peft LoRA adapters on the targets (the returned model is a ``PeftModel``);
* ``meprop``     — :class:`~sparsegrad.layers.MePropLinear` (mode "weight" or "output");
* ``sparsegrad`` — :class:`~sparsegrad.layers.SparseGradLinear` in a transition basis;
* ``leading_block`` — :class:`~sparsegrad.fixed_support.LeadingBlockLinear`: SparseGrad restricted to
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
import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from torch import nn

from .basis import Basis, estimate_basis
from .layers import (
    FORMULATIONS,
    MEPROP_MODES,
    ORIENTATIONS,
    STORAGES,
    TOPK_AT,
    MePropLinear,
    SparseGradLinear,
)
from .targets import Target, find_targets

__all__ = ["METHODS", "MethodConfig", "apply_method", "merge", "set_submodule"]

METHODS = ("full", "lora", "meprop", "sparsegrad", "leading_block")


@dataclass
class MethodConfig:
    """What :func:`apply_method` does. Also accepted as a plain dict with these keys.

    k: gradient budget per MLP linear for sparsegrad / leading_block / meprop "weight" (int count, or
        float fraction of in*out; the paper keeps ~1%: 28000 of 768*3072 for BERT-base).
    block_factor: leading_block only: the trained block is the leading block with at least
        ``block_factor * k`` entries; the top-k of its gradient train (dense when it has exactly k).
    meprop_mode: "weight" (top-k of dL/dW, the paper's baseline) or "output" (top-k of dL/dY per row,
        Sun et al. 2017) with ``meprop_k_per_row`` entries kept per row (count or fraction of out).
    lora_rank / lora_alpha / lora_dropout: peft LoRA (paper: rank 7 base encoders, 10 large,
        32 LLaMA-2); ``lora_alpha=None`` means alpha = rank (scale 1).
    orientation: "hosvd" (Tucker core) or "official" (the authors' code); formulation: "auto" or
        "regular"; sparse_by_dense: drop zero rows of dL/dY (paper §3.3); storage: "weight" (keep only
        W; the default except for the regular formulation; needs :func:`sparsegrad.build_optimizer`) or
        "rotated" (keep W~ and a cached W; any sparse optimizer), see :class:`SparseGradLinear`.
    topk_at: when the top-k of a sparse weight gradient is taken (sparsegrad, leading_block, meprop
        "weight"): "backward" (every backward pass, the paper's) or "step" (once per optimizer step, from
        the dense gradient summed over gradient accumulation and all-reduced across data-parallel
        processes: required under DistributedDataParallel / accelerate; the optimizer takes it).
    target_patterns: group -> regex (default by model_type); every_nth_block: keep blocks whose index
        is divisible by it (LLaMA setting: 3); train_non_mlp: see module docstring.
    basis_steps / basis_per_layer / basis_micro_batch: used when apply_method estimates the basis from
        ``batches`` (see :func:`sparsegrad.estimate_basis`)
        (sparsegrad and leading_block).
    """

    name: str = "sparsegrad"
    k: int | float = 0.01
    meprop_mode: str = "weight"
    meprop_k_per_row: int | float = 0.05
    lora_rank: int = 7
    lora_alpha: float | None = None
    lora_dropout: float = 0.0
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

    def __post_init__(self) -> None:
        if self.name not in METHODS:
            raise ValueError(f"unknown method {self.name!r}; valid: {', '.join(METHODS)}")
        if not self.block_factor > 0:
            raise ValueError(f"block_factor must be > 0, got {self.block_factor!r}")
        if self.meprop_mode not in MEPROP_MODES:
            raise ValueError(f"unknown meprop_mode {self.meprop_mode!r}; valid: {', '.join(MEPROP_MODES)}")
        if self.orientation not in ORIENTATIONS:
            raise ValueError(f"unknown orientation {self.orientation!r}; valid: {', '.join(ORIENTATIONS)}")
        if self.formulation not in FORMULATIONS:
            raise ValueError(f"unknown formulation {self.formulation!r}; valid: {', '.join(FORMULATIONS)}")
        if self.topk_at not in TOPK_AT:
            raise ValueError(f"unknown topk_at {self.topk_at!r}; valid: {', '.join(TOPK_AT)}")
        if self.storage is not None and self.storage not in STORAGES:
            raise ValueError(f"unknown storage {self.storage!r}; valid: {', '.join(STORAGES)} (or null: automatic)")

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
        valid = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(cfg) - valid)
        if unknown:
            raise ValueError(f"unknown method option(s) {unknown}; valid: {sorted(valid)}")
        values = dict(cfg)
        if values.get("target_patterns") is not None:
            values["target_patterns"] = dict(values["target_patterns"])
        return cls(**values)


def set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    """Replace the submodule at dotted path ``name``."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


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

    For "sparsegrad" and "leading_block" pass ``basis=estimate_basis(model, batches, ...)`` (estimated
    on the same targets), or ``batches`` to let this call estimate it with ``cfg.basis_steps`` batches.
    """
    cfg = MethodConfig.from_any(cfg)
    targets = find_targets(model, cfg.target_patterns, cfg.every_nth_block)
    if cfg.name in ("sparsegrad", "leading_block") and basis is None:
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
    if cfg.name == "lora":
        model = _apply_lora(model, cfg, targets)
    elif cfg.name == "meprop":
        k = cfg.k if cfg.meprop_mode == "weight" else cfg.meprop_k_per_row
        for t in targets:
            linear = model.get_submodule(t.name)
            set_submodule(
                model, t.name,
                MePropLinear.from_linear(linear, k, cfg.meprop_mode, sparse_by_dense=cfg.sparse_by_dense,
                                         topk_at=cfg.topk_at if cfg.meprop_mode == "weight" else "backward"),
            )  # fmt: skip
    elif cfg.name == "sparsegrad":
        prepared: dict[int, tuple] = {}  # one converted copy per basis, shared by the group's layers
        for t in targets:
            linear = model.get_submodule(t.name)
            group_basis = basis.for_layer(t.name, t.group)
            if id(group_basis) not in prepared:
                prepared[id(group_basis)] = SparseGradLinear.prepare_basis(
                    group_basis.u_in, group_basis.u_out, linear.weight, cfg.orientation
                )
            u_in, u_out = prepared[id(group_basis)]
            layer = SparseGradLinear.from_linear(
                linear, u_in, u_out, cfg.k, orientation=cfg.orientation, formulation=cfg.formulation,
                storage=cfg.storage, sparse_by_dense=cfg.sparse_by_dense, topk_at=cfg.topk_at,
            )  # fmt: skip
            set_submodule(model, t.name, layer)
    elif cfg.name == "leading_block":
        from .fixed_support import apply_leading_block  # fixed_support imports this module

        apply_leading_block(
            model, basis, cfg.k, block_factor=cfg.block_factor, orientation=cfg.orientation,
            sparse_by_dense=cfg.sparse_by_dense, target_patterns=cfg.target_patterns,
            every_nth_block=cfg.every_nth_block, train_non_mlp=cfg.train_non_mlp, topk_at=cfg.topk_at,
        )  # fmt: skip
    model.sparsegrad_method = cfg
    return model


def _apply_lora(model: nn.Module, cfg: MethodConfig, targets: list[Target]) -> nn.Module:
    from peft import LoraConfig, get_peft_model  # peft is only needed on this path

    alpha = cfg.lora_alpha if cfg.lora_alpha is not None else cfg.lora_rank
    target_names = {t.name for t in targets}
    # The other trainable modules (the paper's encoder setting trains them all) go to peft's
    # modules_to_save, so PeftModel.save_pretrained writes them beside the adapters; bias="lora_only":
    # the target biases (trained densely in every method) are saved too.
    others = [name for name, m in model.named_modules()
              if name and name not in target_names and any(p.requires_grad for p in m.parameters(recurse=False))]  # fmt: skip
    listed = [id(p) for name in others for p in model.get_submodule(name).parameters(recurse=False)]
    tied = len(set(listed)) < len(listed)  # e.g. tied input and output embeddings
    lora_cfg = LoraConfig(
        r=cfg.lora_rank, lora_alpha=alpha, lora_dropout=cfg.lora_dropout,
        target_modules=sorted(target_names), bias="lora_only", modules_to_save=others or None,
        ensure_weight_tying=tied,
    )  # fmt: skip
    flags = {id(p): p.requires_grad for p in model.parameters()}
    peft_model = get_peft_model(model, lora_cfg)
    if not tied:  # tied modules keep peft's own copies, tied to each other
        _train_modules_in_place(peft_model)
    # peft freezes every non-adapter parameter; restore our setting, with the target weights frozen.
    target_weights = {id(model.get_submodule(t.name).base_layer.weight) for t in targets}
    for name, p in peft_model.named_parameters():
        if "lora_" in name:
            p.requires_grad_(True)
        elif id(p) in target_weights:
            p.requires_grad_(False)
        elif id(p) in flags:
            p.requires_grad_(flags[id(p)])
    return peft_model


def _train_modules_in_place(peft_model: nn.Module) -> None:
    """peft trains a copy of each module in modules_to_save and keeps the original frozen beside it;
    here the original is the trained one (no second copy of embeddings and attention in memory).
    PeftModel.save_pretrained and merge_and_unload see the same modules as with the copy;
    ``disable_adapter()`` keeps these modules' trained values (the paper setting has no frozen
    version of them)."""
    from peft.utils.other import ModulesToSaveWrapper

    for module in list(peft_model.modules()):
        if isinstance(module, ModulesToSaveWrapper):
            for adapter in list(module.modules_to_save):
                module.modules_to_save[adapter] = module.original_module


def merge(model: nn.Module) -> nn.Module:
    """Turn every swapped layer back into a plain module; returns the plain model.

    LoRA: ``merge_and_unload()`` (returns the base transformers model). SparseGradLinear:
    ``W = u_out W~ R^T``. MePropLinear: its weight as is. LeadingBlockLinear: W with its block folded in.
    """
    from .fixed_support import LeadingBlockLinear  # fixed_support imports this module

    peft = sys.modules.get("peft")
    if peft is not None and isinstance(model, peft.PeftModel):
        model = model.merge_and_unload()
    swapped = [(n, m) for n, m in model.named_modules()
               if isinstance(m, (SparseGradLinear, MePropLinear, LeadingBlockLinear))]  # fmt: skip
    for name, module in swapped:
        linear = module.to_linear()
        linear.train(module.training)
        set_submodule(model, name, linear)
    if hasattr(model, "sparsegrad_method"):
        del model.sparsegrad_method
    return model
