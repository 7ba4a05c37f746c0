"""The leading block: SparseGrad restricted to a fixed block of the transition basis"s leading coordinates.

* :mod:`~sparsegrad.methods.leading_block.layer` — :class:`LeadingBlockLinear`, apply / merge;
* :mod:`~sparsegrad.methods.leading_block.method` — the registration (``name="leading_block"``).
"""

from sparsegrad.methods.leading_block.layer import LeadingBlockLinear
from sparsegrad.methods.leading_block.method import LeadingBlock

__all__ = ["LeadingBlock", "LeadingBlockLinear"]
