"""The suite's only contact with the method layer (:mod:`sparsegrad`): apply, optimise, account.

Everything the fine-tuning suite needs from the method layer goes through the four functions
below, so an API change there is fixed here and nowhere else. Which methods exist, which of them need a
transition basis and which options each reads come from the method registry
(:mod:`sparsegrad.registry`), so a newly registered method runs here without a change.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal

from annotated_types import Ge, Interval

from sparsegrad.suite.errors import ConfigError


def _registry():
    """The method layer's registry with the built-in methods registered. Imported on first use: the
    settings check (sparsegrad.suite.run.settings) reads MethodSettings without loading torch."""
    import sparsegrad.methods  # noqa: F401  (registers full, lora, meprop, sparsegrad, leading_block)
    from sparsegrad import registry

    return registry


def __getattr__(name: str):
    if name == "METHOD_KINDS":  # the method layer's names, always current
        return _registry().METHODS
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def check_kind(settings: MethodSettings) -> list[str]:
    """A line for a method.kind that no registered method has (imports the method layer)."""
    names = _registry().METHODS
    if settings.kind in names:
        return []
    return [f"method.kind={settings.kind}: must be one of {', '.join(names)} (or a method registered with "
            "sparsegrad.register_method)"]


class _BasisKinds(Sequence):
    """The registered methods that need the transition basis before training (always current)."""

    def _names(self) -> tuple[str, ...]:
        return tuple(m.name for m in _registry().registered_methods() if m.needs_basis)

    def __getitem__(self, index):
        return self._names()[index]

    def __len__(self) -> int:
        return len(self._names())

    def __repr__(self) -> str:
        return repr(self._names())


BASIS_KINDS = _BasisKinds()

# MethodSettings field -> MethodConfig option; passed when the method reads that option (and it is set).
SETTING_OPTIONS = {"k": "k", "mode": "meprop_mode", "rank": "lora_rank", "alpha": "lora_alpha",
                   "dropout": "lora_dropout", "orientation": "orientation", "basis_steps": "basis_steps",
                   "lora_variant": "lora_variant", "optimizer": "meprop_optimizer", "topk_at": "topk_at"}  # fmt: skip


@dataclass
class MethodSettings:
    """What the Hydra ``method`` group says (see conf/method/*.yaml)."""

    name: str  # the config name recorded in run records: full, lora, meprop, meprop_output, ...
    kind: str  # the method layer's name: full | lora | meprop | sparsegrad | leading_block
    k: int | float | None = None  # sparse gradient budget per MLP linear (count >= 1 or fraction in (0, 1])
    allow_dense: bool = False  # a count k above a matrix's size means dense training: refused unless true
    mode: Literal["weight", "output"] | None = None  # meprop: weight (top-k of dL/dW, the paper's) | output (dL/dY)
    rank: Annotated[int, Ge(1)] | None = None  # lora
    alpha: float | None = None  # lora
    dropout: Annotated[float, Interval(ge=0, lt=1)] = 0.0  # lora
    # lora: standard (peft as configured) | authors (alpha 1, scale 1/r; alpha and dropout not passed)
    lora_variant: Literal["standard", "authors"] | None = None
    optimizer: Literal["lazy_adam", "adamw"] | None = None  # meprop: lazy_adam (lazy sparse Adam) | adamw (the authors')
    orientation: Literal["hosvd", "official"] | None = None  # sparsegrad, leading_block
    target_patterns: dict[str, str] | list[str] | None = None  # group -> regex over module names (None: per architecture)
    every_nth_block: Annotated[int, Ge(1)] | None = None
    train_non_mlp: bool = True  # train everything outside the MLPs densely (the paper's GLUE setting)
    train_head: bool = False  # with train_non_mlp=false: the task head trains too (the MLP-only setting)
    basis_steps: Annotated[int, Ge(1)] = 8  # sparsegrad, leading_block: backward passes for the transition basis
    basis_micro_batch: Annotated[int, Ge(1)] | None = None  # split each basis batch into chunks of this many rows
    topk_at: Literal["backward", "step"] | None = None  # sparsegrad, leading_block, meprop weight: backward (the paper's) | step
    options: dict[str, Any] = field(default_factory=dict)  # passed through to the method layer (e.g. block_factor)


def method_config(settings: MethodSettings) -> dict:
    """The plain-dict ``MethodConfig`` that :func:`sparsegrad.apply_method` takes."""
    cfg: dict[str, Any] = {"name": settings.kind, "train_non_mlp": settings.train_non_mlp}
    if settings.target_patterns:
        cfg["target_patterns"] = dict(settings.target_patterns)
    if settings.every_nth_block and settings.every_nth_block > 1:
        cfg["every_nth_block"] = settings.every_nth_block
    problems = check_kind(settings)
    if problems:
        raise ConfigError(problems[0])
    reads = _registry().get_method(settings.kind).options
    for field_name, option in SETTING_OPTIONS.items():
        value = getattr(settings, field_name)
        if option in reads and value is not None:
            cfg[option] = value
    if cfg.get("lora_variant") == "authors":  # alpha 1 and no dropout are part of that variant
        cfg.pop("lora_alpha", None)
        cfg.pop("lora_dropout", None)
    cfg.update(settings.options or {})
    return cfg


def estimate_basis(model, settings: MethodSettings, batches: Iterable[dict]):
    """SparseGrad's preliminary phase; returns (basis, seconds). No weight changes."""
    import sparsegrad

    start = time.perf_counter()
    basis = sparsegrad.estimate_basis(
        model, batches, steps=settings.basis_steps, micro_batch=settings.basis_micro_batch,
        patterns=dict(settings.target_patterns) if settings.target_patterns else None,
        every_nth_block=settings.every_nth_block if (settings.every_nth_block or 1) > 1 else None,
    )
    return basis, time.perf_counter() - start


def apply(model, settings: MethodSettings, basis=None):
    import sparsegrad

    model = sparsegrad.apply_method(model, method_config(settings), basis=basis)
    if settings.train_head and not settings.train_non_mlp:
        from sparsegrad.suite.run.heads import unfreeze_task_head

        unfreeze_task_head(model)
    return model


def build_optimizer(model, *, lr: float, weight_decay: float, schedule: str, warmup_steps: int,
                    total_steps: int, max_grad_norm: float | None):
    import sparsegrad

    return sparsegrad.build_optimizer(
        model, lr=lr, weight_decay=weight_decay, schedule=schedule, warmup_steps=warmup_steps,
        total_steps=total_steps, max_grad_norm=max_grad_norm,
    )


def accounting(model, optimizer=None) -> dict:
    """Trainable dense parameters, the sparse budget and the coordinates actually updated."""
    import sparsegrad

    acc = sparsegrad.account(model)
    budgets = [int(layer.k) for layer in acc.sparse_layers]
    state_bytes = None
    if optimizer is not None and callable(getattr(optimizer, "state_bytes", None)):
        state_bytes = int(optimizer.state_bytes())
    return {
        "total": int(acc.total_params),
        "trainable_dense": int(acc.trainable_dense),
        "sparse_matrices": len(budgets),
        "sparse_budget_per_matrix": max(budgets) if budgets else None,
        "sparse_budget_total": int(acc.budget_total) if budgets else None,
        "updated_coordinates_union": int(acc.updated_total) if budgets else None,
        "optimizer_state_bytes": state_bytes,
        "master_copy_bytes": int(acc.master_bytes),  # float32 copies of a bf16/fp16 model's trained matrices
    }


def merge(model):
    """A plain Hugging Face model with the method folded back in (sparsegrad.merge)."""
    import sparsegrad

    return sparsegrad.merge(model)
