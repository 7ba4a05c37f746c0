"""Data parallelism at a sparse method's cost: each process keeps its own top-k, only those entries travel.

Under gradient accumulation the paper's rule (``topk_at="backward"``) keeps the top-k of every
micro-batch's backward pass and sums them in the step. N data-parallel processes are N micro-batches
run side by side, so the same rule needs, per sparse weight and optimizer step, only the entries each
process kept::

    g = (1 / N) * sum_{processes p} sum_{micro-batches a of p} topk_k(dL_{p,a} / dW~)

(up to k x N x micro-batches coordinates; the 1/N is DistributedDataParallel's own averaging of the
dense gradients, so the whole model is stepped with one convention). It equals one process that
accumulates the same N x micro-batches, each loss divided by N.

How it runs:

* :func:`prepare_data_parallel` (called by :func:`sparsegrad.apply_method` on the model it returns)
  keeps the sparse weights of ``topk_at="backward"`` layers, and the layers' buffers (basis,
  updated-coordinate bits, cached weights), out of DistributedDataParallel: DDP cannot all-reduce a
  sparse gradient (on NCCL not at all), and every replica computes those buffers itself, so DDP
  neither buckets nor broadcasts them. Everything else (non-MLP parameters, biases, the head) goes
  through DDP as usual.
* :class:`SparseGradientExchange` (held by :func:`sparsegrad.build_optimizer`'s optimizer) runs where
  DDP all-reduces the dense gradients: at the end of a backward pass whose forward ran inside a
  synchronising DDP forward (not under ``no_sync()``, which gradient accumulation in accelerate and
  Trainer uses for all but the last micro-batch), so any clipping that follows sees the summed step;
  without DDP, at :func:`sparsegrad.clip_grad_norm` or the optimizer step, whichever comes first. It
  runs one all-gather of the entry counts (8 bytes per sparse weight), then one all-gather of every
  process's flat indices (int32 below 2^31 entries) and values, each weight padded to the largest
  count of any process so that every process sends the same number of bytes. Every process then
  sums the same concatenation in the same order, so the coalesced sparse step is bit-identical on
  every process, and the gradient norm that clipping sees too.
* At its first exchange it compares, across processes, each layer's budget k, shape and checksums of
  what DDP no longer synchronises (the sparse weight, the basis and the other buffers), and refuses
  with the layer named if they differ.
* Every collective runs under a timeout (the process group's, or ``build_optimizer(...,
  exchange_timeout=seconds)``); a process that never sends its entries (killed, stalled) ends the
  step on the others with :class:`SparseExchangeError`, which names the collective and the timeout.

Bytes one process puts into the collectives per step (:func:`exchange_message_bytes`, the same
function that sizes the messages): ``8 L + sum_l n_l (b_index + b_value)`` for L sparse weights with
at most n_l entries on any process (n_l = k without accumulation): 8 bytes per entry for float32
values and int32 indices.
"""

from __future__ import annotations

import time
import weakref
from collections.abc import Iterable, Sequence
from datetime import timedelta

import torch
from torch import nn

from sparsegrad.kernels import mark_bits
from sparsegrad.registry import swapped_modules

__all__ = ["SparseExchangeError", "SparseGradientExchange", "backward_topk_layers", "exchange_message_bytes",
           "exchange_pending", "index_dtype", "prepare_data_parallel"]  # fmt: skip

COUNT_BYTES = 8  # one int64 entry count per sparse weight and process
_IGNORED_ATTR = "_sparsegrad_ddp_ignored"  # the names prepare_data_parallel added (merge removes them)


def index_dtype(numel: int) -> torch.dtype:
    """Dtype of a flat coordinate into a weight of ``numel`` entries on the wire: int32 below 2^31."""
    return torch.int32 if numel < 2**31 else torch.int64


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty(0, dtype=dtype).element_size()


def exchange_message_bytes(counts: Sequence[int], numels: Sequence[int], value_dtype=torch.float32) -> int:
    """Bytes one process puts into the exchange of one step: the count header (8 bytes per weight) and,
    per weight, ``counts[l]`` entries (the largest count of any process: the padded length) of a flat
    index (int32 for a weight of fewer than 2^31 entries, else int64) and a value of ``value_dtype``
    (one dtype, or one per weight). Each process receives N times as much.
    :class:`SparseGradientExchange` sizes its messages with the same rule."""
    if len(counts) != len(numels):
        raise ValueError(f"{len(counts)} counts for {len(numels)} weights")
    dtypes = [value_dtype] * len(counts) if isinstance(value_dtype, torch.dtype) else list(value_dtype)
    return COUNT_BYTES * len(counts) + sum(int(c) * (_itemsize(index_dtype(int(n))) + _itemsize(d))
                                           for c, n, d in zip(counts, numels, dtypes))  # fmt: skip


