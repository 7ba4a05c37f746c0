"""The preliminary phase (paper §3.1): gradient statistics -> orthogonal transition matrices.

For a group of linears (all "up" MLP matrices of a model, or all "down" ones) the paper stacks the
weight gradients ``G_1 ... G_N`` (each out x in; N = steps x layers in the group) into a 3-way tensor
and takes its HOSVD. The mode factors of the output and input dimensions are the left singular
vectors of the mode unfoldings, i.e. the eigenvectors of their Gram matrices::

    u_out = eigvecs( sum_n G_n G_n^T )   (out x out)        u_in = eigvecs( sum_n G_n^T G_n )   (in x in)

so the stacked tensor is never materialised: each gradient is folded into the two Gram matrices and
dropped. Eigenvalues are sorted in descending order, so leading columns carry the most gradient energy;
the sign of every column is fixed (its largest-magnitude entry is positive) so the result is
deterministic. Up to column signs this equals tensorly's HOSVD (``tucker``/``partial_tucker`` with
``n_iter_max=0``; for full ranks HOOI cannot change the factors). The mode factor of the stacking
dimension is never needed and never computed.

Unlike the authors' code the preliminary phase changes no weight: no optimizer step is taken (their 11
AdamW steps of full fine-tuning leak into the run), and the model's ``requires_grad`` flags, ``.grad``
tensors and train/eval mode are restored afterwards.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from sparsegrad.kernels import column_major_layout
from sparsegrad.methods.sparsegrad.gram import (  # noqa: F401 (re-exported)
    GramAccumulator,
    GramTap,
    add_symmetric_product,
    gram_macs,
    upper_symmetric,
)
from sparsegrad.targets import Target, find_targets

# The Gram accumulation lives in :mod:`sparsegrad.methods.sparsegrad.gram`; its names stay importable from here.
_GramAccumulator = GramAccumulator

__all__ = [
    "GroupBasis", "Basis", "estimate_basis", "eigenbasis", "resolve_targets", "random_basis",
    "spectrum_concentration",
]


@dataclass
class GroupBasis:
    """Transition matrices of one group (or one layer): ``u_in`` (in x in), ``u_out`` (out x out).

    ``eig_in`` / ``eig_out``: eigenvalues of the Gram matrices (descending) — the gradient energy
    along each basis direction. Unpacks as ``u_in, u_out = group_basis``.
    """

    u_in: torch.Tensor
    u_out: torch.Tensor
    eig_in: torch.Tensor
    eig_out: torch.Tensor
    n_gradients: int

    def __iter__(self):
        return iter((self.u_in, self.u_out))


@dataclass
class Basis:
    """Result of :func:`estimate_basis`: one :class:`GroupBasis` per group (or per layer).

    ``layer_keys`` maps every target's module name to its key in ``groups`` (its group name, or its
    own name when ``per_layer``).
    """

    groups: dict[str, GroupBasis]
    layer_keys: dict[str, str]
    per_layer: bool = False
    stats: dict = field(default_factory=dict)

    def __getitem__(self, key: str) -> GroupBasis:
        return self.groups[key]

    def __contains__(self, key: str) -> bool:
        return key in self.groups

    def for_layer(self, name: str, group: str | None = None) -> GroupBasis:
        """The basis of the layer ``name`` (falls back to ``group`` for layers not seen at estimation)."""
        key = self.layer_keys.get(name, name if self.per_layer else group)
        if key not in self.groups:
            raise KeyError(
                f"no basis for layer {name!r} (group {group!r}); the basis holds {sorted(self.groups)}"
            )
        return self.groups[key]

    def state_dict(self) -> dict:
        return {
            "groups": {k: vars(g).copy() for k, g in self.groups.items()},
            "layer_keys": dict(self.layer_keys),
            "per_layer": self.per_layer,
            "stats": dict(self.stats),
        }

    @classmethod
    def from_state_dict(cls, state: Mapping) -> Basis:
        groups = {k: GroupBasis(**g) for k, g in state["groups"].items()}
        return cls(groups, dict(state["layer_keys"]), state["per_layer"], dict(state.get("stats", {})))

    def save(self, path) -> None:
        torch.save(self.state_dict(), path)

    @classmethod
    def load(cls, path, map_location="cpu") -> Basis:
        return cls.from_state_dict(torch.load(path, map_location=map_location, weights_only=True))


def eigenbasis(gram: torch.Tensor, dtype=torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigenvectors (columns) and eigenvalues of a symmetric PSD matrix, descending, signs fixed.

    Only the upper triangle of ``gram`` is read (the Grams are accumulated there).

    The sign of every column makes its largest-magnitude entry positive (the positive one on a tie).
    Memory: the matrix in ``dtype``, LAPACK's workspace and one reordered copy of the eigenvectors.
    The eigenvectors come back column-major (each column contiguous, as LAPACK writes them), the
    layout :meth:`SparseGradLinear.prepare_basis` wants, so layers built from them share their memory.
    """
    evals, evecs = torch.linalg.eigh(gram if gram.dtype == dtype else gram.to(dtype), UPLO="U")
    del gram  # the caller may have handed over its only reference: free it before the copy below
    evals = evals.flip(0)
    evecs = evecs.t().flip(0).t()  # descending columns, column-major (flip makes one contiguous copy)
    flip = evecs.amax(dim=0) < -evecs.amin(dim=0)
    evecs.mul_(torch.where(flip, -1.0, 1.0).to(evecs.dtype))
    return evecs, evals


