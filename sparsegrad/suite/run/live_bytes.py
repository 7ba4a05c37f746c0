"""Live tensor bytes on CPU: the analogue of the CUDA allocator's ``memory_allocated`` / ``max_memory_allocated``.

PyTorch keeps no count of the CPU memory its tensors hold, and the process's resident set size counts
what the C allocator keeps cached after a tensor is freed, so a phase that freed a lot inflates the
next phase's figure. :class:`LiveTensorBytes` is a ``TorchDispatchMode``: it sees the output of every
tensor operation run while it is entered, counts the bytes of each storage it has not seen before
(views share their base's storage and count once) and subtracts them when that storage is freed (a
weak reference's callback; PyTorch keeps a storage's Python object alive exactly as long as the
storage). Its peak restarts at :meth:`LiveTensorBytes.reset_peak`, as ``reset_peak_memory_stats`` does.

Not seen: a kernel's internal scratch space that is never handed out as a tensor (the CUDA allocator
counts it), and memory outside tensors (Python objects, NumPy arrays). Cost: about 30 µs of Python per
operation, which is why :class:`sparsegrad.suite.run.measure.MemoryMeter` measures only some training
steps.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Iterable, Iterator

import torch
from torch.utils._python_dispatch import TorchDispatchMode


class _StorageRef(weakref.ref):
    """A weak reference to one storage that remembers its key and how many bytes it was counted with."""

    __slots__ = ("key", "nbytes")


class LiveTensorBytes(TorchDispatchMode):
    """Bytes of the CPU tensor storages alive, and their peak since :meth:`reset_peak` (see the module docstring).

    ``with gauge:`` counts every storage a tensor operation returns; storages made while the gauge is not
    entered are counted only when :meth:`adopt` is handed a tensor on them. Each storage counts once
    (views share it) and stops counting when it is freed, entered or not."""

    def __init__(self):
        super().__init__()
        self._refs: dict[int, _StorageRef] = {}
        self._lock = threading.RLock()  # frees may be noticed on another thread
        self._strided = torch.strided
        self.live = 0
        self.peak = 0

    # ------------------------------------------------------------------ counting
    def _freed(self, ref: _StorageRef) -> None:
        with self._lock:
            if self._refs.get(ref.key) is ref:
                del self._refs[ref.key]
                self.live -= ref.nbytes

    def _count_storage(self, storage, recheck: bool) -> None:
        key = id(storage)
        ref = self._refs.get(key)
        if ref is not None:
            if recheck and ref.nbytes != storage.nbytes():  # resized in place (an out= operation)
                with self._lock:
                    self.live += storage.nbytes() - ref.nbytes
                    ref.nbytes = storage.nbytes()
                    self.peak = max(self.peak, self.live)
            return
        ref = _StorageRef(storage, self._freed)
        ref.key, ref.nbytes = key, int(storage.nbytes())
        with self._lock:
            self._refs[key] = ref
            self.live += ref.nbytes
            if self.live > self.peak:
                self.peak = self.live

    def _count(self, obj, recheck: bool = False) -> None:
        if isinstance(obj, torch.Tensor):
            if not obj.is_cpu:
                return
            if obj.layout is self._strided:
                try:
                    self._count_storage(obj.untyped_storage(), recheck)
                except (NotImplementedError, RuntimeError):  # a subclass without a storage of its own
                    pass
            elif obj.layout is torch.sparse_coo:
                self._count(obj._indices(), recheck)
                self._count(obj._values(), recheck)
            elif obj.layout is torch.sparse_csr:
                for part in (obj.crow_indices(), obj.col_indices(), obj.values()):
                    self._count(part, recheck)
        elif isinstance(obj, (tuple, list)):
            for item in obj:
                self._count(item, recheck)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self._count(out, func._overloadname == "out" or func.__name__.startswith("resize"))
        return out

    # ------------------------------------------------------------------ interface
    def adopt(self, tensors: Iterable) -> None:
        """Count the storages of ``tensors`` that are not counted yet (tensors made outside the gauge)."""
        for t in tensors:
            self._count(t)

    def reset_peak(self) -> None:
        with self._lock:
            self.peak = self.live

    def forget(self) -> None:
        """Stop following every storage (their frees no longer reach this gauge)."""
        with self._lock:
            self._refs.clear()
            self.live = self.peak = 0


def tensors_of(*objects) -> Iterator[torch.Tensor]:
    """The tensors that models and optimizers hold: parameters, their gradients, buffers; optimizer state
    (nested dicts and lists) and tensors kept in an optimizer's attributes (master copies)."""
    seen: set[int] = set()

    def walk(obj, depth: int):
        if depth > 6 or obj is None or id(obj) in seen:
            return
        if isinstance(obj, torch.Tensor):
            yield obj
            if obj.is_leaf and obj.requires_grad and obj.grad is not None:
                yield obj.grad
            return
        seen.add(id(obj))
        if isinstance(obj, torch.nn.Module):
            for p in obj.parameters():
                yield from walk(p, depth + 1)
            yield from (b for b in obj.buffers() if b is not None)
        elif isinstance(obj, torch.optim.Optimizer):
            for state in obj.state.values():
                yield from walk(state, depth + 1)
            for name, value in vars(obj).items():
                if name not in ("state", "param_groups", "defaults"):
                    yield from walk(value, depth + 1)
        elif isinstance(obj, dict):
            for value in obj.values():
                yield from walk(value, depth + 1)
        elif isinstance(obj, (list, tuple)):
            for value in obj:
                yield from walk(value, depth + 1)

    for obj in objects:
        yield from walk(obj, 0)
