"""Sparse kernels of SparseGrad: exact top-k selection, sparse-by-dense row selection, cost model.

Everything here is a pure tensor function; the layers in :mod:`sparsegrad.methods.sparsegrad.layer` compose them.

* :func:`topk_coo` keeps exactly ``k`` entries of a dense matrix by magnitude and returns them as a
  coalesced COO tensor. Ties at the threshold are broken by the lowest flat (row-major) index, so the
  selection is deterministic.
* :func:`nonzero_rows` / :func:`scatter_rows` implement the sparse-by-dense product of paper §3.3
  (equations 1-2): rows of dL/dY that are entirely zero (padding, tokens outside the loss) are dropped
  before the products, and the result rows are scattered back, with ``index_select``/``index_copy``
  instead of the authors' identity-matrix product.
* :func:`new_bitmask` / :func:`mark_bits` / :func:`count_bits`: a packed bit set over the entries of a
  weight (one bit per entry, 1/8 of a bool mask), recording which coordinates have received a
  gradient entry so far.
* :func:`resolve_k` turns a budget given as a count or a fraction into a count.
* The ``macs_*`` functions count multiply-adds of one linear layer's forward + backward under each
  formulation; the layers use :func:`cheapest_rotation_sides` to pick the exact formulation with the
  fewest multiply-adds per call, and the layer benchmark prints them.
"""

from __future__ import annotations

import torch

__all__ = [
    "resolve_k",
    "topk_coo",
    "topk_rows",
    "apply_to_rows",
    "drop_zero_rows",
    "nonzero_rows",
    "scatter_rows",
    "cheapest_rotation_sides",
    "column_major_layout",
    "new_bitmask",
    "mark_bits",
    "set_bit_positions",
    "count_bits",
    "macs_dense",
    "macs_regular",
    "macs_auto",
    "macs_lora",
]


def resolve_k(k: int | float, numel: int) -> int:
    """A budget as a count: an ``int`` is taken as is, a ``float`` in (0, 1] as a fraction of ``numel``.

    The result is clipped to ``[1, numel]``.
    """
    if isinstance(k, bool):
        raise TypeError("k must be an int count or a float fraction, not a bool")
    if isinstance(k, float):
        if not 0.0 < k <= 1.0:
            raise ValueError(f"a fractional budget k must lie in (0, 1], got {k}")
        count = int(round(k * numel))
    elif isinstance(k, int):
        count = k
    else:
        raise TypeError(f"k must be an int count or a float fraction, got {type(k).__name__}")
    if count < 1:
        raise ValueError(f"budget k={k} keeps no entry of {numel}")
    return min(count, numel)


