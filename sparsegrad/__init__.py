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

Modules: :mod:`~sparsegrad.targets` (which linears), :mod:`~sparsegrad.basis` (transition matrices),
:mod:`~sparsegrad.layers` (SparseGradLinear, MePropLinear), :mod:`~sparsegrad.kernels` (top-k,
sparse-by-dense, multiply-add counts), :mod:`~sparsegrad.optim` (optimizer), :mod:`~sparsegrad.surgery`
(apply / merge), :mod:`~sparsegrad.accounting` (trainable and updated parameters).
"""

# Names are imported from their modules on first use (PEP 562), so that ``import sparsegrad.suite.settings``
# (a config check that must fail fast) does not pay for importing torch.
_EXPORTS = {
    "accounting": ("LayerAccount", "MethodAccount", "account"),
    "basis": ("Basis", "GroupBasis", "estimate_basis", "random_basis", "spectrum_concentration"),
    "layers": ("MePropLinear", "SparseGradLinear"),
    "optim": ("LazySparseAdam", "SparseGradOptimizer", "build_optimizer", "clip_grad_norm"),
    "surgery": ("METHODS", "MethodConfig", "apply_method", "merge"),
    "targets": ("DEFAULT_PATTERNS", "Target", "find_targets"),
}
_MODULE_OF = {name: module for module, names in _EXPORTS.items() for name in names}


def __getattr__(name: str):
    module = _MODULE_OF.get(name)
    if module is None:
        raise AttributeError(f"module 'sparsegrad' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_MODULE_OF})


__all__ = [
    "DEFAULT_PATTERNS",
    "METHODS",
    "Basis",
    "GroupBasis",
    "LayerAccount",
    "LazySparseAdam",
    "MePropLinear",
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
    "merge",
    "random_basis",
    "spectrum_concentration",
]

__version__ = "0.1.0"
