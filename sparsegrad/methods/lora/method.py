"""``lora``: peft LoRA adapters on the targets; the returned model is a ``PeftModel``.

Options: ``lora_rank`` (paper: 7 base encoders, 10 large, 32 LLaMA-2), ``lora_alpha`` (None: alpha =
rank, scale 1), ``lora_dropout``, ``lora_variant``: "standard" (peft as configured) or "authors" — the
LoRA of the authors' BERT/RoBERTa code: y = x W^T + (1/r) (x A) B^T, alpha = 1 (scale 1/r), A drawn
Kaiming-uniform (a = sqrt(5)) as their in x r matrix, i.e. U(-1/sqrt(r), 1/sqrt(r)) (peft draws its
r x in ``lora_A`` with fan-in = in: U(-1/sqrt(in), 1/sqrt(in))), B zero, no dropout. (Their LLaMA runs
used peft with alpha = rank, the "standard" variant.) The target weights are frozen, the adapters train densely (AdamW);
every other parameter keeps the ``train_non_mlp`` setting (peft would freeze them all); the trainable
ones are peft ``modules_to_save`` (trained in place, not copied), so ``save_pretrained`` writes them
(:mod:`sparsegrad.peft_adapters`).
Merging is peft's ``merge_and_unload``; accounting counts the adapters as ``lora_params``.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from sparsegrad.peft_adapters import apply_peft_adapter, unwrap_peft_model
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
        from peft import LoraConfig  # peft is only needed on this path

        if cfg.lora_variant == "authors":
            alpha = 1.0
        else:
            alpha = cfg.lora_alpha if cfg.lora_alpha is not None else cfg.lora_rank

        def config(target_modules, modules_to_save, tied):
            # bias="lora_only": the target biases (trained densely in every method) are saved too
            return LoraConfig(
                r=cfg.lora_rank, lora_alpha=alpha, lora_dropout=cfg.lora_dropout, target_modules=target_modules,
                bias="lora_only", modules_to_save=modules_to_save, ensure_weight_tying=tied,
            )  # fmt: skip

        peft_model = apply_peft_adapter(model, targets, config, self.is_adapter_parameter)
        if cfg.lora_variant == "authors":
            _authors_init(peft_model)
        return peft_model

    def unwrap_model(self, model: nn.Module) -> nn.Module:
        return unwrap_peft_model(model)

    def is_adapter_parameter(self, param_name: str) -> bool:
        return "lora_" in param_name


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