def _topk_flat_indices(flat_abs: torch.Tensor, k: int) -> torch.Tensor:
    """Sorted flat indices of the ``k`` largest entries of a 1-D non-negative tensor.

    Among entries equal to the k-th largest value, the lowest indices win.
    """
    n = flat_abs.numel()
    if k >= n:
        return torch.arange(n, device=flat_abs.device)
    candidates = None
    if n >= 1 << 16 and k * 8 <= n:
        # Exact top-k over a prefiltered candidate set: a threshold estimated from a strided sample
        # (aiming at ~1.5k candidates) usually keeps >= k entries; if it does not, fall back.
        stride = 16
        sample = flat_abs[::stride]
        k_sample = min(sample.numel(), max(1, (3 * k) // (2 * stride)))
        tau0 = torch.topk(sample, k_sample, sorted=False).values.min()
        keep = (flat_abs >= tau0).nonzero().squeeze(1)
        if keep.numel() >= k:
            candidates = keep
    pool = flat_abs if candidates is None else flat_abs[candidates]
    values, idx = torch.topk(pool, k, sorted=False)
    if candidates is not None:
        idx = candidates[idx]
    threshold = values.min()
    if int((pool >= threshold).sum()) == k:  # no tie straddles the cut: topk's set is the answer
        return idx.sort().values
    # Ties at the threshold: keep every strictly larger entry, then the lowest-index ties.
    above = flat_abs > threshold
    n_above = int(above.sum())
    strict = above.nonzero().squeeze(1)
    ties = (flat_abs == threshold).nonzero().squeeze(1)[: k - n_above]
    return torch.cat([strict, ties]).sort().values


def topk_coo(dense: torch.Tensor, k: int, overwrite: bool = False) -> torch.Tensor:
    """Keep exactly ``k`` entries of a 2-D tensor with the largest magnitude, as coalesced COO.

    ``k`` is a count (see :func:`resolve_k`). Ties at the cut are broken by the lowest row-major index.
    NaN entries are not expected (the gradients are finite). ``overwrite``: ``dense`` (contiguous) is
    a temporary the caller drops: take magnitudes in place (one bit per entry for the signs instead of
    a full-size copy); ``dense`` holds |dense| afterwards.
    """
    if dense.dim() != 2:
        raise ValueError(f"topk_coo expects a matrix, got shape {tuple(dense.shape)}")
    n_cols = dense.shape[1]
    if overwrite and dense.is_contiguous():
        flat = dense.view(-1)
        negative = flat.signbit()
        idx = _topk_flat_indices(flat.abs_(), k)
        values = flat[idx]
        values[negative[idx]] *= -1
    else:
        flat = dense.reshape(-1)
        idx = _topk_flat_indices(flat.abs(), k)
        values = flat[idx]
    indices = torch.stack([idx // n_cols, idx % n_cols])
    return torch.sparse_coo_tensor(
        indices, values, dense.shape, dtype=dense.dtype, device=dense.device, is_coalesced=True,
        check_invariants=False,
    )


def topk_rows(mat: torch.Tensor, k: int) -> torch.Tensor:
    """meProp (Sun et al., 2017): keep the ``k`` largest-magnitude entries of every row, zero the rest."""
    if k >= mat.shape[-1]:
        return mat
    idx = mat.abs().topk(k, dim=-1, sorted=False).indices
    return torch.zeros_like(mat).scatter_(-1, idx, mat.gather(-1, idx))


def nonzero_rows(mat: torch.Tensor) -> torch.Tensor | None:
    """Indices of the rows of a 2-D tensor that hold a non-zero entry; ``None`` when every row does.

    ``None`` lets callers skip the gather/scatter entirely when there is nothing to drop.
    """
    # two row reductions, no full-size boolean temporary; a NaN row is kept
    keep = mat.amax(dim=1).ne(0) | mat.amin(dim=1).ne(0)
    rows = keep.nonzero().squeeze(1)
    if rows.numel() == mat.shape[0]:
        return None
    return rows


def apply_to_rows(function, x: torch.Tensor, out_features: int, *args) -> torch.Tensor:
    """Run a row-wise autograd ``function`` on ``x`` (..., in) flattened to 2-D rows; reshape back.

    The custom backward passes work on a (tokens x features) matrix of dL/dY, whose all-zero rows
    sparse-by-dense drops.
    """
    lead = x.shape[:-1]
    y = function.apply(x.reshape(-1, x.shape[-1]), *args)
    return y.reshape(*lead, out_features)


def drop_zero_rows(
    grad_y: torch.Tensor, x: torch.Tensor, enabled: bool = True, dtype: torch.dtype | None = None
) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor]:
    """Sparse-by-dense selection (paper §3.3, equation 1): ``(rows, grad_y[rows], x[rows])``.

    ``rows`` are the rows of dL/dY holding a non-zero entry (``None`` when every row does, or when
    ``enabled`` is false; then the inputs come back unchanged). :func:`scatter_rows` is the inverse.
    ``dtype``: cast both first (a custom backward computes in its weight's dtype; under autocast
    dL/dY may arrive in lower precision), dL/dY made contiguous.
    """
    if dtype is not None:
        grad_y, x = grad_y.to(dtype).contiguous(), x.to(dtype)
    rows = nonzero_rows(grad_y) if enabled else None
    if rows is None:
        return None, grad_y, x
    return rows, grad_y.index_select(0, rows), x.index_select(0, rows)


def scatter_rows(compact: torch.Tensor, rows: torch.Tensor | None, n_rows: int) -> torch.Tensor:
    """Inverse of ``index_select(0, rows)``: place ``compact`` rows at ``rows`` of a zero matrix."""
    if rows is None:
        return compact
    out = compact.new_zeros((n_rows, compact.shape[1]))
    return out.index_copy_(0, rows, compact)


def column_major_layout(u: torch.Tensor) -> torch.Tensor:
    """``u`` with each column contiguous (strides ``(1, rows)``): itself if it already is, else a copy.

    The layout of LAPACK's eigenvectors, and the one whose transpose torch's sparse products need.
    """
    return u if u.stride() == (1, u.shape[0]) else u.t().contiguous().t()


_POPCOUNT = torch.tensor([bin(i).count("1") for i in range(256)], dtype=torch.int64)


def new_bitmask(n_bits: int, device=None) -> torch.Tensor:
    """A zeroed packed bit set of ``n_bits`` bits (uint8, ``ceil(n_bits / 8)`` bytes)."""
    return torch.zeros((n_bits + 7) // 8, dtype=torch.uint8, device=device)


def mark_bits(bits: torch.Tensor, flat: torch.Tensor) -> None:
    """Set the bits at the flat positions ``flat`` (duplicates allowed), in place."""
    flat = torch.unique(flat)
    byte, bit = flat // 8, (flat % 8).to(torch.uint8)
    value = torch.ones_like(bit).bitwise_left_shift_(bit)
    new = bits[byte].bitwise_and(value).eq(0)
    # distinct (byte, bit) pairs whose bit is still clear: adding their values sets exactly them
    bits.index_add_(0, byte[new], value[new])


def set_bit_positions(bits: torch.Tensor, n_bits: int) -> torch.Tensor:
    """The flat positions of the set bits (ascending, int64): the inverse of :func:`mark_bits`."""
    shifts = torch.arange(8, dtype=torch.uint8, device=bits.device)
    unpacked = bits.unsqueeze(1).bitwise_right_shift(shifts).bitwise_and_(1).reshape(-1)[:n_bits]
    return unpacked.nonzero().squeeze(1)


def count_bits(bits: torch.Tensor) -> int:
    """Number of set bits."""
    return int(_POPCOUNT.to(bits.device)[bits.long()].sum())


def cheapest_rotation_sides(n_tokens: int, d_in: int, d_out: int) -> tuple[bool, bool]:
    """Where to apply the rotations of dL/dW~ = u_out^T (G^T X) R, per side, with fewest multiply-adds.

    Returns ``(rotate_input_per_token, rotate_output_per_token)``. Rotating the ``n_tokens`` input rows
    costs ``n_tokens * d_in^2`` against ``d_out * d_in^2`` for rotating the ``d_out x d_in`` product
    once; rotating the output-gradient rows costs ``n_tokens * d_out^2`` against ``d_in * d_out^2``.
    """
    return n_tokens < d_out, n_tokens < d_in


def macs_dense(n_tokens: int, d_in: int, d_out: int) -> int:
    """nn.Linear forward + backward (y, dL/dx, dL/dW), all tokens: ``3 T in out``."""
    return 3 * n_tokens * d_in * d_out


def macs_lora(n_tokens: int, d_in: int, d_out: int, rank: int) -> int:
    """Frozen Linear forward + dL/dx, plus the rank-r adapter's forward and backward."""
    frozen = 2 * n_tokens * d_in * d_out
    adapter = 3 * n_tokens * rank * (d_in + d_out)
    return frozen + adapter


def macs_regular(n_tokens: int, d_in: int, d_out: int, n_backward_rows: int | None = None) -> int:
    """The paper's 3-product layer (rotate x by u_in, dL/dY by u_out, per token).

    Forward ``T (in^2 + in out + out^2)``; backward on ``T'`` rows (``T' = T`` without sparse-by-dense):
    ``T' out^2`` (rotate dL/dY) + ``T' (out in + in^2)`` (dL/dx) + ``T' out in`` (dL/dW~).
    """
    t_b = n_tokens if n_backward_rows is None else n_backward_rows
    forward = n_tokens * (d_in * d_in + d_in * d_out + d_out * d_out)
    backward = t_b * d_out * d_out + t_b * (d_out * d_in + d_in * d_in) + t_b * d_out * d_in
    return forward + backward


def macs_auto(
    n_tokens: int,
    d_in: int,
    d_out: int,
    n_backward_rows: int | None = None,
    weight_refresh_macs: int | None = None,
) -> int:
    """The cached-weight formulation: ``y = x W_eff^T`` with ``W_eff = u_out W~ R^T`` cached per step.

    Forward ``T in out``; dL/dx ``T' out in``; dL/dW~ ``T' out in`` plus each rotation at its cheaper
    side (:func:`cheapest_rotation_sides`); plus refreshing ``W_eff`` once per optimizer step — a full
    refresh is ``out in (in + out)``, an incremental one after a k-sparse update costs about
    ``out in min(rows, cols touched)``; pass ``weight_refresh_macs`` to override the full refresh.
    """
    t_b = n_tokens if n_backward_rows is None else n_backward_rows
    per_token_in, per_token_out = cheapest_rotation_sides(t_b, d_in, d_out)
    rot_in = t_b * d_in * d_in if per_token_in else d_out * d_in * d_in
    rot_out = t_b * d_out * d_out if per_token_out else d_in * d_out * d_out
    refresh = d_out * d_in * (d_in + d_out) if weight_refresh_macs is None else weight_refresh_macs
    return n_tokens * d_in * d_out + 2 * t_b * d_in * d_out + rot_in + rot_out + refresh
