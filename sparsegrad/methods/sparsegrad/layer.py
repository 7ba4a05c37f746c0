"""SparseGradLinear: a drop-in replacement for ``nn.Linear`` whose weight gradient is k-sparse in a
transition basis.

Conventions (row vectors, as ``nn.Linear``): a layer holds ``W`` (out x in) and computes ``y = x W^T + b``.
The transition matrices of a layer's group are ``u_in`` (in x in) and ``u_out`` (out x out), orthogonal,
the HOSVD mode factors of the stacked weight gradients (:mod:`sparsegrad.methods.sparsegrad.basis`; columns ordered by
decreasing gradient energy).

SparseGradLinear trains the rotated weight::

    W~ = u_out^T W R,          W = u_out W~ R^T,          dL/dW~ = u_out^T (dL/dW) R,

with ``R = u_in`` in the HOSVD orientation (the default; ``u_out^T G u_in`` is the Tucker core of a
gradient slice G, where the gradient energy concentrates) and ``R = u_in^T`` in the orientation of the
authors' code (``orientation="official"``). The layer computes exactly what the original computes (in weight storage its forward is the
original's own product; orthogonality of the basis matters only for which coordinates are trained); its
dL/dx and bias gradient are the original's, unrotated; its weight gradient is a torch sparse COO tensor
with exactly ``k`` entries: the largest-magnitude entries of dL/dW~.

Paper notation (§3.1-3.2) writes ``W~^T = U W^T V^T`` with ``U`` (in x in) and ``V^T`` (out x out) the
HOSVD matrices; transposed, ``W~ = V W U^T``. Taking the paper's ``U`` to be the factor ``u_in`` and its
``V^T`` to be ``u_out`` gives ``W~ = u_out^T W u_in^T``, the orientation of the authors' code; the Tucker
core orientation used here by default corresponds to ``U = u_in^T``, ``V^T = u_out``. The paper's Table 2
(x~ = x U^T ..., three products per token) is the ``formulation="regular"`` path below.

Storage (what the layer keeps in memory; the trajectory is the same):

* ``"weight"`` (default, except for the regular formulation) — only W, in the ``weight`` parameter; W~
  is never materialised. The parameter's gradient is the k-sparse dL/dW~ (its indices are coordinates
  of W~), and :func:`sparsegrad.build_optimizer` applies each k-sparse step ΔW~ as
  ``W += u_out ΔW~ R^T`` (:meth:`SparseGradLinear.apply_rotated_step`). A generic optimizer would add
  ΔW~ to W directly, which is wrong; the layer notices at the next forward and raises.
* ``"rotated"`` — W~ in the ``weight`` parameter plus a cached W_eff: one more out x in matrix, but any
  sparse optimizer (``torch.optim.SparseAdam``) can train it.

Formulations (both exact; chosen per layer, see :mod:`sparsegrad.kernels` for multiply-add counts):

* ``"regular"`` — the paper's 3-product layer: ``x~ = x R``, ``y = (x~ W~^T) u_out^T + b``; backward
  rotates dL/dY by ``u_out`` per token: ``tokens (in^2 + out^2)`` extra multiply-adds each way.
* ``"auto"`` (default) — forward with W itself (weight storage) or a cached effective weight
  ``W_eff = u_out W~ R^T`` (rotated storage) refreshed only when W~ changes (tracked through
  ``W~._version``; an optimizer that reports its k-sparse update, as :func:`sparsegrad.build_optimizer`
  does, refreshes it incrementally), ``dL/dx = G W_eff`` and ``dL/dW~ = u_out^T (G^T X) R`` with each
  rotation applied per token or once per call, whichever is cheaper.

Precision: in a bf16/fp16 layer the trained matrix (W or W~) has a float32 master copy, the buffer
``weight_master`` (saved with the model): :func:`sparsegrad.build_optimizer` steps the master and
rounds it into ``weight``; the cached W_eff of storage "rotated" is float32 then, and is always built
with autocast off.

With ``sparse_by_dense=True`` (paper §3.3) the rows of dL/dY that are entirely zero — padding, tokens
outside the loss — are dropped before every backward product and the dL/dx rows are scattered back.

The file is a little over 500 lines because SparseGradLinear is one class (two storages, two
formulations, master copies, applying rotated steps); its autograd function and the helpers it shares
with the other layers are in :mod:`sparsegrad.methods.sparsegrad.autograd` and :mod:`sparsegrad.layer_common`.
"""

