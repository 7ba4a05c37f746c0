"""``full``: regular fine-tuning. The targets stay ``nn.Linear`` and train densely (AdamW), like every
other trainable parameter; nothing is swapped, so there is nothing to merge and no sparse layer to
account for."""

from __future__ import annotations

from sparsegrad.registry import Method, register_method

__all__ = ["Full"]


@register_method
class Full(Method):
    name = "full"
