"""Methods whose adapters come from peft (``lora``, ``shira``): putting a peft adapter on the targets in
this package's settings, and taking it off again.

peft freezes every parameter that is not an adapter and would train a copy of every other module it is
asked to save. Here the setting of :func:`sparsegrad.apply_method` holds instead: the adapters train,
the target weights are frozen, every other parameter keeps the ``train_non_mlp`` setting (the target
biases train, as in every method), and the other trainable modules are peft ``modules_to_save`` trained
in place (not copied), so ``PeftModel.save_pretrained`` writes them. peft is imported only on this path.
"""

from __future__ import annotations

import sys
from collections.abc import Callable

from torch import nn

__all__ = ["apply_peft_adapter", "unwrap_peft_model"]


def apply_peft_adapter(model: nn.Module, targets: list, make_config: Callable, is_adapter: Callable[[str], bool]):
    """``get_peft_model(model, make_config(target_names, others, tied))`` with the flags above.

    ``make_config`` receives the sorted target module names, the names of the other modules with a
    trainable parameter (for ``modules_to_save``; None when there are none) and whether some of those
    share a parameter (tied input and output embeddings: peft's own copies, tied to each other, are
    kept then). ``is_adapter(parameter_name)`` tells the adapter parameters.
    """
    from peft import get_peft_model

    target_names = {t.name for t in targets}
    # The other trainable modules (the paper's encoder setting trains them all) go to peft's
    # modules_to_save, so PeftModel.save_pretrained writes them beside the adapters.
    others = [name for name, m in model.named_modules() if name and name not in target_names
              and any(p.requires_grad for p in m.parameters(recurse=False))]  # fmt: skip
    listed = [id(p) for name in others for p in model.get_submodule(name).parameters(recurse=False)]
    tied = len(set(listed)) < len(listed)
    flags = {id(p): p.requires_grad for p in model.parameters()}
    peft_model = get_peft_model(model, make_config(sorted(target_names), others or None, tied))
    if not tied:
        _train_modules_in_place(peft_model)
    # peft freezes every non-adapter parameter; restore our setting, with the target weights frozen.
    target_weights = {id(model.get_submodule(t.name).base_layer.weight) for t in targets}
    for name, p in peft_model.named_parameters():
        if is_adapter(name):
            p.requires_grad_(True)
        elif id(p) in target_weights:
            p.requires_grad_(False)
        elif id(p) in flags:
            p.requires_grad_(flags[id(p)])
    return peft_model


def unwrap_peft_model(model: nn.Module) -> nn.Module:
    """A ``PeftModel`` merged into its base model (``merge_and_unload``); any other model as it is."""
    peft = sys.modules.get("peft")  # a PeftModel exists only if peft was imported
    if peft is not None and isinstance(model, peft.PeftModel):
        return model.merge_and_unload()
    return model


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