def backward_topk_layers(model: nn.Module) -> list[tuple[str, nn.Module, torch.Tensor]]:
    """``(name, layer, sparse weight)`` for every swapped layer that takes its top-k in the backward pass
    (``topk_at="backward"``) and hands the optimizer a sparse COO gradient."""
    out = []
    for name, module, method in swapped_modules(model):
        param = method.sparse_parameter(module)
        if param is not None and getattr(module, "topk_at", "backward") == "backward":
            out.append((name, module, param))
    return out


def prepare_data_parallel(model: nn.Module) -> nn.Module:
    """Keep the sparse weights of ``topk_at="backward"`` layers and those layers' buffers out of
    DistributedDataParallel; returns ``model``.

    ``model`` is the module you wrap (``DistributedDataParallel(model)``, ``accelerator.prepare(model)``,
    Trainer's model): DDP reads the names relative to it. :func:`sparsegrad.apply_method` calls this on
    the model it returns; call it yourself only when you wrap another module (one that contains the
    model), before wrapping. Names already listed by you (``_ddp_params_and_buffers_to_ignore``) stay.
    """
    from torch.nn.parallel import DistributedDataParallel

    names = set()
    for name, layer, param in backward_topk_layers(model):
        prefix = f"{name}." if name else ""
        names.update(prefix + n for n, p in layer.named_parameters(recurse=False) if p is param)
        names.update(prefix + n for n in layer._buffers)
    previous = set(getattr(model, _IGNORED_ATTR, ()))
    if not names and not previous:
        return model
    user = set(getattr(model, "_ddp_params_and_buffers_to_ignore", ())) - previous
    DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, sorted(user | names))
    setattr(model, _IGNORED_ATTR, sorted(names))
    return model


def release_data_parallel(model: nn.Module) -> None:
    """Undo :func:`prepare_data_parallel` (``merge`` calls it: the merged ``nn.Linear`` weights carry
    the same names and must go through DDP again)."""
    ours = set(getattr(model, _IGNORED_ATTR, ()))
    if not ours:
        return
    remaining = [n for n in getattr(model, "_ddp_params_and_buffers_to_ignore", ()) if n not in ours]
    if remaining:
        model._ddp_params_and_buffers_to_ignore = remaining
    elif hasattr(model, "_ddp_params_and_buffers_to_ignore"):
        del model._ddp_params_and_buffers_to_ignore
    delattr(model, _IGNORED_ATTR)


class SparseExchangeError(RuntimeError):
    """A collective of the sparse gradient exchange failed or timed out, or the processes disagree."""


def _world(group=None) -> int:
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()):
        return 1
    return dist.get_world_size(group)


def _group_timeout(group, device: torch.device) -> timedelta | None:
    try:  # private API: only used to name the timeout in an error message
        group = group or torch.distributed.group.WORLD
        return group._get_backend(device).options._timeout
    except Exception:  # noqa: BLE001
        return None


def _checksum(tensor: torch.Tensor) -> list[tuple[float, float]]:
    """Position-sensitive float64 checksums of a tensor, each with a bound on its magnitude: the sum,
    the row-weighted and the column-weighted sums (a transposed or permuted basis changes them),
    computed without a float64 copy of the tensor."""
    t = tensor.detach()
    t2 = t.reshape(t.shape[0], -1) if t.dim() >= 2 else t.reshape(1, -1)
    rows = t2.sum(1, dtype=torch.float64)
    cols = t2.sum(0, dtype=torch.float64)
    row_w = torch.arange(1, rows.numel() + 1, dtype=torch.float64, device=t.device)
    col_w = torch.arange(1, cols.numel() + 1, dtype=torch.float64, device=t.device)
    l1 = float(torch.linalg.vector_norm(t2, 1, dtype=torch.float64))
    return [(float(rows.sum()), l1), (float(rows @ row_w), l1 * rows.numel()), (float(cols @ col_w), l1 * cols.numel())]


