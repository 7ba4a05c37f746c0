"""The built-in methods, one module each, registered in :mod:`sparsegrad.registry` on import.

* :mod:`~sparsegrad.methods.full.method` — targets stay ``nn.Linear`` and train densely;
* :mod:`~sparsegrad.methods.lora.method` — peft LoRA adapters on the targets;
* :mod:`~sparsegrad.methods.meprop.method` — :class:`~sparsegrad.methods.sparsegrad.layer.MePropLinear` (top-k of dL/dW or dL/dY);
* :mod:`~sparsegrad.methods.sparsegrad.method` — :class:`~sparsegrad.methods.sparsegrad.layer.SparseGradLinear` in a transition basis;
* :mod:`~sparsegrad.methods.leading_block.method` — :class:`~sparsegrad.methods.leading_block.layer.LeadingBlockLinear`;
* :mod:`~sparsegrad.methods.shira.method` — peft SHiRA adapters (a fixed random sparse mask of W) at SparseGrad's budget.

A new method is a module like these: a :class:`sparsegrad.Method` subclass decorated with
:func:`sparsegrad.register_method` (see :mod:`sparsegrad.registry` for the hooks).
"""

# Importing a module registers its method; this order is the order of sparsegrad.METHODS.
from sparsegrad.methods import full, lora, meprop, sparsegrad, leading_block, shira  # noqa: F401  # isort: skip

__all__ = ["full", "lora", "meprop", "sparsegrad", "leading_block", "shira"]