def resolve_targets(
    model: nn.Module,
    targets=None,
    patterns: Mapping[str, str] | None = None,
    every_nth_block: int | None = None,
) -> list[Target]:
    """Normalise ``targets``: None (find by patterns), a list of :class:`Target`, a mapping
    name -> group, or a list of module names / a mapping name -> module (groups from the patterns)."""
    if targets is None:
        return find_targets(model, patterns, every_nth_block)
    if isinstance(targets, Mapping):
        from sparsegrad.targets import block_index

        if all(isinstance(v, str) for v in targets.values()):  # name -> group
            return [Target(name, group, block_index(name)) for name, group in targets.items()]
        targets = list(targets)  # name -> module: groups from the patterns, by name
    targets = list(targets)
    if all(isinstance(t, Target) for t in targets):
        return targets
    if all(isinstance(t, str) for t in targets):
        found = {t.name: t for t in find_targets(model, patterns, every_nth_block=None)}
        missing = [t for t in targets if t not in found]
        if missing:
            raise ValueError(f"target names {missing} are not MLP linears found by the patterns; found: "
                             f"{list(found)[:8]}")  # fmt: skip
        return [found[t] for t in targets]
    raise TypeError("targets must be None, a list of Target, a mapping name -> group, or a list of names")


def _to_device(batch, device):
    if isinstance(batch, Mapping):
        return {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in batch.items()}
    raise TypeError(f"each batch must be a dict fed as model(**batch), got {type(batch).__name__}")


_SEQUENCE_KEYS = ("input_ids", "attention_mask", "token_type_ids", "position_ids", "labels")


def _split_batch(batch: Mapping, size: int | None) -> list[Mapping]:
    """``batch`` cut into chunks of ``size`` rows (tensors whose first dimension is the batch's), each
    chunk trimmed of the trailing columns that its ``attention_mask`` marks as padding in every row.

    Trimming right padding changes no gradient of a real token (padding is masked out of attention and
    gets no loss); it only saves the compute and activations of the padded positions.
    """
    if not isinstance(batch, Mapping):
        raise TypeError(f"each batch must be a dict fed as model(**batch), got {type(batch).__name__}")
    if size is not None and (not isinstance(size, int) or size < 1):
        raise ValueError(f"micro_batch must be a positive int or None, got {size!r}")
    rows = [v.shape[0] for v in batch.values() if torch.is_tensor(v) and v.dim() > 0]
    if not rows:
        return [batch]
    n = max(rows)
    size = size or n
    chunks = [
        {k: (v[i : i + size] if torch.is_tensor(v) and v.dim() > 0 and v.shape[0] == n else v)
         for k, v in batch.items()}
        for i in range(0, n, size)
    ]  # fmt: skip
    return [_trim_right_padding(chunk) for chunk in chunks]