from __future__ import annotations

import torch
from torch import nn

from sparsegrad.kernels import (
    apply_to_rows,
    column_major_layout,
    count_bits,
    mark_bits,
    new_bitmask,
    resolve_k,
    topk_coo,
)
from sparsegrad.layer_common import (
    FORMULATIONS,
    MEPROP_MODES,
    ORIENTATIONS,
    STORAGES,
    TOPK_AT,
    autocast_off,
    check_choice,
    check_data_parallel,
    check_topk_at,
    current_master,
    float32_master,
    needs_master,
    plain_linear,
    save_linear_context,
)
from sparsegrad.methods.sparsegrad.autograd import SparseGradFunction

# The autograd function lives in :mod:`sparsegrad.methods.sparsegrad.autograd` and the helpers shared
# with the other layers in :mod:`sparsegrad.layer_common`; the names below stay importable from here.
__all__ = ["SparseGradLinear", "ORIENTATIONS", "FORMULATIONS", "STORAGES", "MEPROP_MODES",
           "TOPK_AT", "needs_master", "float32_master", "current_master", "check_topk_at",
           "check_data_parallel", "plain_linear", "save_linear_context"]  # fmt: skip


class SparseGradLinear(nn.Module):
    """A Linear layer trained in the transition basis with a k-sparse weight gradient (see module doc).

    Parameters: ``weight`` = W (storage "weight") or W~ (storage "rotated"), out x in; its gradient is
    always the k-sparse dL/dW~. ``bias`` (unrotated). Buffers: ``u_in``, ``u_out`` (saved in the
    state_dict, moved by ``.to()``) and ``updated_mask`` (a packed bit set over the out x in coordinates
    of W~ that have received a gradient entry so far, i.e. those a lazy optimizer has updated; see
    :func:`sparsegrad.kernels.mark_bits`).

    ``dense_weight_grad=True`` (storage "rotated" only) gives the same k entries as a dense tensor
    (zeros elsewhere), for an optimizer without sparse support (``torch.optim.AdamW``, whose moments
    then keep moving entries outside each step's top-k, as in the authors' MeProp baseline).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        k: int | float,
        bias: bool = True,
        *,
        orientation: str = "hosvd",
        formulation: str = "auto",
        sparse_by_dense: bool = True,
        full_refresh_every: int = 100,
        storage: str | None = None,
        topk_at: str = "backward",
        dense_weight_grad: bool = False,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        check_choice("orientation", orientation, ORIENTATIONS)
        check_choice("formulation", formulation, FORMULATIONS)
        check_choice("topk_at", topk_at, TOPK_AT)
        self.topk_at = topk_at
        storage = storage or ("rotated" if formulation == "regular" else "weight")
        check_choice("storage", storage, STORAGES)
        if formulation == "regular" and storage == "weight":
            raise ValueError(
                "formulation='regular' (the paper's 3-product layer) computes with W~ itself; "
                "use storage='rotated' (or formulation='auto' to keep only W)"
            )
        if dense_weight_grad and (storage != "rotated" or topk_at != "backward"):
            raise ValueError(
                "dense_weight_grad (the k-sparse dL/dW~ as a dense tensor, for a dense optimizer) needs "
                "storage='rotated' (a dense optimizer adds the gradient to the parameter, which must then be W~) "
                "and topk_at='backward'"
            )
        self.dense_weight_grad = dense_weight_grad
        factory = {"device": device, "dtype": dtype}
        self.storage = storage
        self.in_features = in_features
        self.out_features = out_features
        self.k = resolve_k(k, in_features * out_features)
        self.orientation = orientation
        self.formulation = formulation
        self.sparse_by_dense = sparse_by_dense
        self.full_refresh_every = full_refresh_every
        self.weight = nn.Parameter(torch.empty(out_features, in_features, **factory))
        self.bias = nn.Parameter(torch.zeros(out_features, **factory)) if bias else None
        # Stored column-major where the sparse products of note_sparse_update need row-major
        # transposes (see prepare_basis); load_state_dict copies into them and keeps the layout, and
        # the state_dict holds ordinary contiguous copies (_save_to_state_dict).
        eye_in, eye_out = torch.eye(in_features, **factory), torch.eye(out_features, **factory)
        self.register_buffer("u_in", eye_in.t() if orientation == "hosvd" else eye_in)
        self.register_buffer("u_out", eye_out.t())
        self.register_buffer("updated_mask", new_bitmask(out_features * in_features, device))
        self.register_buffer("weight_master", float32_master(self.weight))
        # storage "rotated": saved with the model while it is valid (see _save_to_state_dict)
        self.register_buffer("effective_weight", None, persistent=False)
        self._eff_key: tuple | None = None
        self._loaded_cache: tuple | None = None  # (W_eff, updates) from a checkpoint, see _adopt_loaded_cache
        self._n_incremental = 0
        self._pending_key: tuple | None = None  # storage "weight": W's (address, version) at the last backward
        nn.init.normal_(self.weight, std=0.02)

    # ----------------------------------------------------------------------------------- construction
    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        u_in: torch.Tensor,
        u_out: torch.Tensor,
        k: int | float,
        **options,
    ) -> SparseGradLinear:
        """Wrap ``linear``: W~ = u_out^T W R (computed in float64), same bias, same function.

        ``k`` is the gradient budget, a count or a fraction of in*out. ``options``: orientation,
        formulation, sparse_by_dense, full_refresh_every, storage, topk_at, dense_weight_grad. With storage
        "weight" the layer keeps a copy of W and no rotation is computed here.
        """
        w = linear.weight
        out_f, in_f = w.shape
        if tuple(u_in.shape) != (in_f, in_f) or tuple(u_out.shape) != (out_f, out_f):
            raise ValueError(
                f"basis shapes u_in {tuple(u_in.shape)}, u_out {tuple(u_out.shape)} do not fit a Linear "
                f"with weight {tuple(w.shape)}: expected u_in ({in_f}, {in_f}), u_out ({out_f}, {out_f})"
            )
        layer = cls(
            in_f, out_f, k, bias=linear.bias is not None, device=w.device, dtype=w.dtype, **options
        )
        with torch.no_grad():
            layer.u_in, layer.u_out = cls.prepare_basis(u_in, u_out, w, layer.orientation)
            if linear.bias is not None:
                layer.bias.copy_(linear.bias.detach())
        layer.weight.requires_grad_(w.requires_grad)
        if layer.bias is not None:
            layer.bias.requires_grad_(linear.bias.requires_grad)
        if layer.storage == "weight":
            with torch.no_grad():
                layer.weight.copy_(w.detach())
                if layer.weight_master is not None:
                    layer.weight_master.copy_(w.detach())
            return layer
        with torch.no_grad():
            # W~ with u_out W~ R^T = W for the basis as the layer holds it (rounded to its dtype: a
            # bf16 basis is orthogonal only to ~4e-3, so u_out^T W R would not give back W): solved
            # in float64, which for an orthogonal basis is u_out^T W R.
            u_out64 = layer.u_out.to(torch.float64)
            r64 = layer.right_rotation().to(torch.float64)
            w_tilde = torch.linalg.solve(u_out64, w.detach().double())
            w_tilde = torch.linalg.solve(r64, w_tilde.t()).t()
            layer.weight.copy_(w_tilde)
            if layer.weight_master is not None:
                layer.weight_master.copy_(w_tilde)
            # The original W is the most exact effective weight there is.
            layer.effective_weight = w.detach().to(layer._cache_dtype(), copy=True)
            layer._eff_key = layer._cache_key()
        return layer

    @staticmethod
    def prepare_basis(u_in: torch.Tensor, u_out: torch.Tensor, like: torch.Tensor, orientation: str = "hosvd"):
        """``(u_in, u_out)`` in ``like``'s dtype and device, laid out for fast sparse products.

        ``note_sparse_update`` multiplies sparse matrices by ``u_out^T`` and by ``R^T``; those must be
        row-major for torch's sparse kernels, so ``u_out`` (and ``u_in`` in the hosvd orientation)
        are stored column-major. Tensors already in that form are returned as they are, so the layers
        of a group built from one prepared pair share its memory (build them after moving the model
        to its device: ``.to()`` copies buffers per module).
        """

        def arrange(u: torch.Tensor, column_major: bool) -> torch.Tensor:
            u = u.detach().to(device=like.device, dtype=like.dtype)
            return column_major_layout(u) if column_major else u.contiguous()

        return arrange(u_in, orientation == "hosvd"), arrange(u_out, True)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        # ordinary contiguous tensors, one per layer: safetensors / save_pretrained accept them
        for name in ("u_in", "u_out"):
            key = prefix + name
            if key in destination:
                destination[key] = destination[key].contiguous().clone()
        if self.storage == "rotated" and prefix + "weight" in destination:
            # "weight" is always W, what nn.Linear holds: plain transformers loads an unmerged checkpoint
            # correctly (to_linear's W). W~ travels beside it, so this layer reloads it exactly.
            destination[prefix + "rotated_weight"] = destination[prefix + "weight"]
            destination[prefix + "weight"] = self._compose(self._trained(), torch.float64).to(self.weight.dtype)
        # Storage "rotated": a valid cached W_eff (updated incrementally since its last full refresh)
        # and the count of those updates, so that a resumed run computes with the same bits.
        if self.effective_weight is not None and self._eff_key == self._cache_key():
            eff = self.effective_weight
            destination[prefix + "effective_weight"] = eff if keep_vars else eff.detach()
            destination[prefix + "effective_weight_updates"] = torch.tensor(self._n_incremental)
        elif self._loaded_cache is not None and self.storage == "rotated":
            # loaded and not yet adopted (no forward since): saved again as it came, so that saving a
            # reloaded layer gives what the original gave
            eff, n_updates = self._loaded_cache
            destination[prefix + "effective_weight"] = eff
            destination[prefix + "effective_weight_updates"] = torch.tensor(n_updates)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        rotated = state_dict.pop(prefix + "rotated_weight", None)
        if rotated is not None and self.storage == "rotated":
            state_dict[prefix + "weight"] = rotated  # else "weight" is W: what storage "weight" holds
        eff = state_dict.pop(prefix + "effective_weight", None)
        n_updates = state_dict.pop(prefix + "effective_weight_updates", None)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._pending_key = None  # a loaded W is not an optimizer's step
        self.effective_weight, self._eff_key, self._loaded_cache = None, None, None
        if eff is not None and self.storage == "rotated" and tuple(eff.shape) == tuple(self.weight.shape):
            # adopted at the next refresh, once the whole model (the shared basis too) is loaded
            self._loaded_cache = (eff.detach().clone(), int(n_updates) if n_updates is not None else 0)

    def master_pairs(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """``[(weight, weight_master)]`` in a bf16/fp16 layer, else ``[]`` (see :func:`sparsegrad.build_optimizer`)."""
        master = current_master(self, "weight", "weight_master")
        return [] if master is None else [(self.weight, master)]

    def _trained(self) -> torch.Tensor:
        """The most precise value of the trained matrix: the float32 master, else the parameter."""
        return self.weight.detach() if self.weight_master is None else self.weight_master

    def _cache_dtype(self) -> torch.dtype:
        return self._trained().dtype

    def to_linear(self) -> nn.Linear:
        """A plain ``nn.Linear`` with the same function: W (storage "weight"), or W = u_out W~ R^T
        computed in float64 (storage "rotated"), from the master copy where there is one, in the
        layer's dtype."""
        w = self._trained()
        w = w if self.storage == "weight" else self._compose(w, torch.float64)
        return plain_linear(w.to(self.weight.dtype), self.bias)

    # ------------------------------------------------------------------------------------- the basis
    @torch.no_grad()
    def set_basis(self, u_in: torch.Tensor, u_out: torch.Tensor) -> None:
        """Train in a new transition basis from now on, keeping the layer's function: W is unchanged.

        ``u_in`` / ``u_out`` as :meth:`prepare_basis` returns them (layers given the same prepared pair
        share its memory). Storage "weight" only swaps the matrices (W is what it keeps); storage
        "rotated" re-expresses its trained matrix, ``W~ = u_out'^T W R'`` (float64). The record of updated
        coordinates is cleared: they were coordinates of the old basis.
        """
        if tuple(u_in.shape) != tuple(self.u_in.shape) or tuple(u_out.shape) != tuple(self.u_out.shape):
            raise ValueError(f"basis shapes u_in {tuple(u_in.shape)}, u_out {tuple(u_out.shape)} do not fit this "
                             f"layer: expected {tuple(self.u_in.shape)}, {tuple(self.u_out.shape)}")  # fmt: skip
        w = None if self.storage == "weight" else self._compose(self._trained(), torch.float64)
        self.u_in, self.u_out = u_in, u_out
        self.updated_mask.zero_()
        self._pending_key = None
        if w is not None:
            w_tilde = self.rotated_from(w)
            self._trained().copy_(w_tilde)
            if self.weight_master is not None:
                self.weight.copy_(self.weight_master)
            self.effective_weight, self._eff_key, self._loaded_cache = None, None, None

    def rotated_from(self, w: torch.Tensor) -> torch.Tensor:
        """``W~ = u_out^T W R`` of a given W, computed in float64 (autocast off)."""
        with autocast_off(w.device):
            u_out, r_mat = self.u_out.to(torch.float64), self.right_rotation().to(torch.float64)
            return (u_out.t() @ w.to(torch.float64)) @ r_mat

    def right_rotation(self) -> torch.Tensor:
        """R with W~ = u_out^T W R: ``u_in`` (hosvd orientation) or ``u_in^T`` (official)."""
        return self.u_in if self.orientation == "hosvd" else self.u_in.t()

    def rotated_weight(self, dtype=None) -> torch.Tensor:
        """W~ = u_out^T W R (computed in ``dtype``, default the trained matrix's — float32 where there
        is a master copy; a copy in both storages)."""
        w = self._trained()
        if self.storage == "rotated":
            return w.to(dtype or w.dtype, copy=True)
        dtype = dtype or w.dtype
        with autocast_off(w.device):
            return (self.u_out.to(dtype).t() @ w.to(dtype)) @ self.right_rotation().to(dtype)

    def _compose(self, w_tilde: torch.Tensor, dtype=None) -> torch.Tensor:
        """u_out W~ R^T computed in ``dtype`` (autocast off), returned in ``w_tilde``'s dtype."""
        dtype = dtype or w_tilde.dtype
        with autocast_off(w_tilde.device):
            u_out = self.u_out.to(dtype)
            r_mat = self.right_rotation().to(dtype)
            return ((u_out @ w_tilde.detach().to(dtype)) @ r_mat.t()).to(w_tilde.dtype)

    def _cache_key(self) -> tuple:
        w = self.weight
        return (
            w._version, w.data_ptr(), w.device, w.dtype,
            self.u_in._version, self.u_in.data_ptr(), self.u_out._version, self.u_out.data_ptr(),
            self.orientation,
        )  # fmt: skip

    def current_effective_weight(self) -> torch.Tensor:
        """W_eff = u_out W~ R^T, recomputed only when W~ (or the basis) changed since the last call.

        Built from the master copy in float32 in a bf16/fp16 layer (otherwise in the layer's dtype),
        with autocast off."""
        if (
            self.effective_weight is None
            or self._eff_key != self._cache_key()
            or self._n_incremental >= self.full_refresh_every
        ):
            with torch.no_grad():
                self.effective_weight = self._compose(self._trained())
            self._eff_key = self._cache_key()
            self._n_incremental = 0
            self._adopt_loaded_cache()
        return self.effective_weight

    def _adopt_loaded_cache(self) -> None:
        """Continue with the cached W_eff a checkpoint carried (the same bits as the saved run), if it
        belongs to the loaded W~: it must equal the fresh u_out W~ R^T up to accumulated rounding (a
        state dict edited by hand may pair them wrongly)."""
        loaded, self._loaded_cache = getattr(self, "_loaded_cache", None), None
        if loaded is None:
            return
        eff, n_updates = loaded
        fresh = self.effective_weight
        eff = eff.to(device=fresh.device, dtype=fresh.dtype)
        tol = 1000 * torch.finfo(fresh.dtype).eps * float(fresh.norm())
        if n_updates < self.full_refresh_every and float((eff - fresh).norm()) <= tol:
            self.effective_weight = eff
            self._n_incremental = n_updates

    def _rotate_back(
        self, flat_indices: torch.Tensor, delta: torch.Tensor, dtype, allow_dense: bool = True
    ) -> torch.Tensor | None:
        """The dense change ``u_out ΔW~ R^T`` of a sparse ΔW~ (``delta`` at row-major ``flat_indices``).

        The sparse factor is multiplied on the side with fewer touched rows/columns (cost
        ``k max(in, out) + out in min(rows, cols touched)``); a ΔW~ touching nearly everything goes
        through the dense product (``out in (in + out)``), or, with ``allow_dense=False``, returns None.
        """
        d_out, d_in = self.out_features, self.in_features
        rows_all, cols_all = flat_indices // d_in, flat_indices % d_in
        u_rows, inv_rows = torch.unique(rows_all, return_inverse=True)
        u_cols, inv_cols = torch.unique(cols_all, return_inverse=True)
        n_idx = flat_indices.numel()
        cost_rows = n_idx * d_in + d_out * u_rows.numel() * d_in
        cost_cols = n_idx * d_out + d_in * u_cols.numel() * d_out
        with autocast_off(delta.device):
            return self._rotate_back_products(flat_indices, delta.to(dtype), dtype, allow_dense, rows_all, cols_all,
                                              u_rows, inv_rows, u_cols, inv_cols, cost_rows, cost_cols)  # fmt: skip

    def _rotate_back_products(self, flat_indices, delta, dtype, allow_dense, rows_all, cols_all,
                              u_rows, inv_rows, u_cols, inv_cols, cost_rows, cost_cols):  # fmt: skip
        d_out, d_in = self.out_features, self.in_features
        u_out, r_mat = self.u_out.to(dtype), self.right_rotation().to(dtype)
        if min(cost_rows, cost_cols) >= d_out * d_in * (d_in + d_out):
            if not allow_dense:
                return None
            dense = torch.zeros(d_out * d_in, dtype=dtype, device=delta.device)
            dense.index_add_(0, flat_indices, delta)
            return (u_out @ dense.view(d_out, d_in)) @ r_mat.t()
        if cost_rows <= cost_cols:
            n_rows = u_rows.numel()
            if n_rows == d_out:  # every row touched: skip the gather of u_out's columns
                left, row_idx = u_out, rows_all
            else:
                left, row_idx = u_out.index_select(1, u_rows), inv_rows
            compact = torch.sparse_coo_tensor(
                torch.stack([row_idx, cols_all]), delta, (n_rows, d_in), check_invariants=False
            )
            # sparse.mm is fast only with a row-major dense operand (a no-op .contiguous() here)
            return left @ torch.sparse.mm(compact, r_mat.t().contiguous())
        n_cols = u_cols.numel()
        if n_cols == d_in:
            right, col_idx = r_mat, cols_all
        else:
            right, col_idx = r_mat.index_select(1, u_cols), inv_cols
        compact_t = torch.sparse_coo_tensor(
            torch.stack([col_idx, rows_all]), delta, (n_cols, d_out), check_invariants=False
        )
        return (right @ torch.sparse.mm(compact_t, u_out.t().contiguous())).t()

    @torch.no_grad()
    def apply_rotated_step(self, flat_indices: torch.Tensor, delta: torch.Tensor, decay: float = 0.0) -> None:
        """Apply the optimizer's k-sparse step of W~ with decoupled decay of the whole matrix:
        ``W~ <- (1 - decay) W~ + ΔW~``, i.e. ``W <- (1 - decay) W + u_out ΔW~ R^T``.

        ``flat_indices`` (row-major into W~) and ``delta`` are the step; ``decay = lr * weight_decay``.
        Decaying W~ as a whole is decaying W (rotation invariant), so both storages follow one
        trajectory. Storage "weight" adds ``u_out ΔW~ R^T`` to W; storage "rotated" adds ΔW~ to W~ and
        folds the same change into its cached W_eff (if valid) instead of recomputing it. The step is
        made on the float32 master copy where there is one, then rounded into ``weight``. Called by
        :func:`sparsegrad.build_optimizer`'s optimizer.
        """
        target = self._trained()
        if self.storage == "weight":
            if decay:
                target.mul_(1.0 - decay)
            if flat_indices.numel():
                target.add_(self._rotate_back(flat_indices, delta, target.dtype))
            if self.weight_master is not None:
                self.weight.copy_(target)
            self._pending_key = None
            return
        cache_valid = self.effective_weight is not None and self._eff_key == self._cache_key()
        if decay:
            target.mul_(1.0 - decay)
        target.view(-1).index_add_(0, flat_indices, delta.to(target.dtype))
        if self.weight_master is not None:
            if decay:
                self.weight.copy_(target)
            else:
                self.weight.view(-1).index_copy_(0, flat_indices, target.view(-1)[flat_indices].to(self.weight.dtype))
        if not cache_valid:
            return
        change = self._rotate_back(flat_indices, delta, self.effective_weight.dtype, allow_dense=False)
        if change is None:
            return  # as costly as a full refresh: the next forward recomputes W_eff
        if decay:
            self.effective_weight.mul_(1.0 - decay)
        self.effective_weight.add_(change)
        self._eff_key = self._cache_key()
        self._n_incremental += 1

    @torch.no_grad()
    def select_gradient(self, grad: torch.Tensor) -> torch.Tensor:
        """``topk_at="step"``: the k-sparse dL/dW~ (COO) from the dense gradient of the parameter, summed
        over the step's backward passes (dL/dW for storage "weight", rotated here once per step; dL/dW~
        for storage "rotated"). Called by the optimizer (:meth:`LazySparseAdam.select_gradients`)."""
        if self.storage == "weight":
            dtype = torch.float32 if grad.dtype in (torch.bfloat16, torch.float16) else grad.dtype
            with autocast_off(grad.device):
                rotated = (self.u_out.to(dtype).t() @ grad.to(dtype)) @ self.right_rotation().to(dtype)
            grad = rotated.to(grad.dtype)
            overwrite = True
        else:
            overwrite = False
        selected = topk_coo(grad, self.k, overwrite=overwrite)
        idx = selected.indices()
        mark_bits(self.updated_mask, idx[0] * self.in_features + idx[1])
        return selected

    def note_gradient(self) -> None:
        """Record W's state when a W~-space gradient was produced (storage "weight"; see forward)."""
        if self.storage == "weight":
            self._pending_key = (self.weight.data_ptr(), self.weight._version)

    def _check_not_stepped_by_foreign_optimizer(self) -> None:
        key = self._pending_key
        if key is None or key[0] != self.weight.data_ptr() or key[1] == self.weight._version:
            return
        self._pending_key = None
        raise RuntimeError(
            "SparseGradLinear(storage='weight') holds W, but its gradient is dL/dW~ in the rotated basis, "
            "and W changed after the backward pass without apply_rotated_step: an optimizer that adds "
            "the gradient to the parameter directly (torch.optim.SparseAdam, SGD, ...) trains the wrong "
            "coordinates. Use sparsegrad.build_optimizer(model, ...), or build the layers with "
            "storage='rotated' (MethodConfig(storage='rotated')) to train W~ with any sparse optimizer. "
            "If you changed W yourself on purpose after a backward pass, call "
            "layer.discard_pending_gradient() before the next forward."
        )

    def discard_pending_gradient(self) -> None:
        """Forget the last backward pass: the next forward accepts any change of W made since."""
        self._pending_key = None

    @torch.no_grad()
    def note_sparse_update(self, flat_indices: torch.Tensor, delta: torch.Tensor, version_before: int) -> None:
        """Storage "rotated": fold a k-sparse change of W~ into the cached W_eff (called by the optimizer
        after its step).

        ``flat_indices`` (row-major into W~) and ``delta`` describe the whole change the optimizer made;
        ``version_before`` is ``W~._version`` before it. If the cache was not valid for that version, or
        an incremental refresh would cost as much as a full one, the cache is left stale and the next
        forward recomputes it. Cost: ``k max(in, out) + out in min(rows, cols touched)``.
        """
        key_before = (version_before,) + self._cache_key()[1:]
        if self.effective_weight is None or self._eff_key != key_before:
            return
        change = self._rotate_back(flat_indices, delta, self.effective_weight.dtype, allow_dense=False)
        if change is None:
            return
        self.effective_weight.add_(change)
        self._eff_key = self._cache_key()
        self._n_incremental += 1

    # --------------------------------------------------------------------------------------- compute
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_data_parallel(self, self.weight)
        if self.storage == "weight":
            self._check_not_stepped_by_foreign_optimizer()
            w_eff = self.weight
        else:
            w_eff = self.current_effective_weight() if self.formulation == "auto" else None
            if w_eff is not None and w_eff.dtype != self.weight.dtype:
                w_eff = w_eff.to(self.weight.dtype)  # the float32 cache of a bf16/fp16 layer
        return apply_to_rows(SparseGradFunction, x, self.out_features, self.weight, self.bias, w_eff, self)

    def num_updated(self) -> int:
        """Number of distinct W~ coordinates that have received a gradient entry so far."""
        return count_bits(self.updated_mask)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, k={self.k}, "
            f"bias={self.bias is not None}, orientation={self.orientation}, formulation={self.formulation}, "
            f"storage={self.storage}, sparse_by_dense={self.sparse_by_dense}, topk_at={self.topk_at}"
            + (", dense_weight_grad=True" if self.dense_weight_grad else "")
        )
