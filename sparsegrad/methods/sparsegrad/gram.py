"""Gram matrices of stacked weight gradients, folded one gradient slice at a time (paper §3.1).

:func:`sparsegrad.methods.sparsegrad.basis.estimate_basis` needs ``sum_n G_n G_n^T`` and ``sum_n G_n^T G_n`` over the weight
gradients of a group; this module accumulates them without ever holding the stack: a
:class:`GramTap` on each target linear's output hands (dL/dY, X) of every call to a
:class:`GramAccumulator`, which folds each slice directly or in factored form (:func:`gram_macs`),
buffering thin factored updates, on the upper triangle only (:func:`add_symmetric_product`; read with
:func:`upper_symmetric`).
"""

from __future__ import annotations

import torch

from sparsegrad.kernels import drop_zero_rows

__all__ = ["GramAccumulator", "GramTap", "add_symmetric_product", "upper_symmetric", "gram_macs"]


class GramAccumulator:
    """The Gram matrices of every key, folded one gradient slice at a time (the stack never exists).

    A slice is the gradient of one call of a target linear, ``G = g^T x`` with ``g`` = dL/dY and ``x``
    the input rows (tokens x features). Its contributions ``G G^T`` and ``G^T G`` are computed either
    from G or, when fewer than ``in``/``out`` token rows hold gradient, in factored form
    ``g^T (x x^T) g`` and ``x^T (g g^T) x`` — whichever costs fewer multiply-adds (:func:`gram_macs`).
    Rows of ``g`` that are entirely zero (padding, tokens outside the loss) are dropped first.

    A factored contribution is a product ``A B`` with a thin inner dimension (the slice's rows), and a
    sum of such products is one product of the concatenated factors, ``[A_1 .. A_m] [B_1; ..; B_m]``:
    they are buffered per Gram until ``flush_rows`` rows have gathered, then folded in one update
    (a thin update is bound by reading and writing the whole Gram, not by its multiply-adds).
    """

    def __init__(self, dtype: torch.dtype, device: torch.device, flush_rows: int = 256) -> None:
        self.dtype, self.device, self.flush_rows = dtype, device, flush_rows
        self.gram_out: dict[str, torch.Tensor] = {}
        self.gram_in: dict[str, torch.Tensor] = {}
        self.counts: dict[str, int] = {}
        self._pending: dict[tuple[str, str], list[tuple[torch.Tensor, torch.Tensor]]] = {}

    def _grams(self, key: str, d_out: int, d_in: int) -> tuple[torch.Tensor, torch.Tensor]:
        if key not in self.gram_out:
            self.gram_out[key] = torch.zeros(d_out, d_out, device=self.device, dtype=self.dtype)
            self.gram_in[key] = torch.zeros(d_in, d_in, device=self.device, dtype=self.dtype)
            self.counts[key] = 0
        return self.gram_out[key], self.gram_in[key]

    def _target(self, key: str, side: str) -> torch.Tensor:
        return (self.gram_out if side == "out" else self.gram_in)[key]

    def _add_thin(self, key: str, side: str, a: torch.Tensor, b: torch.Tensor) -> None:
        pending = self._pending.setdefault((key, side), [])
        pending.append((a, b))
        if sum(p[0].shape[1] for p in pending) >= self.flush_rows:
            self._flush(key, side)

    def _exact(self):
        """The Grams accumulate in ``self.dtype`` also when the passes run under ``torch.autocast``."""
        return torch.autocast(self.device.type, enabled=False)

    def _flush(self, key: str, side: str) -> None:
        pending = self._pending.pop((key, side), [])
        if not pending:
            return
        a = torch.cat([p[0] for p in pending], dim=1) if len(pending) > 1 else pending[0][0]
        b = torch.cat([p[1] for p in pending], dim=0) if len(pending) > 1 else pending[0][1]
        with self._exact():
            add_symmetric_product(self._target(key, side), a, b)

    def finish(self) -> None:
        """Fold every buffered contribution (call before reading the Grams)."""
        for key, side in list(self._pending):
            self._flush(key, side)

    @torch.no_grad()
    def add_weight_grad(self, key: str, grad: torch.Tensor) -> None:
        """Fold one weight gradient G (out x in)."""
        g = grad.detach().to(device=self.device, dtype=self.dtype)
        gram_out, gram_in = self._grams(key, *g.shape)
        with self._exact():
            add_symmetric_product(gram_out, g, g.t())
            add_symmetric_product(gram_in, g.t(), g)
        self.counts[key] += 1

    @torch.no_grad()
    def add_factors(self, key: str, grad_y: torch.Tensor, x: torch.Tensor) -> None:
        """Fold the slice G = grad_y^T x of one linear call (grad_y: rows x out, x: rows x in)."""
        with self._exact():
            self._add_factors(key, grad_y, x)

    def _add_factors(self, key: str, grad_y: torch.Tensor, x: torch.Tensor) -> None:
        g = grad_y.detach().reshape(-1, grad_y.shape[-1]).to(device=self.device, dtype=self.dtype)
        x = x.detach().reshape(-1, x.shape[-1]).to(device=self.device, dtype=self.dtype)
        _, g, x = drop_zero_rows(g, x)
        (n, d_out), d_in = g.shape, x.shape[1]
        gram_out, gram_in = self._grams(key, d_out, d_in)
        self.counts[key] += 1
        if n == 0:
            return
        direct_out, direct_in = gram_macs(n, d_in, d_out)
        if direct_out or direct_in:
            weight_grad = g.t() @ x
        if direct_out:
            add_symmetric_product(gram_out, weight_grad, weight_grad.t())
        else:
            self._add_thin(key, "out", g.t(), (x @ x.t()) @ g)
        if direct_in:
            add_symmetric_product(gram_in, weight_grad.t(), weight_grad)
        else:
            self._add_thin(key, "in", x.t(), (g @ g.t()) @ x)


