"""SparseGrad (Chekalina et al., EMNLP 2024): fine-tuning MLP linears with sparse gradients in a
transition basis found by HOSVD of the weight gradients.

Typical use::

    import sparsegrad
    basis = sparsegrad.estimate_basis(model, batches, steps=11)            # no weight changes
    model = sparsegrad.apply_method(model, {"name": "sparsegrad", "k": 0.01}, basis=basis)
    opt = sparsegrad.build_optimizer(model, lr=2e-5, total_steps=1000)    # lazy Adam + AdamW
    ...  # any training loop: loss.backward(); opt.step(); opt.zero_grad()
    model = sparsegrad.merge(model)                                         # plain transformers model

A SparseGradLinear keeps only W (``storage="weight"``): its gradient is the k-sparse dL/dW~ and
``build_optimizer`` applies each step as ``u_out ΔW~ R^T``; pass ``"storage": "rotated"`` in the method
config to train W~ itself with any sparse optimizer (one more out x in matrix per layer).
``estimate_basis(..., micro_batch=4)`` runs one backward pass per 4 rows: a fraction of the activations.

A method is one module (:mod:`sparsegrad.methods`: full, lora, meprop, sparsegrad, leading_block)
registered by name in :mod:`~sparsegrad.registry`; ``apply_method``, ``merge``, ``build_optimizer`` and
``account`` look it up there. Add one with ``@sparsegrad.register_method`` on a
:class:`sparsegrad.Method` subclass.

Modules: :mod:`~sparsegrad.targets` (which linears), :mod:`~sparsegrad.basis` (transition matrices),
:mod:`~sparsegrad.layers` (SparseGradLinear, MePropLinear), :mod:`~sparsegrad.kernels` (top-k,
sparse-by-dense, multiply-add counts), :mod:`~sparsegrad.optim` (optimizer), :mod:`~sparsegrad.surgery`
(apply / merge), :mod:`~sparsegrad.accounting` (trainable and updated parameters).
"""

from .accounting import LayerAccount, MethodAccount, account
from .basis import Basis, GroupBasis, estimate_basis, random_basis, spectrum_concentration
from .layers import MePropLinear, SparseGradLinear
from .optim import LazySparseAdam, SparseGradOptimizer, build_optimizer, clip_grad_norm
from .registry import LayerBudget, Method, get_method, register_method, unregister_method
from .surgery import METHODS, MethodConfig, apply_method, merge
from .targets import DEFAULT_PATTERNS, Target, find_targets

__all__ = [
    "DEFAULT_PATTERNS",
    "METHODS",
    "Basis",
    "GroupBasis",
    "LayerAccount",
    "LayerBudget",
    "LazySparseAdam",
    "MePropLinear",
    "Method",
    "MethodAccount",
    "MethodConfig",
    "SparseGradLinear",
    "SparseGradOptimizer",
    "Target",
    "account",
    "apply_method",
    "build_optimizer",
    "clip_grad_norm",
    "estimate_basis",
    "find_targets",
    "get_method",
    "merge",
    "random_basis",
    "register_method",
    "spectrum_concentration",
    "unregister_method",
]

__version__ = "0.1.0"