def _trim_right_padding(chunk: dict) -> dict:
    mask = chunk.get("attention_mask")
    if not torch.is_tensor(mask) or mask.dim() != 2 or mask.shape[1] == 0:
        return chunk
    used = mask.ne(0).any(dim=0).nonzero()
    width = int(used.max()) + 1 if used.numel() else mask.shape[1]
    if width == mask.shape[1]:
        return chunk
    shape = tuple(mask.shape)
    return {
        k: (v[:, :width] if k in _SEQUENCE_KEYS and torch.is_tensor(v) and tuple(v.shape[:2]) == shape else v)
        for k, v in chunk.items()
    }


def _loss_of(output) -> torch.Tensor:
    loss = getattr(output, "loss", None)
    if loss is None and isinstance(output, Mapping):
        loss = output.get("loss")
    if loss is None:
        raise ValueError("model(**batch) returned no .loss; include labels in the batches")
    return loss


def release_freed_memory() -> None:
    """Hand memory that has been freed back to the operating system (glibc ``malloc_trim``).

    Freed activations stay in the C heap otherwise and keep the process's resident memory at its
    high-water mark. A no-op where glibc is not the allocator.
    """
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.malloc_trim(0)
    except (OSError, AttributeError):
        pass


_LOW_PRECISION = (torch.bfloat16, torch.float16)


def _upcast_low_precision(model: nn.Module, dtype: torch.dtype | None) -> list[tuple[torch.Tensor, torch.dtype]]:
    """Cast every bf16/fp16 parameter and buffer of ``model`` to ``dtype`` in place (``.data`` is
    replaced, so the tensors keep their identity); returns what :func:`_restore_dtypes` needs.

    bf16 -> float32 -> bf16 (and fp16 -> float32 -> fp16) is exact, so the restored model is bit for
    bit the one given.
    """
    if dtype is None:
        return []
    changed = []
    with torch.no_grad():
        for tensor in [*model.parameters(), *model.buffers()]:
            if tensor.dtype in _LOW_PRECISION:
                changed.append((tensor, tensor.dtype))
                tensor.data = tensor.data.to(dtype)
    return changed


def _restore_dtypes(changed: list[tuple[torch.Tensor, torch.dtype]]) -> None:
    with torch.no_grad():
        for tensor, dtype in changed:
            tensor.data = tensor.data.to(dtype)


