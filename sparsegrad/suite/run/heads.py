"""The MLP-only setting: every non-MLP parameter frozen except the task head.

With ``model.train_non_mlp=false`` the method layer trains the selected MLP linears only (the paper's
LLaMA setting). For a classifier that would leave the freshly initialised task head frozen at random
weights, so the score would say little about the methods; ``model.train_head=true`` unfreezes the
head after the method is applied. Then the only differences between methods are in how each trains
the MLPs. The head is every parameter outside the model's backbone (``base_model_prefix``), e.g.
BERT's ``classifier`` or RoBERTa's ``classifier.dense`` / ``classifier.out_proj``.
"""

from __future__ import annotations

from sparsegrad.suite.errors import ConfigError


def task_head_parameters(model) -> list[tuple[str, object]]:
    """(name, parameter) of the task head: parameters outside the backbone, unwrapping a peft model."""
    base = model.get_base_model() if callable(getattr(model, "get_base_model", None)) else model
    prefix = getattr(base, "base_model_prefix", "") or ""
    if not prefix or not hasattr(base, prefix):
        return []
    return [(n, p) for n, p in base.named_parameters() if not n.startswith(prefix + ".")]


def unfreeze_task_head(model, model_name: str = "the model") -> list[str]:
    """Make the task head trainable; returns the names of its parameters."""
    head = task_head_parameters(model)
    if not head:
        raise ConfigError(
            f"{model_name} has no separate task head to train (a causal LM's output layer is usually tied to its "
            "embeddings); set model.train_head=false, or model.train_non_mlp=true to train every parameter"
        )
    for _name, p in head:
        p.requires_grad_(True)
    return [n for n, _ in head]
