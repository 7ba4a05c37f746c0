"""The built-in methods, one module each, registered in :mod:`sparsegrad.registry` on import.

* :mod:`~sparsegrad.methods.full` — targets stay ``nn.Linear`` and train densely;
* :mod:`~sparsegrad.methods.lora` — peft LoRA adapters on the targets;
* :mod:`~sparsegrad.methods.meprop` — :class:`~sparsegrad.layers.MePropLinear` (top-k of dL/dW or dL/dY);
* :mod:`~sparsegrad.methods.sparsegrad` — :class:`~sparsegrad.layers.SparseGradLinear` in a transition basis;
* :mod:`~sparsegrad.methods.leading_block` — :class:`~sparsegrad.fixed_support.LeadingBlockLinear`.

A new method is a module like these: a :class:`sparsegrad.Method` subclass decorated with
:func:`sparsegrad.register_method` (see :mod:`sparsegrad.registry` for the hooks).
"""

# Importing a module registers its method; this order is the order of sparsegrad.METHODS.
from . import full, lora, meprop, sparsegrad, leading_block  # noqa: F401  # isort: skip

__all__ = ["full", "lora", "meprop", "sparsegrad", "leading_block"]
