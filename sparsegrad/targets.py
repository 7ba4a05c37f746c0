"""Finding the MLP linears a method trains: name patterns per architecture, grouped "up" / "down".

A *target* is one ``nn.Linear`` of an MLP block: its dotted module name, its group (layers of a group
share a transition basis: all "up" matrices of a model, all "down" ones) and its block index. Both
:func:`sparsegrad.estimate_basis` and :func:`sparsegrad.apply_method` take their targets from
:func:`find_targets`, so the basis is always estimated on exactly the layers that are swapped.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

from torch import nn

__all__ = ["Target", "DEFAULT_PATTERNS", "default_patterns", "find_targets", "block_index", "set_submodule"]

# group -> regular expression searched in the dotted module name.
_ENCODER = {
    "up": r"(^|\.)layer\.\d+\.intermediate\.dense$",
    "down": r"(^|\.)layer\.\d+\.output\.dense$",  # attention.output.dense has no "layer.N." right before
}
_DECODER = {
    "up": r"(^|\.)layers\.\d+\.mlp\.up_proj$",
    "down": r"(^|\.)layers\.\d+\.mlp\.down_proj$",
}
DEFAULT_PATTERNS: dict[str, dict[str, str]] = {
    "bert": _ENCODER,
    "roberta": _ENCODER,
    "xlm-roberta": _ENCODER,
    "electra": _ENCODER,
    "llama": _DECODER,
    "mistral": _DECODER,
    "qwen2": _DECODER,
}

_BLOCK = re.compile(r"(?:^|\.)(\d+)(?:\.|$)")


@dataclass(frozen=True)
class Target:
    """One target linear: dotted module name, basis group and transformer block index (or None)."""

    name: str
    group: str
    block: int | None


def block_index(name: str) -> int | None:
    """The first integer component of a dotted module name (``encoder.layer.3.output.dense`` -> 3)."""
    match = _BLOCK.search(name)
    return int(match.group(1)) if match else None


def default_patterns(model: nn.Module) -> dict[str, str]:
    """The MLP patterns for ``model.config.model_type``; a clear error for unknown architectures."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type is None:  # a peft wrapper keeps the config on the base model
        base = getattr(model, "base_model", None)
        model_type = getattr(getattr(base, "config", None), "model_type", None)
    if model_type not in DEFAULT_PATTERNS:
        raise ValueError(
            f"no default MLP target patterns for model_type {model_type!r} (known: "
            f"{', '.join(sorted(DEFAULT_PATTERNS))}); pass target_patterns, e.g. "
            "{'up': r'layers\\.\\d+\\.mlp\\.up_proj$', 'down': r'layers\\.\\d+\\.mlp\\.down_proj$'}"
        )
    return dict(DEFAULT_PATTERNS[model_type])


def find_targets(
    model: nn.Module,
    patterns: Mapping[str, str] | None = None,
    every_nth_block: int | None = None,
    linear_types: tuple[type, ...] = (nn.Linear,),
) -> list[Target]:
    """Target linears of ``model`` in module order.

    ``patterns`` maps a group name to a regular expression searched in each module's dotted name
    (default: :func:`default_patterns`). ``every_nth_block=n`` keeps only blocks whose index is
    divisible by ``n`` (the paper's LLaMA setting uses 3: blocks 0, 3, 6, ...). ``linear_types``:
    module classes that count as a linear layer.
    """
    patterns = dict(patterns) if patterns is not None else default_patterns(model)
    compiled = {group: re.compile(p) for group, p in patterns.items()}
    targets: list[Target] = []
    for name, module in model.named_modules():
        if not isinstance(module, linear_types):
            continue
        groups = [g for g, rx in compiled.items() if rx.search(name)]
        if not groups:
            continue
        if len(groups) > 1:
            raise ValueError(f"module {name!r} matches the patterns of several groups: {groups}")
        block = block_index(name)
        if every_nth_block and every_nth_block > 1:
            if block is None:
                raise ValueError(f"every_nth_block={every_nth_block} but {name!r} has no block index")
            if block % every_nth_block:
                continue
        targets.append(Target(name=name, group=groups[0], block=block))
    if not targets:
        linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
        raise ValueError(
            f"no target linears found with patterns {patterns} (every_nth_block={every_nth_block}); "
            f"{len(linears)} nn.Linear modules, e.g. {linears[:8]}"
        )
    return targets


def set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    """Replace the submodule at dotted path ``name`` (how a method swaps a target linear)."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)
