"""``lora``: peft LoRA adapters on the targets; the returned model is a ``PeftModel``.

Options: ``lora_rank`` (paper: 7 base encoders, 10 large, 32 LLaMA-2), ``lora_alpha`` (None: alpha =
rank, scale 1), ``lora_dropout``. The target weights are frozen, the adapters train densely (AdamW);
every other parameter keeps the ``train_non_mlp`` setting (peft would freeze them all). Merging is
peft's ``merge_and_unload``; accounting counts the adapters as ``lora_params``.
"""

from __future__ import annotations

import sys

from torch import nn

from ..registry import Method, register_method

__all__ = ["Lora"]


@register_method
class Lora(Method):
    name = "lora"
    options = ("lora_rank", "lora_alpha", "lora_dropout")

    def apply(self, model: nn.Module, cfg, targets: list, basis=None) -> nn.Module:
        from peft import LoraConfig, get_peft_model  # peft is only needed on this path

        alpha = cfg.lora_alpha if cfg.lora_alpha is not None else cfg.lora_rank
        lora_cfg = LoraConfig(
            r=cfg.lora_rank, lora_alpha=alpha, lora_dropout=cfg.lora_dropout,
            target_modules=[t.name for t in targets], bias="none",
        )  # fmt: skip
        flags = {id(p): p.requires_grad for p in model.parameters()}
        peft_model = get_peft_model(model, lora_cfg)
        # peft freezes every non-adapter parameter; restore our setting, with the target weights frozen.
        target_weights = {id(model.get_submodule(t.name).base_layer.weight) for t in targets}
        for name, p in peft_model.named_parameters():
            if self.is_adapter_parameter(name):
                p.requires_grad_(True)
            elif id(p) in target_weights:
                p.requires_grad_(False)
            elif id(p) in flags:
                p.requires_grad_(flags[id(p)])
        return peft_model

    def unwrap_model(self, model: nn.Module) -> nn.Module:
        peft = sys.modules.get("peft")  # a PeftModel exists only if peft was imported
        if peft is not None and isinstance(model, peft.PeftModel):
            return model.merge_and_unload()
        return model

    def is_adapter_parameter(self, param_name: str) -> bool:
        return "lora_" in param_name