def estimate_basis(
    model: nn.Module,
    batches: Iterable[Mapping],
    targets=None,
    steps: int | None = None,
    *,
    patterns: Mapping[str, str] | None = None,
    every_nth_block: int | None = None,
    per_layer: bool = False,
    dtype: torch.dtype = torch.float32,
    eigh_dtype: torch.dtype | None = None,
    factor_dtype: torch.dtype = torch.float32,
    device: str | torch.device | None = None,
    train_mode: bool = True,
    micro_batch: int | None = None,
    pass_dtype: torch.dtype | None = torch.float32,
    progress: bool = False,
) -> Basis:
    """Transition matrices from ``steps`` backward passes, without changing any weight.

    Every parameter is frozen during the passes. For ``nn.Linear`` targets a tap on the output catches
    dL/dY in the backward pass and folds the slice ``G = (dL/dY)^T X`` into the two Gram matrices at
    once (:class:`~sparsegrad.methods.sparsegrad.gram.GramAccumulator`), so no weight gradient is ever computed or stored; other 2-D
    weights (not ``y = x W^T + b``) fall back to their weight gradient, folded and freed by a
    post-accumulate hook as soon as it exists. Either way at most one slice is alive at a time.
    One slice per call of a target (the MLP linears run once per forward pass).

    Args:
        model: a model whose ``model(**batch)`` returns an output with ``.loss``.
        batches: iterable of dicts (moved to the model's device). Consumed up to ``steps`` batches
            (all of them when ``steps`` is None).
        targets: see :func:`resolve_targets` (default: the MLP linears found by ``patterns`` /
            ``every_nth_block``).
        per_layer: one basis per layer instead of one per group (the paper shares one per group).
        dtype: precision of the Gram accumulation (float32 or float64).
        eigh_dtype: precision of the eigendecomposition; None: that of the Grams (``dtype``). A
            float32 eigh takes half the time and memory of a float64 one; the factors are returned in
            float32 by default anyway, and the layers' forward does not depend on the basis being
            exactly orthogonal. factor_dtype: dtype of the returned factors.
        device: where the Gram matrices live ("cpu", or None for the model's device).
        train_mode: run the passes in train mode (dropout on), as the authors' pre-phase does.
        micro_batch: split every batch into chunks of this many rows, one backward pass and one
            gradient slice per chunk (None: one per batch, as the paper). Trailing columns that are
            padding in every row of a chunk (``attention_mask``) are cut first. Peak memory is that of
            a chunk's activations; the held-out top-k energy of the basis is as good or slightly better
            with more, smaller slices (measured on MiniLM + movie sentences, see results/bench).
        pass_dtype: precision of the forward and backward passes of a bf16/fp16 model: its bf16/fp16
            parameters and buffers are cast to this dtype for the passes and cast back afterwards (exactly:
            the model comes back bit for bit). Folding (dL/dY, X) into float32 Grams is not enough: X and
            dL/dY themselves carry bf16 rounding from every layer they pass, which turns the eigenvectors
            of close eigenvalues (and of the Grams' null space when there are fewer gradient rows than
            dimensions) and moves the top-k coordinates. Tiny LLaMA, k = 0.22%, 10 steps at lr 9e-5, a
            basis from 10 batches, 3 batch seeds: a bf16 model with master copies kept 92-98% of its
            float32 run's update per layer with bf16 passes, 99.3-100.7% with float32 passes
            (``tests/method/test_numerics.py``).
            The cost: the parameters in float32 during the passes (twice a bf16 model's), and float32
            activations (``micro_batch`` bounds those). None: the passes in the model's own dtypes.
            A float32 or float64 model is never changed.
        progress: show a tqdm progress bar.

    Returns:
        :class:`Basis` keyed by group (or layer name), with ``stats`` = seconds, steps, number of
        gradients per key, dtypes.
    """
    if pass_dtype not in (None, torch.float32, torch.float64):
        raise ValueError(f"pass_dtype must be torch.float32, torch.float64 or None (the model's own dtypes), "
                         f"got {pass_dtype!r}")  # fmt: skip
    start = time.perf_counter()
    resolved = resolve_targets(model, targets, patterns, every_nth_block)
    modules = {t.name: model.get_submodule(t.name) for t in resolved}
    for name, module in modules.items():
        if not isinstance(getattr(module, "weight", None), torch.Tensor) or module.weight.dim() != 2:
            raise TypeError(f"target {name!r} is a {type(module).__name__} with no 2-D weight")
    keys = {t.name: (t.name if per_layer else t.group) for t in resolved}
    params = list(model.parameters())
    model_device = params[0].device
    acc = GramAccumulator(dtype, torch.device(device) if device is not None else model_device)
    anchor = torch.zeros((), device=model_device, requires_grad=True)

    def tap(key):
        def hook(module, args, output):
            return GramTap.apply(output, args[0], anchor, acc, key)

        return hook

    def fold(key):
        def hook(weight):
            acc.add_weight_grad(key, weight.grad)
            weight.grad = None

        return hook

    saved_flags = [p.requires_grad for p in params]
    saved_grads = [p.grad for p in params]
    was_training = model.training
    handles = []
    n_steps = 0
    upcast = []
    try:
        for p in params:
            p.requires_grad_(False)
            p.grad = None
        upcast = _upcast_low_precision(model, pass_dtype)
        for name, module in modules.items():
            if isinstance(module, nn.Linear):
                handles.append(module.register_forward_hook(tap(keys[name])))
            else:
                module.weight.requires_grad_(True)
                handles.append(module.weight.register_post_accumulate_grad_hook(fold(keys[name])))
        model.train(train_mode)
        iterator = iter(batches)
        bar = None
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=steps, desc="sparsegrad basis", unit="batch")
        with torch.enable_grad():
            while steps is None or n_steps < steps:
                try:
                    batch = next(iterator)
                except StopIteration:
                    break
                for chunk in _split_batch(batch, micro_batch):
                    loss = _loss_of(model(**_to_device(chunk, model_device)))
                    if loss.requires_grad:
                        loss.backward()
                    del loss
                n_steps += 1
                if bar is not None:
                    bar.update(1)
        if bar is not None:
            bar.close()
    finally:
        for handle in handles:
            handle.remove()
        _restore_dtypes(upcast)
        for p, flag, grad in zip(params, saved_flags, saved_grads):
            p.requires_grad_(flag)
            p.grad = grad
        model.train(was_training)
    acc.finish()
    if not acc.gram_out:
        raise ValueError("no gradient reached the target linears: batches was empty or steps=0")
    collected = time.perf_counter()
    if acc.device.type == "cpu":
        release_freed_memory()  # the passes' activations, before the eigendecompositions allocate
    eigh_dtype = eigh_dtype or dtype
    groups: dict[str, GroupBasis] = {}
    for key in list(acc.gram_out):
        with acc._exact():
            u_out, e_out = eigenbasis(acc.gram_out.pop(key), eigh_dtype)
            u_in, e_in = eigenbasis(acc.gram_in.pop(key), eigh_dtype)
        groups[key] = GroupBasis(
            u_in=column_major_layout(u_in.to(factor_dtype)), u_out=column_major_layout(u_out.to(factor_dtype)),
            eig_in=e_in.to(factor_dtype), eig_out=e_out.to(factor_dtype), n_gradients=acc.counts[key],
        )  # fmt: skip
    end = time.perf_counter()
    stats = {
        "seconds": end - start,
        "seconds_backward": collected - start,
        "seconds_eigh": end - collected,
        "steps": n_steps,
        "micro_batch": micro_batch,
        "n_gradients": dict(acc.counts),
        "dtype": str(dtype).removeprefix("torch."),
        "eigh_dtype": str(eigh_dtype).removeprefix("torch."),
        "device": str(acc.device),
        "pass_dtype": str(pass_dtype).removeprefix("torch.") if upcast else None,
    }
    return Basis(groups=groups, layer_keys=keys, per_layer=per_layer, stats=stats)


def random_basis(targets: Sequence[Target], model: nn.Module, seed: int = 0) -> Basis:
    """Random orthogonal transition matrices per group (for benchmarks and ablations, not training)."""
    gen = torch.Generator().manual_seed(seed)
    groups: dict[str, GroupBasis] = {}
    for t in targets:
        if t.group in groups:
            continue
        out_f, in_f = model.get_submodule(t.name).weight.shape
        mats = []
        for n in (in_f, out_f):
            q, r = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=torch.float64))
            mats.append((q * torch.sign(torch.diagonal(r))).float())
        ones_in, ones_out = torch.ones(in_f), torch.ones(out_f)
        groups[t.group] = GroupBasis(mats[0], mats[1], ones_in, ones_out, 0)
    return Basis(groups, {t.name: t.group for t in targets}, False, {"random": True, "seed": seed})


def spectrum_concentration(eigs: torch.Tensor, fraction: float = 0.01) -> float:
    """Share of the energy carried by the leading ``fraction`` of the directions."""
    n = max(1, math.ceil(fraction * eigs.numel()))
    total = eigs.clamp_min(0).sum()
    return float(eigs[:n].clamp_min(0).sum() / total) if total > 0 else 0.0
