"""One optimizer object for a SparseGrad model: lazy Adam on the sparse weights, AdamW on the rest.

:class:`LazySparseAdam` follows ``torch.optim.SparseAdam`` exactly (same update arithmetic, one step
counter shared by all coordinates of a parameter, ``eps`` added to ``sqrt(v)`` before bias correction of
the step size) — only the coordinates present in a step's COO gradient change, and their moments too.
It adds decoupled weight decay (AdamW's meaning: the whole parameter shrinks by ``lr * weight_decay``
every step, touched or not) and two layouts of the moment state:

* ``state_layout="dense"``: ``exp_avg``/``exp_avg_sq`` of the parameter's full shape, as SparseAdam
  (as much memory as Adam over the whole MLP);
* ``state_layout="compact"``: moments only for the coordinates touched so far, in a sorted array of
  flat indices (int32 where the parameter has < 2^31 entries) grown as new coordinates appear —
  12 bytes per touched coordinate instead of 8 bytes per coordinate of the matrix. Both layouts give
  the same trajectory.

A parameter may have a *master copy* (:meth:`LazySparseAdam.register_master`): a float32 tensor of its
shape that the optimizer steps instead (moments in float32 too) before writing the rounded result back
into the bf16/fp16 parameter — a k-sparse step of a bf16 model's matrix is mostly smaller than half a
bf16 ulp of the entries it lands on, and would round away.

A parameter may have an *applier* (:meth:`LazySparseAdam.register_applier`): the optimizer then hands
it the step (coordinates, change, ``lr * weight_decay``) instead of adding the change to the parameter
itself. A :class:`~sparsegrad.layers.SparseGradLinear` with storage "weight" holds W and receives
dL/dW~, so its applier adds ``u_out ΔW~ R^T`` to W (and decays W as a whole); with storage "rotated" it adds ΔW~
to W~ and folds the change into its cached W. Other parameters may have
a listener that is told what changed after the step (``note_sparse_update``: a layer with storage
"rotated" refreshes its cached effective weight incrementally).

:func:`build_optimizer` wraps the two optimizers with a learning-rate schedule, global gradient-norm
clipping over dense gradients and COO values, ``state_dict``/``load_state_dict`` for resume, and
``state_bytes()``. ``load_state_dict`` restores every state tensor in the dtype it was saved in
(``torch.optim.Optimizer.load_state_dict`` casts them to the parameter's dtype, which would turn the
int32 coordinate keys of the compact layout into float32 or bf16 and the float32 moments of a bf16
parameter into bf16), so a resumed run is bit-identical to an uninterrupted one.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import torch
from torch import nn

from .registry import method_for_layer, swapped_modules

__all__ = ["LazySparseAdam", "SparseGradOptimizer", "build_optimizer", "clip_grad_norm", "lr_factor", "master_copies"]

STATE_LAYOUTS = ("dense", "compact")
SCHEDULES = ("linear", "constant")


class LazySparseAdam(torch.optim.Optimizer):
    """Adam for sparse (COO) gradients with lazy updates; see the module docstring.

    Dense gradients given to it are treated as sparse over their non-zero entries.
    """

    def __init__(
        self,
        params: Iterable,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        state_layout: str = "dense",
    ) -> None:
        if state_layout not in STATE_LAYOUTS:
            raise ValueError(f"unknown state_layout {state_layout!r}; valid: {', '.join(STATE_LAYOUTS)}")
        defaults = {"lr": lr, "betas": tuple(betas), "eps": eps, "weight_decay": weight_decay}
        super().__init__(params, defaults)
        self.state_layout = state_layout
        self._listeners: dict[int, Callable] = {}
        self._appliers: dict[int, Callable] = {}
        self._masters: dict[int, torch.Tensor] = {}

    def register_update_listener(self, param: torch.Tensor, callback: Callable) -> None:
        """``callback(flat_indices, delta, version_before)`` is called after each update of ``param``
        without weight decay (with decay the whole parameter changed, which the callback cannot be
        told sparsely; it sees the version change instead)."""
        self._listeners[id(param)] = callback

    def register_applier(self, param: torch.Tensor, apply: Callable) -> None:
        """``apply(flat_indices, delta, decay)`` makes each step of ``param`` instead of the optimizer:
        ``delta`` is the Adam step at the coordinates ``flat_indices`` (no weight decay in it; float32
        when ``param`` has a master copy) and ``decay = lr * weight_decay`` the decoupled decay of the
        whole parameter, which the applier owns (as it owns the parameter's master copy, if any)."""
        self._appliers[id(param)] = apply

    def register_master(self, param: torch.Tensor, master: torch.Tensor) -> None:
        """Step ``master`` (a higher-precision copy of ``param``, same shape) and write its rounded
        value back into ``param`` after each step; the moments are kept in ``master``'s dtype."""
        if master.shape != param.shape:
            raise ValueError(f"master copy of shape {tuple(master.shape)} for a parameter of shape {tuple(param.shape)}")
        self._masters[id(param)] = master

    def _init_state(self, p: torch.Tensor) -> dict:
        state = self.state[p]
        state["step"] = 0
        dtype = self._masters[id(p)].dtype if id(p) in self._masters else p.dtype
        if self.state_layout == "dense":
            state["exp_avg"] = torch.zeros(p.shape, dtype=dtype, device=p.device)
            state["exp_avg_sq"] = torch.zeros(p.shape, dtype=dtype, device=p.device)
        else:
            key_dtype = torch.int32 if p.numel() < 2**31 else torch.int64
            state["keys"] = torch.empty(0, dtype=key_dtype, device=p.device)
            state["exp_avg"] = torch.empty(0, dtype=dtype, device=p.device)
            state["exp_avg_sq"] = torch.empty(0, dtype=dtype, device=p.device)
        return state

    def load_state_dict(self, state_dict: dict) -> None:
        """As ``torch.optim.Optimizer.load_state_dict``, but every state tensor keeps the dtype it was
        saved in (int32/int64 coordinate keys, float32 moments of a parameter with a master copy)."""
        super().load_state_dict(state_dict)
        saved_ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        params = [p for g in self.param_groups for p in g["params"]]
        for saved_id, p in zip(saved_ids, params):
            saved = state_dict["state"].get(saved_id)
            if saved is None:
                continue
            self.state[p] = {
                name: value.to(device=p.device, copy=True) if torch.is_tensor(value) else value
                for name, value in saved.items()
            }  # fmt: skip

    @staticmethod
    def _slots(state: dict, flat: torch.Tensor) -> torch.Tensor:
        """Positions of ``flat`` (unique, sorted) in the compact state, inserting new coordinates."""
        keys = state["keys"]
        query = flat.to(keys.dtype)
        n = keys.numel()
        pos = torch.searchsorted(keys, query)
        if n:
            found = (pos < n) & keys[pos.clamp(max=n - 1)].eq(query)
        else:
            found = torch.zeros_like(query, dtype=torch.bool)
        if not bool(found.all()):
            # merge the sorted new coordinates into the sorted keys in O(n + m log n), no re-sort
            new = query[~found]
            m = new.numel()
            at_new = torch.searchsorted(keys, new) + torch.arange(m, device=keys.device)
            at_old = torch.arange(n, device=keys.device) + torch.searchsorted(new, keys)
            merged_keys = keys.new_empty(n + m)
            merged_keys[at_old] = keys
            merged_keys[at_new] = new
            state["keys"] = merged_keys
            for name in ("exp_avg", "exp_avg_sq"):
                merged = state[name].new_zeros(n + m)
                merged[at_old] = state[name]
                state[name] = merged
            pos = torch.searchsorted(merged_keys, query)
        return pos

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            lr, eps, wd = group["lr"], group["eps"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                grad = p.grad if p.grad.is_sparse else p.grad.to_sparse()
                grad = grad.coalesce()
                flat = _flat_indices(grad.indices(), p.shape)
                master = self._masters.get(id(p))
                values = grad.values() if master is None else grad.values().to(master.dtype)
                state = self.state[p] if self.state[p] else self._init_state(p)
                state["step"] += 1
                if self.state_layout == "dense":
                    m_store, v_store, where = state["exp_avg"].view(-1), state["exp_avg_sq"].view(-1), flat
                else:
                    where = self._slots(state, flat)
                    m_store, v_store = state["exp_avg"], state["exp_avg_sq"]
                # Same arithmetic as torch.optim.SparseAdam.
                old_m = m_store[where]
                upd_m = values.sub(old_m).mul_(1 - beta1)
                m_store.index_add_(0, where, upd_m)
                numer = upd_m.add_(old_m)
                old_v = v_store[where]
                upd_v = values.pow(2).sub_(old_v).mul_(1 - beta2)
                v_store.index_add_(0, where, upd_v)
                denom = upd_v.add_(old_v).sqrt_().add_(eps)
                bias_correction1 = 1 - beta1 ** state["step"]
                bias_correction2 = 1 - beta2 ** state["step"]
                step_size = lr * math.sqrt(bias_correction2) / bias_correction1
                update = numer.div_(denom).mul_(-step_size)
                applier = self._appliers.get(id(p))
                if applier is not None:
                    applier(flat, update, lr * wd)
                    continue
                version_before = p._version
                target = p if master is None else master
                t_flat = target.view(-1)
                old_t = t_flat[flat]
                if wd:  # decoupled, the whole parameter, before the step (as torch.optim.AdamW)
                    target.mul_(1 - lr * wd)
                t_flat.index_add_(0, flat, update)
                if master is not None:
                    if wd:
                        p.copy_(master)
                    else:
                        p.view(-1).index_copy_(0, flat, t_flat[flat].to(p.dtype))
                listener = self._listeners.get(id(p))
                if listener is not None and not wd:  # a decayed parameter changed everywhere
                    listener(flat, t_flat[flat] - old_t, version_before)
        return loss


def _flat_indices(indices: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    flat = torch.zeros(indices.shape[1], dtype=torch.long, device=indices.device)
    for dim, size in enumerate(shape):
        flat = flat * size + indices[dim]
    return flat


def clip_grad_norm(params: Iterable[torch.Tensor], max_norm: float) -> torch.Tensor:
    """Clip the global 2-norm of dense gradients and sparse COO gradients together, in place.

    Sparse gradients are coalesced first (duplicate indices summed), so the norm is that of the
    dense-equivalent gradient; the scaling matches ``torch.nn.utils.clip_grad_norm_``.
    """
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


def lr_factor(step: int, schedule: str, warmup_steps: int, total_steps: int | None) -> float:
    """Multiplier of the base learning rate before optimizer step number ``step`` (0-based).

    Same shapes as transformers' ``get_linear_schedule_with_warmup`` / ``..._constant_...``.
    """
    if step < warmup_steps:
        return step / max(1, warmup_steps)
    if schedule == "constant":
        return 1.0
    if total_steps is None:
        raise ValueError("schedule='linear' needs total_steps")
    return max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))


class SparseGradOptimizer:
    """Dense AdamW + :class:`LazySparseAdam` stepped together, with schedule and clipping.

    ``dense_masters``: ``(param, master)`` pairs where ``dense`` optimises the float32 ``master`` in
    place of the low-precision ``param``: before each step the parameter's gradient is copied to the
    master, after it the master is rounded back into the parameter.
    """

    def __init__(
        self,
        dense: torch.optim.Optimizer | None,
        sparse: LazySparseAdam | None,
        *,
        schedule: str = "constant",
        warmup_steps: int = 0,
        total_steps: int | None = None,
        max_grad_norm: float | None = None,
        dense_masters: Iterable[tuple[torch.Tensor, torch.Tensor]] = (),
    ) -> None:
        if schedule not in SCHEDULES:
            raise ValueError(f"unknown schedule {schedule!r}; valid: {', '.join(SCHEDULES)}")
        if schedule == "linear" and total_steps is None:
            raise ValueError("schedule='linear' needs total_steps")
        self.dense, self.sparse = dense, sparse
        self.schedule, self.warmup_steps, self.total_steps = schedule, warmup_steps, total_steps
        self.max_grad_norm = max_grad_norm
        self.dense_masters = list(dense_masters)
        self._param_of_master = {id(m): p for p, m in self.dense_masters}
        self.step_count = 0
        self.last_grad_norm: float | None = None
        for group in self.param_groups:
            group.setdefault("initial_lr", group["lr"])

    @property
    def optimizers(self) -> list[torch.optim.Optimizer]:
        return [o for o in (self.dense, self.sparse) if o is not None]

    @property
    def param_groups(self) -> list[dict]:
        return [g for o in self.optimizers for g in o.param_groups]

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
    def step(self) -> None:
        if self.max_grad_norm is not None:
            self.last_grad_norm = float(clip_grad_norm(self.params(), self.max_grad_norm))
        factor = lr_factor(self.step_count, self.schedule, self.warmup_steps, self.total_steps)
        for group in self.param_groups:
            group["lr"] = group["initial_lr"] * factor
        for p, m in self.dense_masters:
            m.grad = None if p.grad is None else p.grad.to(m.dtype)
        for o in self.optimizers:
            o.step()
        for p, m in self.dense_masters:
            if m.grad is not None:
                p.copy_(m)
                m.grad = None
        self.step_count += 1

    def state_dict(self) -> dict:
        return {
            "step_count": self.step_count,
            "dense": self.dense.state_dict() if self.dense is not None else None,
            "sparse": self.sparse.state_dict() if self.sparse is not None else None,
        }

    def load_state_dict(self, state: dict) -> None:
        self.step_count = int(state["step_count"])
        if self.dense is not None:
            self.dense.load_state_dict(state["dense"])
        if self.sparse is not None:
            self.sparse.load_state_dict(state["sparse"])

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
    schedule: str = "linear",
    warmup_steps: int = 0,
    total_steps: int | None = None,
    max_grad_norm: float | None = None,
    sparse_state: str = "dense",
    sparse_lr: float | None = None,
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
    "compact" (moments only for touched coordinates). ``schedule``: "linear" (warmup then linear decay
    to 0 at ``total_steps``) or "constant" (warmup then constant).
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
    if dense is None and sparse is None:
        raise ValueError("the model has no parameter with requires_grad=True; was a method applied?")
    return SparseGradOptimizer(
        dense, sparse, schedule=schedule, warmup_steps=warmup_steps, total_steps=total_steps,
        max_grad_norm=max_grad_norm, dense_masters=dense_masters,
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
