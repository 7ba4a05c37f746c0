"""One optimizer object for a SparseGrad model: lazy Adam on the sparse weights, AdamW on the rest.

:class:`LazySparseAdam` (lazy Adam on the k-sparse COO gradients, with float32 master copies and appliers
of rotated steps) lives in :mod:`sparsegrad.lazy_adam` and is re-exported here.

:func:`build_optimizer` wraps the two optimizers with a learning-rate schedule, global gradient-norm
clipping over dense gradients and COO values, ``state_dict``/``load_state_dict`` for resume, and
``state_bytes()``. ``load_state_dict`` restores every state tensor in the dtype it was saved in
(``torch.optim.Optimizer.load_state_dict`` casts them to the parameter's dtype, which would turn the
int32 coordinate keys of the compact layout into float32 or bf16 and the float32 moments of a bf16
parameter into bf16), so a resumed run is bit-identical to an uninterrupted one.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from sparsegrad.data_parallel import SparseGradientExchange, backward_topk_layers, exchange_pending
from sparsegrad.lazy_adam import STATE_LAYOUTS, LazySparseAdam  # noqa: F401 (STATE_LAYOUTS re-exported)
from sparsegrad.registry import method_for_layer, swapped_modules

__all__ = ["LazySparseAdam", "SparseGradOptimizer", "build_optimizer", "clip_grad_norm", "make_schedule",
           "master_copies"]  # fmt: skip

# The schedules the suite's configs name; build_optimizer also takes any other transformers schedule name.
SCHEDULES = ("linear", "constant")


def clip_grad_norm(params: Iterable[torch.Tensor], max_norm: float) -> torch.Tensor:
    """Clip the global 2-norm of dense gradients and sparse COO gradients together, in place.

    Sparse gradients are coalesced first (duplicate indices summed), so the norm is that of the
    dense-equivalent gradient; the scaling matches ``torch.nn.utils.clip_grad_norm_``. Under data
    parallelism the local top-k entries of ``topk_at="backward"`` layers are first exchanged
    (:mod:`sparsegrad.data_parallel`), so every process clips the same summed gradient by the same norm:
    pass all the model's parameters (those without a gradient are skipped), on every process.
    """
    params = list(params)
    exchange_pending(params)
    params = [p for p in params if p.grad is not None]
    if not params:
        return torch.tensor(0.0)
    sq = []
    for p in params:
        if p.grad.is_sparse:
            p.grad = p.grad.coalesce()
            sq.append(p.grad.values().double().pow(2).sum())
        else:
            sq.append(p.grad.double().pow(2).sum())
    total = torch.stack([s.to(sq[0].device) for s in sq]).sum().sqrt()
    coef = (max_norm / (total + 1e-6)).clamp(max=1.0)
    for p in params:
        c = coef.to(device=p.grad.device, dtype=p.grad.dtype)
        if p.grad.is_sparse:
            g = p.grad
            p.grad = torch.sparse_coo_tensor(
                g.indices(), g.values() * c, g.shape, is_coalesced=True, check_invariants=False
            )
        else:
            p.grad.mul_(c)
    return total.float()


SCHEDULE_ALIASES = {"constant": "constant_with_warmup"}  # ours warms up too, as the linear one does


def make_schedule(schedule: str, warmup_steps: int = 0, total_steps: int | None = None):
    """transformers' learning-rate schedule ``schedule`` as a clock: a ``LambdaLR`` over a one-group
    stand-in optimizer whose learning rate is the schedule's factor (1.0 = the base learning rate).

    ``"linear"``: ``get_linear_schedule_with_warmup`` (warm-up, then linear decay to 0 at
    ``total_steps``); ``"constant"``: ``get_constant_schedule_with_warmup``; any other name that
    ``transformers.get_scheduler`` knows ("cosine", "polynomial", ...) works too.
    """
    from transformers import get_scheduler
    from transformers.trainer_utils import SchedulerType

    name = SCHEDULE_ALIASES.get(schedule, schedule)
    valid = sorted({"linear", "constant"} | {s.value for s in SchedulerType} - {"reduce_lr_on_plateau", "greedy"})
    if name not in valid:
        raise ValueError(f"unknown schedule {schedule!r}; valid: {', '.join(valid)}, or None (no schedule: "
                         "the learning rate stays where it is, e.g. for a scheduler of your own)")
    if name not in ("constant_with_warmup",) and total_steps is None:
        raise ValueError(f"schedule={schedule!r} needs total_steps (the number of optimizer steps)")
    clock = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    return get_scheduler(name, clock, num_warmup_steps=warmup_steps, num_training_steps=total_steps)


class SparseGradOptimizer(torch.optim.Optimizer):
    """Dense AdamW + :class:`LazySparseAdam` stepped together, with schedule and clipping.

    A ``torch.optim.Optimizer``: its ``param_groups`` are the two optimizers' groups themselves, so a
    learning-rate scheduler of any library (``transformers.Trainer``'s, ``torch.optim.lr_scheduler``)
    drives it. Who owns the learning rate is never ambiguous: with ``schedule`` set, this optimizer
    runs transformers' schedule itself (``self.lr_scheduler``, stepped inside :meth:`step`) and raises
    if anything else changed the learning rate between two steps; with ``schedule=None`` it never
    touches the learning rate.

    ``max_grad_norm``: clip the global 2-norm of the gradients it applies (the k-sparse ones included);
    ``None`` or ``0`` means no clipping, as in ``transformers.TrainingArguments``.

    ``dense_masters``: ``(param, master)`` pairs where ``dense`` optimises the float32 ``master`` in
    place of the low-precision ``param``: before each step the parameter's gradient is copied to the
    master, after it the master is rounded back into the parameter.

    ``exchange``: the :class:`~sparsegrad.data_parallel.SparseGradientExchange` of the
    ``topk_at="backward"`` sparse weights, run first in :meth:`step` (a no-op in one process).
    """

    def __init__(
        self,
        dense: torch.optim.Optimizer | None,
        sparse: LazySparseAdam | None,
        *,
        schedule: str | None = "constant",
        warmup_steps: int = 0,
        total_steps: int | None = None,
        max_grad_norm: float | None = None,
        dense_masters: Iterable[tuple[torch.Tensor, torch.Tensor]] = (),
        exchange: SparseGradientExchange | None = None,
    ) -> None:
        if max_grad_norm is not None and max_grad_norm < 0:
            raise ValueError(f"max_grad_norm must be >= 0 (0 or None: no clipping), got {max_grad_norm!r}")
        self.dense, self.sparse = dense, sparse
        self.lr_scheduler = make_schedule(schedule, warmup_steps, total_steps) if schedule is not None else None
        self.schedule, self.warmup_steps, self.total_steps = schedule, warmup_steps, total_steps
        self.max_grad_norm = max_grad_norm or None
        self.dense_masters = list(dense_masters)
        self.exchange = exchange
        self._param_of_master = {id(m): p for p, m in self.dense_masters}
        self.step_count = 0
        self.last_grad_norm: float | None = None
        groups = [g for o in self.optimizers for g in o.param_groups]
        super().__init__(groups, {})
        for group in self.param_groups:
            group.setdefault("initial_lr", group["lr"])
        self._apply_schedule()

    @property
    def optimizers(self) -> list[torch.optim.Optimizer]:
        return [o for o in (self.dense, self.sparse) if o is not None]

    def _apply_schedule(self) -> None:
        """Set every group's learning rate to the schedule's current value (no-op without a schedule)."""
        if self.lr_scheduler is None:
            return
        factor = self.lr_scheduler.get_last_lr()[0]
        for group in self.param_groups:
            group["lr"] = group["initial_lr"] * factor
        self._scheduled_lrs = [group["lr"] for group in self.param_groups]

    def _check_schedule_owner(self) -> None:
        if self.lr_scheduler is None:
            return
        found = [group["lr"] for group in self.param_groups]
        if found != self._scheduled_lrs:
            raise RuntimeError(
                f"this optimizer runs its own learning-rate schedule (schedule={self.schedule!r}, "
                f"warmup_steps={self.warmup_steps}, total_steps={self.total_steps}), and something else changed "
                f"the learning rate since its last step (expected {self._scheduled_lrs}, found {found}): most "
                "likely a second scheduler, such as the one transformers.Trainer builds when given "
                "optimizers=(optimizer, None). Keep one schedule: build the optimizer with schedule=None to "
                "let the other scheduler drive it (with Trainer: TrainingArguments' lr_scheduler_type and "
                "warmup_steps), or give Trainer the same schedule (lr_scheduler_type='linear', warmup and "
                "max_steps equal to this optimizer's)."
            )

    def get_last_lr(self) -> list[float]:
        return [g["lr"] for g in self.param_groups]

    def params(self) -> list[torch.Tensor]:
        """The model's trained parameters (a parameter, not its master copy)."""
        return [self._param_of_master.get(id(p), p) for g in self.param_groups for p in g["params"]]

    def zero_grad(self, set_to_none: bool = True) -> None:
        for o in self.optimizers:
            o.zero_grad(set_to_none=set_to_none)
        for p, _ in self.dense_masters:
            if set_to_none:
                p.grad = None
            elif p.grad is not None:
                p.grad.zero_()

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._check_schedule_owner()
        if self.exchange is not None:
            self.exchange()  # data parallelism: sum every process's top-k entries (once per step)
        if self.sparse is not None:
            self.sparse.select_gradients()  # top-k of gradients kept dense until this step
        if self.max_grad_norm is not None:
            self.last_grad_norm = float(clip_grad_norm(self.params(), self.max_grad_norm))
        for p, m in self.dense_masters:
            m.grad = None if p.grad is None else p.grad.to(m.dtype)
        for o in self.optimizers:
            o.step()
        for p, m in self.dense_masters:
            if m.grad is not None:
                p.copy_(m)
                m.grad = None
        self.step_count += 1
        if self.lr_scheduler is not None:
            self.lr_scheduler.optimizer.step()  # the stand-in has no gradient; keeps torch's order check quiet
            self.lr_scheduler.step()
            self._apply_schedule()
        return loss

    def state_dict(self) -> dict:
        return {
            "step_count": self.step_count,
            "dense": self.dense.state_dict() if self.dense is not None else None,
            "sparse": self.sparse.state_dict() if self.sparse is not None else None,
            "schedule": self.lr_scheduler.state_dict() if self.lr_scheduler is not None else None,
        }

    def load_state_dict(self, state: dict) -> None:
        self.step_count = int(state["step_count"])
        if self.dense is not None:
            self.dense.load_state_dict(state["dense"])
        if self.sparse is not None:
            self.sparse.load_state_dict(state["sparse"])
        # torch's load_state_dict gives the optimizers new group dicts: share them again
        self.param_groups = [g for o in self.optimizers for g in o.param_groups]
        if self.lr_scheduler is not None:
            if state.get("schedule") is not None:
                self.lr_scheduler.load_state_dict(state["schedule"])
            else:  # a state saved before the schedule was recorded: its position is the step count
                for _ in range(self.step_count - self.lr_scheduler.last_epoch):
                    self.lr_scheduler.step()
            self._apply_schedule()

    def state_bytes_by_part(self) -> dict[str, int]:
        """Bytes of optimizer state (moments, index arrays, step tensors) per part."""
        out = {}
        for name, o in (("dense", self.dense), ("sparse", self.sparse)):
            total = 0
            if o is not None:
                for st in o.state.values():
                    total += sum(v.numel() * v.element_size() for v in st.values() if torch.is_tensor(v))
            out[name] = total
        return out

    def state_bytes(self) -> int:
        return sum(self.state_bytes_by_part().values())


def sparse_weight_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Modules with a parameter that gets a sparse COO gradient (:func:`sparse_param`), as the method that
    swapped them in says: SparseGradLinear, MePropLinear mode weight, LeadingBlockLinear whose block has
    more than k entries (top-k)."""
    return {name: m for name, m, method in swapped_modules(model) if method.sparse_parameter(m) is not None}


def sparse_param(module: nn.Module) -> torch.Tensor:
    """The sparse-gradient parameter of a module from :func:`sparse_weight_modules` (``block`` of a
    LeadingBlockLinear, ``weight`` otherwise)."""
    return method_for_layer(module).sparse_parameter(module)


def build_optimizer(
    model: nn.Module,
    lr: float = 1e-4,
    weight_decay: float = 0.0,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    schedule: str | None = "linear",
    warmup_steps: int = 0,
    total_steps: int | None = None,
    max_grad_norm: float | None = None,
    sparse_state: str = "dense",
    sparse_lr: float | None = None,
    exchange_timeout: float | None = None,
) -> SparseGradOptimizer:
    """The optimizer of any method: sparse-gradient weights -> LazySparseAdam, the rest -> AdamW.

    Sparse-gradient weights: SparseGradLinear and MePropLinear "weight" weights, and the top-k ``block``
    of LeadingBlockLinear (a block of exactly k entries trains densely and goes to AdamW like any dense parameter).

    Only parameters with ``requires_grad`` are included. Weight decay has one meaning for every method:
    AdamW's decoupled decay of each trained parameter with two or more dimensions as a whole, every step
    (not of biases and norm weights): full FT and MeProp shrink W toward 0, SparseGrad shrinks W~ —
    the same as shrinking W (rotation invariant), so both storages follow one trajectory —, and the
    methods that train a change of the pre-trained weight (LoRA's adapters, the leading block's B) pull
    W toward the pre-trained weights. Lazy Adam moves only the coordinates in a step's gradient; the
    decay moves every coordinate.

    On a bf16/fp16 model the trained matrices of the method layers have float32 master copies
    (``master_pairs()`` of the layers, buffers saved with the model): the optimizer steps the masters
    with float32 moments and rounds them back into the parameters. ``sparse_state``: "dense" (SparseAdam-like moments) or
    "compact" (moments only for touched coordinates). ``schedule``: transformers' schedule run by the
    optimizer itself (:func:`make_schedule`): "linear" (warmup then linear decay to 0 at ``total_steps``),
    "constant" (warmup then constant), any other ``transformers.get_scheduler`` name, or None to leave
    the learning rate to a scheduler of your own (``transformers.Trainer``'s). ``max_grad_norm``: clip
    the global norm of the applied gradients; None or 0: no clipping.

    A layer built with ``topk_at="step"`` keeps its gradient dense through the backward passes (so
    gradient accumulation and DistributedDataParallel's all-reduce see the whole batch's gradient);
    the optimizer takes its top-k at the start of :meth:`SparseGradOptimizer.step`. Layers with
    ``topk_at="backward"`` keep their own top-k per process under data parallelism; the optimizer
    sums them over the processes at the start of its step (:mod:`sparsegrad.data_parallel`), each
    collective under ``exchange_timeout`` seconds (None: the process group's own timeout).
    """
    sparse_mods = sparse_weight_modules(model)
    sparse_ids = {id(sparse_param(m)) for m in sparse_mods.values()}
    masters = master_copies(model)
    decay, no_decay, dense_masters = [], [], []
    for p in model.parameters():
        if not p.requires_grad or id(p) in sparse_ids:
            continue
        if id(p) in masters:
            dense_masters.append((p, masters[id(p)]))
        (decay if p.dim() >= 2 else no_decay).append(masters.get(id(p), p))
    dense_groups = [g for g in ({"params": decay, "weight_decay": weight_decay},
                                {"params": no_decay, "weight_decay": 0.0}) if g["params"]]  # fmt: skip
    dense = torch.optim.AdamW(dense_groups, lr=lr, betas=betas, eps=eps) if dense_groups else None
    sparse_params = [sparse_param(m) for m in sparse_mods.values() if sparse_param(m).requires_grad]
    sparse = None
    if sparse_params:
        sparse = LazySparseAdam(
            sparse_params, lr=sparse_lr if sparse_lr is not None else lr, betas=betas, eps=eps,
            weight_decay=weight_decay, state_layout=sparse_state,
        )  # fmt: skip
        for p in sparse_params:
            if id(p) in masters:
                sparse.register_master(p, masters[id(p)])
        for m in sparse_mods.values():
            method_for_layer(m).attach_optimizer(m, sparse)  # appliers / update listeners
            if getattr(m, "topk_at", "backward") == "step" and sparse_param(m).requires_grad:
                sparse.register_gradient_selector(sparse_param(m), m.select_gradient)
    if dense is None and sparse is None:
        raise ValueError("the model has no parameter with requires_grad=True; was a method applied?")
    exchanged = [entry for entry in backward_topk_layers(model) if entry[2].requires_grad]
    exchange = SparseGradientExchange(exchanged, timeout=exchange_timeout) if exchanged else None
    return SparseGradOptimizer(
        dense, sparse, schedule=schedule, warmup_steps=warmup_steps, total_steps=total_steps,
        max_grad_norm=max_grad_norm, dense_masters=dense_masters, exchange=exchange,
    )  # fmt: skip


def master_copies(model: nn.Module) -> dict[int, torch.Tensor]:
    """``id(parameter) -> float32 master copy`` for the trained matrices of the method layers of a
    bf16/fp16 model (each layer's ``master_pairs()``); empty for a float32 model."""
    out = {}
    for m in model.modules():
        pairs = getattr(m, "master_pairs", None)
        if callable(pairs):
            out.update({id(p): master for p, master in pairs()})
    return out
