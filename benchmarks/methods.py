"""The rows of the whole-model benchmark: one :class:`BenchMethod` per method or variant measured.

A row says how to put the method on a freshly built model and which optimizer steps it; the worker
(:mod:`benchmarks.worker`) does the rest (model, batches, basis, timing, memory) the same way for every
row, and the report (:mod:`benchmarks.report`) lists the rows in registration order. Adding a row is one
:func:`register` call here: a name, a one-line note for the report, ``apply`` and, when it needs one,
its own ``optimizer`` or ``spec`` overrides (fields of :class:`benchmarks.worker.Spec`, e.g.
``{"dtype": "bfloat16"}`` for a reduced-precision row). Then ``--methods <name>`` runs it and a preset
lists it where it belongs (:mod:`benchmarks.grid`). Every row runs in one worker process today; a row
measured across processes (data parallel) also needs :func:`benchmarks.runner.run_worker` to start its
worker under a launcher such as ``torch.distributed.run``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

LR = 1e-5  # every row trains at the same constant rate: the figures are speed and memory, not scores


def _sparsegrad_optimizer(model, spec):
    import sparsegrad

    return sparsegrad.build_optimizer(model, lr=LR, schedule="constant", sparse_state=spec.sparse_state)


@dataclass(frozen=True)
class BenchMethod:
    name: str
    note: str  # one line in the report's list of methods
    # (model, basis or None, k, family settings, spec) -> the model with the method applied
    apply: Callable[..., Any]
    needs_basis: bool = False  # estimate (or load) the transition basis first
    optimizer: Callable[..., Any] = _sparsegrad_optimizer  # (model, spec) -> optimizer with state_bytes()
    spec: dict = field(default_factory=dict)  # Spec fields this row overrides


ROWS: dict[str, BenchMethod] = {}


def register(row: BenchMethod) -> BenchMethod:
    if row.name in ROWS:
        raise ValueError(f"benchmark row {row.name!r} is registered twice")
    ROWS[row.name] = row
    return row


def get(name: str) -> BenchMethod:
    try:
        return ROWS[name]
    except KeyError:
        raise ValueError(f"unknown benchmark method {name!r}; valid: {', '.join(ROWS)}") from None


def _common(fam: dict) -> dict:
    common = {"train_non_mlp": fam["train_non_mlp"]}
    if fam["every_nth_block"]:
        common["every_nth_block"] = fam["every_nth_block"]
    return common


def _apply_config(config: Callable[..., dict]):
    """``apply`` through :func:`sparsegrad.apply_method` with the config ``config(k, fam, spec)``."""

    def apply(model, basis, k, fam, spec):
        import sparsegrad

        return sparsegrad.apply_method(model, {**config(k, fam, spec), **_common(fam)}, basis=basis)

    return apply


def _sparsegrad(formulation: str, storage: str, sparse_by_dense: bool):
    return _apply_config(lambda k, fam, spec: {"name": "sparsegrad", "k": k, "formulation": formulation,
                                               "storage": storage, "sparse_by_dense": sparse_by_dense})


register(BenchMethod("full", "full fine-tuning, dense AdamW on every parameter",
                     _apply_config(lambda k, fam, spec: {"name": "full"})))
register(BenchMethod(
    "lora", "peft LoRA on the MLP linears (rank 7 encoders, 32 LLaMA), non-MLP dense as in the paper",
    _apply_config(lambda k, fam, spec: {"name": "lora",
                                        "lora_rank": int(spec.extra.get("lora_rank", fam["lora_rank"]))})))
register(BenchMethod("meprop", "top-k of dL/dW in the original space (paper's MeProp), lazy Adam",
                     _apply_config(lambda k, fam, spec: {"name": "meprop", "k": k})))
register(BenchMethod("meprop_adamw", "the same top-k of dL/dW under dense AdamW (the authors' MeProp)",
                     _apply_config(lambda k, fam, spec: {"name": "meprop", "k": k, "meprop_optimizer": "adamw"})))
register(BenchMethod(
    "sparsegrad", "exact SparseGrad as the library builds it: only W stored (storage 'weight'; each k-sparse "
    "step applied as u_out·ΔW~·Rᵀ), formulation 'auto', sparse-by-dense, lazy Adam",
    _sparsegrad("auto", "weight", True), needs_basis=True))
register(BenchMethod(
    "sparsegrad_rotated", "the same exact method with storage 'rotated': W~ as the parameter plus a cached "
    "W_eff = u_out W~ Rᵀ (one more out×in matrix per layer; trainable by any sparse optimizer)",
    _sparsegrad("auto", "rotated", True), needs_basis=True))
register(BenchMethod(
    # the paper's "Reg": the 3-product layer with a dense backward
    "sparsegrad_regular", "exact SparseGrad, the paper's 3-product layer ('regular'), dense backward (paper's 'Reg')",
    _sparsegrad("regular", "rotated", False), needs_basis=True))
register(BenchMethod(
    "leading_block", "variant: SparseGrad restricted to the leading block of W~ (sparsegrad.methods.leading_block.layer)",
    _apply_config(lambda k, fam, spec: {"name": "leading_block", "k": k, "block_factor": spec.block_factor}),
    needs_basis=True))
register(BenchMethod(
    "shira", "peft SHiRA: a fixed random sparse mask of each MLP weight with r·(in+out) ≈ k entries "
    "(r = round(k/(in+out))), trained in the original space under AdamW; no basis",
    _apply_config(lambda k, fam, spec: {"name": "shira", "k": k})))

METHODS = tuple(ROWS)  # the rows registered here (code that runs later reads ROWS, which may have grown)
