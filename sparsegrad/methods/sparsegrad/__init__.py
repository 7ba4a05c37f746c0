"""SparseGrad: MLP weights trained through the k largest entries of their gradient in a transition basis.

* :mod:`~sparsegrad.methods.sparsegrad.gram` — the Gram accumulation of the weight-gradient unfoldings;
* :mod:`~sparsegrad.methods.sparsegrad.basis` — the transition matrices (HOSVD factors) from those statistics;
* :mod:`~sparsegrad.methods.sparsegrad.autograd` — the autograd function of the layer (rotated top-k gradient);
* :mod:`~sparsegrad.methods.sparsegrad.layer` — :class:`SparseGradLinear`;
* :mod:`~sparsegrad.methods.sparsegrad.method` — the registration (``name="sparsegrad"``);
* :mod:`~sparsegrad.methods.sparsegrad.config`, :mod:`~sparsegrad.methods.sparsegrad.model` — SparseGrad as a
  PEFT method (``SparseGradConfig``, its tuner, ``initialize_sparsegrad_basis``); they import peft, so they
  load only when used (``sparsegrad.SparseGradConfig``).
"""

from sparsegrad.methods.sparsegrad.basis import Basis, GroupBasis, estimate_basis, random_basis
from sparsegrad.methods.sparsegrad.layer import SparseGradLinear
from sparsegrad.methods.sparsegrad.method import SparseGrad, check_orientation

__all__ = ["Basis", "GroupBasis", "SparseGrad", "SparseGradLinear", "check_orientation", "estimate_basis", "random_basis"]
