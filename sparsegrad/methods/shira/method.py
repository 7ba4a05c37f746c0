"""``shira``: peft's SHiRA adapters on the targets; the returned model is a ``PeftModel``.

SHiRA (Bhardwaj et al., "Sparse High Rank Adapters", 2024) trains a fixed set of entries of each target
weight, chosen at random before training, in the original space: ``W = W0 + S`` with ``S`` non-zero only
on the mask. It is SparseGrad without the transition basis and without choosing the entries from the
gradient, so a run beside SparseGrad at the same budget separates what the rotation and the top-k
selection buy from what a sparse update alone buys.

Budget: peft sizes the mask like a LoRA of rank ``r``: ``r (in + out)`` entries per matrix. The
method takes SparseGrad's ``k`` (a count or a fraction of in*out per matrix) and uses
``r = max(1, round(sum_t k_t / sum_t (in_t + out_t)))`` over the targets (one ``r`` for the model, as
peft takes), so each mask holds ``r (in + out) ≈ k`` entries: exactly k when k is a multiple of
in + out, as the suite's ``sparse_k`` of every model but BERT/RoBERTa-base (28,000 there: r = 7, 26,880
entries, 4% fewer) and LLaMA-2 is (:func:`shira_rank`). The mask is peft's ``random_mask`` seeded with
``shira_seed`` (a method option, default 0): one torch generator per layer with that seed, so every
target of one shape gets the same mask.

Unlike SparseGrad's ``k`` coordinates per step (a new choice each step, so the union grows), SHiRA's
k trained entries are the same throughout: accounting reports each adapted layer as a sparse layer with
budget k = the mask's size and ``updated`` = the entries that have moved from 0. The adapters train
densely under :func:`sparsegrad.build_optimizer`'s AdamW (a vector of k values; like every 1-D
parameter it gets no weight decay). The rest is as for ``lora`` (:mod:`sparsegrad.peft_adapters`):
target weights frozen, every other parameter as ``train_non_mlp`` says, merging by ``merge_and_unload``.
"""

from __future__ import annotations

from torch import nn

from sparsegrad.kernels import resolve_k
from sparsegrad.peft_adapters import apply_peft_adapter, unwrap_peft_model
from sparsegrad.registry import LayerBudget, Method, register_method

__all__ = ["Shira", "shira_rank"]


def shira_rank(k: int | float, shapes: list[tuple[int, int]]) -> int:
    """peft's ``r`` for a SHiRA mask of about ``k`` entries per (out, in) matrix of ``shapes``:
    ``round(sum k_t / sum (in_t + out_t))``, at least 1, at most what the smallest matrix holds."""
    budgets = [resolve_k(k, out_f * in_f) for out_f, in_f in shapes]
    r = max(1, round(sum(budgets) / sum(out_f + in_f for out_f, in_f in shapes)))
    largest = min(out_f * in_f // (out_f + in_f) for out_f, in_f in shapes)
    return min(r, max(1, largest))


@register_method
class Shira(Method):
    name = "shira"
    options = ("k",)
    extra_options = {"shira_seed": 0}
    # peft's layer, named so that registering does not import peft
    layer_types = ("peft.tuners.shira.layer.ShiraLayer",)

    def apply(self, model: nn.Module, cfg, targets: list, basis=None) -> nn.Module:
        from peft import ShiraConfig  # peft is only needed on this path

        shapes = [tuple(model.get_submodule(t.name).weight.shape) for t in targets]
        if not shapes:
            raise ValueError("method 'shira' found no target linear (check target_patterns)")
        r = shira_rank(cfg.k, shapes)

        def config(target_modules, modules_to_save, tied):
            return ShiraConfig(r=r, target_modules=target_modules, modules_to_save=modules_to_save,
                               random_seed=int(cfg.option("shira_seed")))  # fmt: skip

        return apply_peft_adapter(model, targets, config, self.is_adapter_parameter)

    def unwrap_model(self, model: nn.Module) -> nn.Module:
        return unwrap_peft_model(model)

    def is_adapter_parameter(self, param_name: str) -> bool:
        return "shira_weight" in param_name

    def budget(self, module: nn.Module) -> LayerBudget | None:
        weights = list(getattr(module, "shira_weight", {}).values())
        if not weights:
            return None
        values = weights[0]
        moved = int(values.detach().ne(0).sum())
        return LayerBudget(values, (module.out_features, module.in_features), values.numel(), moved)