def add_symmetric_product(c: torch.Tensor, a: torch.Tensor, b: torch.Tensor, blocks: int = 8) -> None:
    """``c += a @ b`` for a product known to be symmetric, computed on the upper triangle only.

    Rows are taken in ``blocks`` slabs and each slab multiplies only the columns from its diagonal on,
    which saves up to ``(blocks - 1) / (2 blocks)`` of the multiply-adds (a SYRK-like update written
    with plain matmuls, so it runs on any device). The strictly lower triangle of ``c`` is left stale:
    read the result with ``upper_symmetric`` or an ``eigh(..., UPLO="U")``. Small matrices (fewer than
    1024 rows) are updated in full.
    """
    n = c.shape[0]
    if n < 1024:
        c.addmm_(a, b)
        return
    step = -(-n // blocks)
    for start in range(0, n, step):
        stop = min(n, start + step)
        c[start:stop, start:].addmm_(a[start:stop], b[:, start:])


def upper_symmetric(c: torch.Tensor) -> torch.Tensor:
    """The symmetric matrix whose upper triangle is ``c``'s (see :func:`add_symmetric_product`)."""
    upper = c.triu()
    return upper + upper.triu(1).t()


def gram_macs(n_rows: int, d_in: int, d_out: int) -> tuple[bool, bool]:
    """Whether to build ``G G^T`` / ``G^T G`` from G = g^T x (True) or in factored form (False).

    From G: ``n d_in d_out`` to form it (once, shared) + ``d_out^2 d_in`` / ``d_in^2 d_out``.
    Factored: ``n^2 d_in + n^2 d_out + d_out^2 n`` for ``g^T (x x^T) g`` (the small n x n products
    included), ``n^2 d_out + n^2 d_in + d_in^2 n`` for ``x^T (g g^T) x``. Each Gram takes its cheaper
    route; the product G is charged to the direct route of whichever Grams use it.
    """
    small = n_rows * n_rows * (d_in + d_out)
    factored_out, factored_in = small + d_out * d_out * n_rows, small + d_in * d_in * n_rows
    form = n_rows * d_in * d_out
    direct_out, direct_in = d_out * d_out * d_in, d_in * d_in * d_out
    options = {
        (True, True): form + direct_out + direct_in,
        (True, False): form + direct_out + factored_in,
        (False, True): form + factored_out + direct_in,
        (False, False): factored_out + factored_in,
    }
    return min(options, key=options.get)


class GramTap(torch.autograd.Function):
    """Identity on a linear's output whose backward folds (dL/dY, X) into the accumulator.

    ``anchor`` (a scalar that requires grad) makes the output require grad while every parameter is
    frozen, so the backward pass runs and reaches every tap without computing any weight gradient.
    """

    @staticmethod
    def forward(ctx, y, x, anchor, accumulator, key):
        ctx.save_for_backward(x)
        ctx.accumulator, ctx.key = accumulator, key
        return y.view_as(y)

    @staticmethod
    def backward(ctx, grad_y):
        (x,) = ctx.saved_tensors
        ctx.accumulator.add_factors(ctx.key, grad_y, x)
        return grad_y, None, None, None, None
