"""LazySparseAdam: Adam for sparse (COO) gradients with lazy updates, the optimizer of the k-sparse weights.

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
itself. A :class:`~sparsegrad.methods.sparsegrad.layer.SparseGradLinear` with storage "weight" holds W and receives
dL/dW~, so its applier adds ``u_out ΔW~ R^T`` to W (and decays W as a whole); with storage "rotated" it adds ΔW~
to W~ and folds the change into its cached W. Other parameters may have
a listener that is told what changed after the step (``note_sparse_update``: a layer with storage
"rotated" refreshes its cached effective weight incrementally).

:func:`sparsegrad.optim.build_optimizer` combines it with AdamW on the dense parameters.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import torch

__all__ = ["LazySparseAdam", "STATE_LAYOUTS"]

STATE_LAYOUTS = ("dense", "compact")


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
        self._selectors: dict[int, Callable] = {}
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

    def register_gradient_selector(self, param: torch.Tensor, select: Callable) -> None:
        """``select(dense_grad) -> sparse COO grad``: for a parameter whose layer keeps its gradient dense
        until the optimizer step (``topk_at="step"``), the top-k taken once per step, from the whole
        accumulated (and, under data parallelism, all-reduced) gradient."""
        self._selectors[id(param)] = select

    @torch.no_grad()
    def select_gradients(self) -> None:
        """Replace each dense gradient that has a selector by its selection (no-op once sparse)."""
        for group in self.param_groups:
            for p in group["params"]:
                select = self._selectors.get(id(p))
                if select is not None and p.grad is not None and not p.grad.is_sparse:
                    p.grad = select(p.grad)

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
        self.select_gradients()
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
