"""``lora``: peft LoRA adapters on the targets; the returned model is a ``PeftModel``.

Options: ``lora_rank`` (paper: 7 base encoders, 10 large, 32 LLaMA-2), ``lora_alpha`` (None: alpha =
rank, scale 1), ``lora_dropout``, ``lora_variant``: "standard" (peft as configured) or "authors" — the
LoRA of the authors' BERT/RoBERTa code: y = x W^T + (1/r) (x A) B^T, alpha = 1 (scale 1/r), A drawn
Kaiming-uniform (a = sqrt(5)) as their in x r matrix, i.e. U(-1/sqrt(r), 1/sqrt(r)) (peft draws its
r x in ``lora_A`` with fan-in = in: U(-1/sqrt(in), 1/sqrt(in))), B zero, no dropout. (Their LLaMA runs
used peft with alpha = rank, the "standard" variant.) The target weights are frozen, the adapters train densely (AdamW);
every other parameter keeps the ``train_non_mlp`` setting (peft would freeze them all); the trainable
ones are peft ``modules_to_save`` (trained in place, not copied), so ``save_pretrained`` writes them.
Merging is peft's ``merge_and_unload``; accounting counts the adapters as ``lora_params``.
"""

from __future__ import annotations

import math
import sys

import torch
from torch import nn

from sparsegrad.registry import Method, register_method

__all__ = ["Lora", "LORA_VARIANTS"]

LORA_VARIANTS = ("standard", "authors")


@register_method
class Lora(Method):
    name = "lora"
    options = ("lora_rank", "lora_alpha", "lora_dropout", "lora_variant")

    def check(self, cfg) -> None:
        if cfg.lora_variant not in LORA_VARIANTS:
            raise ValueError(f"unknown lora_variant {cfg.lora_variant!r}; valid: {', '.join(LORA_VARIANTS)}")
        if cfg.lora_variant == "authors" and (cfg.lora_alpha not in (None, 1) or cfg.lora_dropout):
            raise ValueError(
                f"lora_variant='authors' fixes alpha = 1 and dropout = 0, but lora_alpha={cfg.lora_alpha!r}, "
                f"lora_dropout={cfg.lora_dropout!r}; leave them unset (null / 0) or use lora_variant='standard'"
            )

    def apply(self, model: nn.Module, cfg, targets: list, basis=None) -> nn.Module:
        from peft import LoraConfig, get_peft_model  # peft is only needed on this path

        if cfg.lora_variant == "authors":
            alpha = 1.0
        else:
            alpha = cfg.lora_alpha if cfg.lora_alpha is not None else cfg.lora_rank
        target_names = {t.name for t in targets}
        # The other trainable modules (the paper's encoder setting trains them all) go to peft's
        # modules_to_save, so PeftModel.save_pretrained writes them beside the adapters; bias="lora_only":
        # the target biases (trained densely in every method) are saved too.
        others = [name for name, m in model.named_modules() if name and name not in target_names
                  and any(p.requires_grad for p in m.parameters(recurse=False))]  # fmt: skip
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
            if self.is_adapter_parameter(name):
                p.requires_grad_(True)
            elif id(p) in target_weights:
                p.requires_grad_(False)
            elif id(p) in flags:
                p.requires_grad_(flags[id(p)])
        if cfg.lora_variant == "authors":
            _authors_init(peft_model)
        return peft_model

    def unwrap_model(self, model: nn.Module) -> nn.Module:
        peft = sys.modules.get("peft")  # a PeftModel exists only if peft was imported
        if peft is not None and isinstance(model, peft.PeftModel):
            return model.merge_and_unload()
        return model

    def is_adapter_parameter(self, param_name: str) -> bool:
        return "lora_" in param_name


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


@torch.no_grad()
def _authors_init(model: nn.Module) -> None:
    """Redraw every ``lora_A`` (r x in in peft) as the authors drew their A (in x r): Kaiming-uniform
    with a = sqrt(5) over that layout (fan-in r), transposed into place; B stays zero."""
    for name, module in model.named_modules():
        if name.endswith("lora_A.default") and isinstance(module, nn.Linear):
            weight = module.weight
            a_authors = torch.empty(weight.shape[1], weight.shape[0], dtype=torch.float32, device=weight.device)
            nn.init.kaiming_uniform_(a_authors, a=math.sqrt(5))
            weight.copy_(a_authors.t())
