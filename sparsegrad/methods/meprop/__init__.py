"""MeProp: top-k of dL/dW (mode ``weight``) or dL/dY (mode ``output``) in the original space.

* :mod:`~sparsegrad.methods.meprop.layer` — :class:`MePropLinear` and its autograd function;
* :mod:`~sparsegrad.methods.meprop.method` — the registration (``name="meprop"``);
* :mod:`~sparsegrad.methods.meprop.config`, :mod:`~sparsegrad.methods.meprop.model` — MeProp (mode "weight")
  as a PEFT method (``MePropConfig``), loaded only when used.
"""

from sparsegrad.methods.meprop.layer import MePropLinear
from sparsegrad.methods.meprop.method import MeProp, meprop_optimizer

__all__ = ["MeProp", "MePropLinear", "meprop_optimizer"]