# Checksums of the same tensor on two processes differ only by the order of float64 additions.
CHECKSUM_RTOL = 1e-9


class SparseGradientExchange:
    """Sums the local sparse gradients of ``topk_at="backward"`` layers over the data-parallel processes
    (see the module doc). Built by :func:`sparsegrad.build_optimizer`; runs at the end of a backward
    pass that DDP synchronises, else when the optimizer's ``step`` or :func:`sparsegrad.clip_grad_norm`
    calls it, whichever comes first (later calls until the next backward pass do nothing). In one
    process it does nothing.

    ``layers``: ``(name, layer, sparse weight)`` as :func:`backward_topk_layers` gives them, in the same
    order on every process. ``timeout``: seconds for each collective on a process group of its own
    (created at the first exchange), or None for the default group and its timeout.

    After an exchange: ``last_counts`` (entries per weight, the largest of any process),
    ``last_bytes_sent`` (what this process put into the collectives: :func:`exchange_message_bytes`),
    ``last_bytes_received`` and ``steps`` (exchanges done).
    """

    def __init__(self, layers: Iterable[tuple[str, nn.Module, torch.Tensor]], timeout: float | None = None) -> None:
        self.layers = list(layers)
        if timeout is not None and not timeout > 0:
            raise ValueError(f"exchange_timeout must be > 0 seconds (or None: the process group's), got {timeout!r}")
        self.timeout = timeout
        self._group = None
        self._checked = False
        self._pending = False
        self._sync_after_backward = False  # a forward ran inside a synchronising DDP forward
        self._callback_queued = False
        self.steps = 0
        self.last_counts: list[int] = []
        self.last_bytes_sent = 0
        self.last_bytes_received = 0
        ref = weakref.ref(self)

        def note_backward(_param) -> None:
            exchange = ref()
            if exchange is None:
                return
            exchange._pending = True
            if exchange._sync_after_backward and not exchange._callback_queued:
                # run once this backward pass has accumulated every gradient, as DDP finalises its own
                exchange._callback_queued = True
                torch.autograd.Variable._execution_engine.queue_callback(exchange._at_backward_end)

        for _, _, param in self.layers:
            param.register_post_accumulate_grad_hook(note_backward)
            param._sparsegrad_exchange = ref

    @property
    def pending(self) -> bool:
        """Whether a backward pass added local entries since the last exchange."""
        return self._pending

    def sync_after_backward(self) -> None:
        """Exchange at the end of the coming backward pass: a layer's forward ran inside a
        DistributedDataParallel forward that synchronises (not under ``no_sync()``), so the dense
        gradients are all-reduced in that backward pass and the sparse ones follow them; clipping of
        any kind (Trainer's, accelerate's, torch's) then sees the summed step."""
        self._sync_after_backward = True

    def _at_backward_end(self) -> None:
        self._callback_queued = False
        self._sync_after_backward = False
        self()

    # ----------------------------------------------------------------------------------- collectives
    def _process_group(self):
        if self.timeout is not None and self._group is None:
            # created under the default timeout (the processes may reach their first exchange seconds
            # apart), then held to the exchange's own
            group = torch.distributed.new_group()
            try:
                torch.distributed.distributed_c10d._set_pg_timeout(timedelta(seconds=self.timeout), group)
            except (AttributeError, RuntimeError, ValueError):  # a torch without it: a group made with it
                group = torch.distributed.new_group(timeout=timedelta(seconds=self.timeout))
            self._group = group
        return self._group

    def _collective(self, what: str, run, device: torch.device):
        started = time.monotonic()
        try:
            return run()
        except SparseExchangeError:
            raise
        except Exception as exc:  # gloo/NCCL raise RuntimeError subclasses (DistBackendError, ...)
            raise SparseExchangeError(self._failure(what, exc, time.monotonic() - started, device)) from exc

    def _failure(self, what: str, exc: Exception, waited: float, device: torch.device) -> str:
        dist = torch.distributed
        timeout = _group_timeout(self._group, device)
        shown = f"{timeout.total_seconds():g} s" if timeout is not None else "the process group's timeout"
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        return (
            f"the sparse gradient exchange ({what}, exchange {self.steps + 1}, {len(self.layers)} sparse "
            f"weight(s)) failed on rank {dist.get_rank()} of {dist.get_world_size()} after {waited:.1f} s "
            f"(collective timeout {shown}): {first}. Another process did not send its entries: it died, "
            "stalled or skipped this step (every process must run the same backward passes and optimizer "
            "steps). Set the timeout with "
            "sparsegrad.build_optimizer(..., exchange_timeout=seconds), or for the whole process group with "
            "torch.distributed.init_process_group(timeout=timedelta(...)), accelerate's "
            "InitProcessGroupKwargs(timeout=...) or TrainingArguments(ddp_timeout=seconds)."
        )

    # ------------------------------------------------------------------------------------ the check
    def _fingerprint(self) -> list[tuple]:
        out = []
        for name, layer, param in self.layers:
            sums = {}
            # what DDP no longer broadcasts for this layer: its sparse weight and its buffers
            own = [(n, p) for n, p in layer.named_parameters(recurse=False) if p is param]
            for tname, t in own + list(layer.named_buffers(recurse=False)):
                if t is not None and t.is_floating_point() and t.numel():
                    sums[tname] = _checksum(t)
            out.append((name, int(getattr(layer, "k", 0)), tuple(param.shape), sums))
        return out

    def _check_same_everywhere(self, group, device: torch.device) -> None:
        """First exchange: every process holds the same k, shapes, bases and trained matrices."""
        dist = torch.distributed
        gathered = [None] * dist.get_world_size(group)
        self._collective("all_gather_object of the layers' k and basis checksums",
                         lambda: dist.all_gather_object(gathered, self._fingerprint(), group=group), device)  # fmt: skip
        mine = gathered[0]
        for rank, theirs in enumerate(gathered[1:], start=1):
            problem = _first_difference(mine, theirs, rank)
            if problem:
                raise SparseExchangeError(
                    f"data-parallel training with per-backward top-k (topk_at='backward') needs the same model on "
                    f"every process, but {problem}. Apply the method with the same k on every process and "
                    "estimate the transition basis on the same batches on every process (or estimate it on "
                    "rank 0, save it and load the same file everywhere); start every process from the same "
                    "weights. Or use topk_at='step', where DistributedDataParallel broadcasts rank 0's "
                    "weights and buffers."
                )
        self._checked = True

    # ------------------------------------------------------------------------------------- exchange
    @torch.no_grad()
    def __call__(self) -> bool:
        """Exchange if a backward pass added local entries since the last call; True if it did."""
        if not self._pending:
            return False
        if _world() <= 1 or not self.layers:
            self._pending = False
            return False
        device = self.layers[0][2].device
        group = self._collective("new_group for the exchange", self._process_group, device)
        if not self._checked:
            self._check_same_everywhere(group, device)
        self._exchange(group, device)  # on an error the local gradients stay as they are, still pending
        self._pending = False
        self.steps += 1
        return True

    def _exchange(self, group, device: torch.device) -> None:
        dist = torch.distributed
        world = dist.get_world_size(group)
        local = [self._local_entries(param) for _, _, param in self.layers]
        counts = torch.tensor([len(flat) for flat, _ in local], dtype=torch.int64, device=device)
        all_counts = torch.empty(world * len(local), dtype=torch.int64, device=device)
        self._collective("all_gather of the entry counts",
                         lambda: dist.all_gather_single(all_counts, counts, group=group), device)  # fmt: skip
        all_counts = all_counts.view(world, len(local)).cpu()
        padded = all_counts.max(0).values.tolist()
        numels = [param.numel() for _, _, param in self.layers]
        send = torch.cat([self._pack(flat, values, n, numel) for (flat, values), n, numel in zip(local, padded, numels)])
        received = torch.empty(world * send.numel(), dtype=torch.uint8, device=device)
        self._collective("all_gather of the COO indices and values",
                         lambda: dist.all_gather_single(received, send, group=group), device)  # fmt: skip
        received = received.view(world, send.numel())
        offset = 0
        for i, ((_, layer, param), (_, values), n, numel) in enumerate(zip(self.layers, local, padded, numels)):
            idx_t, val_t = index_dtype(numel), values.dtype
            idx_bytes, val_bytes = n * _itemsize(idx_t), n * _itemsize(val_t)
            flats, vals = [], []
            for rank in range(world):
                c = int(all_counts[rank, i])
                block = received[rank, offset : offset + idx_bytes + val_bytes]
                flats.append(block[:idx_bytes].clone().view(idx_t)[:c].long())
                vals.append(block[idx_bytes:].clone().view(val_t)[:c])
            offset += idx_bytes + val_bytes
            self._set_gradient(layer, param, torch.cat(flats), torch.cat(vals), world)
        self.last_counts = padded
        self.last_bytes_sent = exchange_message_bytes(padded, numels, [values.dtype for _, values in local])
        assert self.last_bytes_sent == counts.numel() * counts.element_size() + send.numel()
        self.last_bytes_received = world * self.last_bytes_sent

    @staticmethod
    def _local_entries(param: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """This process's (flat indices, values) of ``param``'s gradient, coalesced (empty if none)."""
        grad = param.grad
        if grad is None:
            return torch.empty(0, dtype=torch.long, device=param.device), torch.empty(0, dtype=param.dtype, device=param.device)
        grad = (grad if grad.is_sparse else grad.to_sparse()).coalesce()
        idx = grad.indices()
        flat = torch.zeros(idx.shape[1], dtype=torch.long, device=idx.device)
        for dim, size in enumerate(param.shape):
            flat = flat * size + idx[dim]
        return flat, grad.values()

    @staticmethod
    def _pack(flat: torch.Tensor, values: torch.Tensor, n: int, numel: int) -> torch.Tensor:
        """``n`` flat indices then ``n`` values as bytes, zero-padded past this process's entries."""
        idx = torch.zeros(n, dtype=index_dtype(numel), device=flat.device)
        idx[: flat.numel()] = flat
        val = torch.zeros(n, dtype=values.dtype, device=values.device)
        val[: values.numel()] = values
        return torch.cat([idx.view(torch.uint8), val.view(torch.uint8)])

    @staticmethod
    def _set_gradient(layer: nn.Module, param: torch.Tensor, flat: torch.Tensor, values: torch.Tensor, world: int) -> None:
        """``param.grad`` = the coalesced sum of every process's entries / world (as DDP averages)."""
        index = torch.stack(torch.unravel_index(flat, tuple(param.shape)))
        summed = torch.sparse_coo_tensor(index, values, param.shape, check_invariants=False).coalesce()
        param.grad = torch.sparse_coo_tensor(summed.indices(), summed.values() / world, param.shape,
                                             is_coalesced=True, check_invariants=False)  # fmt: skip
        bits = getattr(layer, "updated_mask", None)
        if bits is not None and summed._nnz():
            # every process now steps the union of the processes' coordinates: record them all
            mark_bits(bits, flat)


def _first_difference(mine: list[tuple], theirs: list[tuple], rank: int) -> str | None:
    if len(mine) != len(theirs):
        return f"rank 0 has {len(mine)} sparse layer(s) and rank {rank} has {len(theirs)}"
    for (name, k, shape, sums), (name_r, k_r, shape_r, sums_r) in zip(mine, theirs):
        if name != name_r:
            return f"rank 0's sparse layers are named {name!r}... and rank {rank}'s {name_r!r}..."
        if k != k_r:
            return f"layer {name!r} keeps k={k} entries per backward pass on rank 0 and k={k_r} on rank {rank}"
        if shape != shape_r or sums.keys() != sums_r.keys():
            return f"layer {name!r} has different shapes or tensors on rank 0 and rank {rank}"
        for tname, a in sums.items():
            b = sums_r[tname]
            if any(abs(x - y) > CHECKSUM_RTOL * max(bx, by, 1e-300) for (x, bx), (y, by) in zip(a, b)):
                what = "transition basis" if tname.startswith("u_") else "trained matrix or its cached copy"
                return (f"layer {name!r} has a different {what} ({tname}) on rank 0 and rank {rank} "
                        f"(checksums {a[0][0]:.9g} vs {b[0][0]:.9g})")  # fmt: skip
    return None


def exchange_pending(params: Iterable[torch.Tensor]) -> None:
    """Run the exchange of every :class:`SparseGradientExchange` that ``params`` belong to (clipping
    calls this first, so that the norm is that of the summed step, the same on every process)."""
    seen = set()
    for p in params:
        ref = getattr(p, "_sparsegrad_exchange", None)
        exchange = ref() if ref is not None else None
        if exchange is not None and id(exchange) not in seen:
            seen.add(id(exchange))
            exchange()
