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

The same as a PEFT method (the target weights stay frozen; a change ΔW beside each trains SparseGrad's
way, see :mod:`sparsegrad.peft_tuner`)::

    peft_model = peft.get_peft_model(model, sparsegrad.SparseGradConfig(k=0.01))   # or MePropConfig
    sparsegrad.initialize_sparsegrad_basis(peft_model, batches, steps=11)         # as EVA's init
    opt = sparsegrad.build_optimizer(peft_model, lr=2e-5, total_steps=1000)
    ...; peft_model.save_pretrained("adapter"); model = peft_model.merge_and_unload()

``import sparsegrad`` registers both methods with peft as soon as peft is imported
(:mod:`sparsegrad.peft_registration`), so ``PeftModel.from_pretrained`` loads their adapters.

A method is one folder under :mod:`sparsegrad.methods` (full, lora, meprop, sparsegrad, leading_block),
as PEFT lays out its tuners: its layer(s), its data-driven initialisation if it has one (SparseGrad's
basis: :mod:`~sparsegrad.methods.sparsegrad.gram`, :mod:`~sparsegrad.methods.sparsegrad.basis`), and its
registration by name in :mod:`~sparsegrad.registry`, where ``apply_method``, ``merge``,
``build_optimizer`` and ``account`` look it up; SparseGrad and MeProp also have a PEFT config and tuner
(``config.py``, ``model.py``). Add one with ``@sparsegrad.register_method`` on a
:class:`sparsegrad.Method` subclass.

What every method shares stays here: :mod:`~sparsegrad.targets` (which linears),
:mod:`~sparsegrad.kernels` (top-k, sparse-by-dense, multiply-add counts), :mod:`~sparsegrad.layer_common`
(helpers of the sparse layers), :mod:`~sparsegrad.optim` (optimizer; the lazy sparse Adam in
:mod:`~sparsegrad.lazy_adam`), :mod:`~sparsegrad.registry`, :mod:`~sparsegrad.surgery` (apply / merge),
:mod:`~sparsegrad.accounting` (trainable and updated parameters), :mod:`~sparsegrad.integrations`
(transformers Trainer, TRL, DistributedDataParallel, accelerate), :mod:`~sparsegrad.data_parallel`
(the exchange of every process's top-k entries under data parallelism). Module paths of earlier releases
(``sparsegrad.layers``, ``sparsegrad.basis``, ``sparsegrad.suite.runner``, ...) still import: see
:mod:`sparsegrad._moved`.
"""

# The names below load on first use (PEP 562): ``import sparsegrad.suite.run.settings``, a config check that
# must fail fast, then does not pay for importing torch. The first name used loads every module listed
# (and the built-in methods register themselves), exactly what an eager import would have done.
_EXPORTS = {
    "accounting": ("LayerAccount", "MethodAccount", "account"),
    "methods.sparsegrad.basis": ("Basis", "GroupBasis", "estimate_basis", "random_basis", "spectrum_concentration"),
    "integrations": ("prepare_trainer",),
    "data_parallel": ("SparseExchangeError", "prepare_data_parallel"),
    "methods.sparsegrad.layer": ("SparseGradLinear",),
    "methods.meprop.layer": ("MePropLinear",),
    "lazy_adam": ("LazySparseAdam",),
    "optim": ("SparseGradOptimizer", "build_optimizer", "clip_grad_norm"),
    "registry": ("LayerBudget", "Method", "get_method", "register_method", "unregister_method"),
    "surgery": ("METHODS", "MethodConfig", "apply_method", "merge"),
    "targets": ("DEFAULT_PATTERNS", "Target", "find_targets"),
}


# The PEFT methods (``get_peft_model(model, sparsegrad.SparseGradConfig(...))``) load only when named: they
# import peft, which takes seconds. They are registered with peft as soon as peft is imported (see
# sparsegrad.peft_registration), so PeftModel.from_pretrained finds them after a plain ``import sparsegrad``.
_PEFT_EXPORTS = {
    "SparseGradConfig": "methods.sparsegrad.config",
    "SparseGradModel": "methods.sparsegrad.model",
    "initialize_sparsegrad_basis": "methods.sparsegrad.model",
    "MePropConfig": "methods.meprop.config",
    "MePropModel": "methods.meprop.model",
}


def __getattr__(name: str):
    if name in _PEFT_EXPORTS:
        import importlib

        from sparsegrad.peft_registration import register_peft_methods

        register_peft_methods()
        globals()[name] = getattr(importlib.import_module(f".{_PEFT_EXPORTS[name]}", __name__), name)
        return globals()[name]
    if not any(name in names for names in _EXPORTS.values()):
        raise AttributeError(f"module 'sparsegrad' has no attribute {name!r}")
    import importlib

    for module, names in _EXPORTS.items():
        loaded = importlib.import_module(f".{module}", __name__)
        globals().update({n: getattr(loaded, n) for n in names})
    return globals()[name]


def __dir__() -> list[str]:
    return sorted({*globals(), *_PEFT_EXPORTS, *(n for names in _EXPORTS.values() for n in names)})


__all__ = [
    "DEFAULT_PATTERNS",
    "METHODS",
    "Basis",
    "GroupBasis",
    "LayerAccount",
    "LayerBudget",
    "LazySparseAdam",
    "MePropConfig",
    "MePropLinear",
    "MePropModel",
    "Method",
    "MethodAccount",
    "MethodConfig",
    "SparseGradConfig",
    "SparseGradLinear",
    "SparseExchangeError",
    "SparseGradModel",
    "SparseGradOptimizer",
    "Target",
    "account",
    "apply_method",
    "build_optimizer",
    "clip_grad_norm",
    "estimate_basis",
    "find_targets",
    "get_method",
    "initialize_sparsegrad_basis",
    "merge",
    "prepare_data_parallel",
    "prepare_trainer",
    "random_basis",
    "register_method",
    "spectrum_concentration",
    "unregister_method",
]

__version__ = "0.1.0"

# Old module paths (sparsegrad.layers, sparsegrad.suite.runner, ...) resolve to their new homes.
from sparsegrad import _moved  # noqa: E402

_moved.install()

# SparseGrad and MeProp become PEFT methods when peft is imported (now, if it already is).
from sparsegrad import peft_registration  # noqa: E402

peft_registration.install()
