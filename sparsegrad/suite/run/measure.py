"""Measuring a run: peak memory per phase, the environment a record must name.

Memory is gauged as the paper gauges it: the bytes of live tensors, per phase, never a figure that
an earlier phase can inflate. On CUDA that is the caching allocator's own count
(``torch.cuda.max_memory_allocated``, reset by ``reset_peak_memory_stats`` at every phase start). On
CPU, where PyTorch keeps no such count, :class:`LiveTensorBytes` keeps it: a dispatch mode that sees
the output of every tensor operation, adds the bytes of each storage it has not seen yet and subtracts
them when the storage is freed (a weak reference's callback). That is the CPU analogue of
``memory_allocated``: tensor bytes alive, whatever the C allocator keeps cached. The process's peak
resident set size (RSS) is still sampled beside it on CPU, for comparison only.

A phase is a ``with meter.phase(name)`` block; the same name may be entered many times and keeps the
maximum. At each measured entry the peak restarts from the bytes alive then, after the meter has
adopted the tensors of the objects it watches (:meth:`MemoryMeter.watch`: the model's parameters,
gradients and buffers, the optimizer's state), so tensors made between phases (the method's layers,
the optimizer) count too. Tensors that nothing watched holds and that were made outside a measured
phase are not counted (the best checkpoint's copy, kept off the device on CUDA as well).

The CPU gauge costs about 30 µs of Python per tensor operation, so the training loop measures only
some steps (:meth:`MemoryMeter.wants`): every step whose padded batch shape no step measured so far
covers (a step's allocations depend on its shapes and grow with them), plus the steps the caller
names (the trainer: every step that ends in an evaluation, which catches a slowly growing optimizer
state), and leaves those steps out of its throughput timing. A kernel's internal scratch space, never
handed out as a tensor, is not seen on CPU (the CUDA allocator counts it).
"""

from __future__ import annotations

import contextlib
import os
import platform
import subprocess
import sys
import threading
from collections.abc import Iterable
from importlib import metadata
from pathlib import Path

PACKAGES = ("torch", "transformers", "peft", "datasets", "tokenizers", "accelerate", "numpy", "scipy",
            "scikit-learn", "hydra-core", "omegaconf", "wandb", "optuna", "sparsegrad")

LIVE_GAUGE = "live_tensor_bytes"  # memory.gauge of a CPU record measured by LiveTensorBytes
CUDA_GAUGE = "cuda_max_memory_allocated"
RSS_GAUGE = "rss"  # what CPU records written before the live-bytes gauge hold in train_peak_bytes


def record_gauge(memory: dict | None) -> str | None:
    """Which gauge a record's ``memory`` section used: its ``gauge`` field, else (older records) read from
    the device: CUDA records always held the allocator's peak, CPU ones the peak RSS."""
    memory = memory or {}
    if memory.get("gauge"):
        return memory["gauge"]
    if memory.get("device_type") == "cuda" or str(memory.get("how", "")).startswith("torch.cuda"):
        return CUDA_GAUGE
    return RSS_GAUGE if memory.get("device_type") == "cpu" else None


def _dominated(shape: tuple, by: tuple) -> bool:
    return len(shape) == len(by) and all(a <= b for a, b in zip(shape, by))


class MemoryMeter:
    """Peak memory per phase: live tensor bytes (CUDA allocator, or :class:`LiveTensorBytes` on CPU) and, on
    CPU, the peak RSS beside it (sampled by a thread every ``interval_s``)."""

    def __init__(self, device, interval_s: float = 0.005):
        import torch

        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        self.interval_s = interval_s
        self.peaks: dict[str, int] = {}  # live tensor bytes
        self.rss_peaks: dict[str, int] = {}
        self.measured: dict[str, int] = {}  # phase -> measured entries
        self._shapes: dict[str, list[tuple]] = {}  # phase -> the shapes measured (CPU)
        self._watched: tuple = ()
        self._current: str | None = None
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = None
        self._process = None
        self._gauge = None
        if not self.cuda:
            import psutil

            from sparsegrad.suite.run.live_bytes import LiveTensorBytes

            self._process = psutil.Process(os.getpid())
            self._gauge = LiveTensorBytes()

    @property
    def gauge(self) -> str:
        return CUDA_GAUGE if self.cuda else LIVE_GAUGE

    @property
    def how(self) -> str:
        if self.cuda:
            return "torch.cuda.max_memory_allocated, reset at each phase start"
        return ("live tensor bytes (storages returned by tensor operations, counted until freed; a dispatch mode), "
                "peak per phase; training steps measured: each with a batch shape no measured step covered, and "
                "one per evaluation interval at least (left out of steps/s); peak process RSS (psutil, sampled "
                f"every {self.interval_s * 1000:g} ms) beside it")

    @property
    def intrusive(self) -> bool:
        """True when measuring slows the measured code (the CPU gauge): measured steps must not be timed."""
        return not self.cuda

    def watch(self, *objects) -> MemoryMeter:
        """The models and optimizers whose tensors count at every measured phase start (see the module docstring)."""
        self._watched = objects
        return self

    def _adopt(self) -> None:
        if self._gauge is not None:
            from sparsegrad.suite.run.live_bytes import tensors_of

            self._gauge.adopt(tensors_of(*self._watched))

    def current_bytes(self) -> int:
        """Live tensor bytes now (CPU: after adopting the watched objects' tensors)."""
        import torch

        if self.cuda:
            return int(torch.cuda.memory_allocated(self.device))
        self._adopt()
        return int(self._gauge.live)

    def current_rss(self) -> int | None:
        return None if self._process is None else int(self._process.memory_info().rss)

    def wants(self, name: str, shapes: Iterable[tuple]) -> bool:
        """Should the next entry of phase ``name``, running inputs of ``shapes`` (e.g. one (batch, length) per
        micro-batch), be measured? Always on CUDA; on CPU when a shape is not covered by (no larger in every
        dimension than) one measured before; the shapes then count as measured."""
        if self.cuda:
            return True
        shapes = [tuple(s) for s in shapes]
        done = self._shapes.setdefault(name, [])
        new = [s for s in shapes if not any(_dominated(s, d) for d in done)]
        for s in new:
            done[:] = [d for d in done if not _dominated(d, s)] + [s]
        return bool(new)

    def _note_rss(self, value: int) -> None:
        with self._lock:
            if self._current is not None:
                self.rss_peaks[self._current] = max(self.rss_peaks.get(self._current, 0), value)

    def _sample_forever(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self._note_rss(int(self._process.memory_info().rss))
            except Exception:  # the process is exiting
                return

    def start(self) -> MemoryMeter:
        if not self.cuda and self._thread is None:
            self._thread = threading.Thread(target=self._sample_forever, name="rss-sampler", daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=1.0)
            self._thread = None
        if self._gauge is not None:
            self._gauge.forget()

    @contextlib.contextmanager
    def phase(self, name: str, measure: bool = True):
        """Measure the block as (one more entry of) phase ``name``; ``measure=False`` on CPU: RSS only."""
        import torch

        if self._current is not None:
            raise RuntimeError(f"memory phase {name!r} entered inside phase {self._current!r}: phases do not nest")
        measure = measure or self.cuda
        if self.cuda:
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        elif measure:
            self._adopt()
            self._gauge.reset_peak()
        with self._lock:
            self._current = name
        if not self.cuda:
            self._note_rss(self.current_rss())
        try:
            with self._gauge if (measure and self._gauge is not None) else contextlib.nullcontext():
                yield self
        finally:
            if self.cuda:
                torch.cuda.synchronize(self.device)
                peak = int(torch.cuda.max_memory_allocated(self.device))
            else:
                self._note_rss(self.current_rss())
                peak = int(self._gauge.peak) if measure else None
            with self._lock:
                if peak is not None:
                    self.peaks[name] = max(self.peaks.get(name, 0), peak)
                    self.measured[name] = self.measured.get(name, 0) + 1
                self._current = None

    def peak(self, name: str) -> int | None:
        """Peak live tensor bytes of phase ``name`` over its measured entries (None: never measured)."""
        return self.peaks.get(name)

    def rss_peak(self, name: str) -> int | None:
        return self.rss_peaks.get(name)

    def summary(self, baseline_bytes: int | None, baseline_rss: int | None) -> dict:
        """The record's ``memory`` fields (besides device_type and how)."""
        rss = None
        if not self.cuda:
            rss = {"baseline_bytes": baseline_rss, "basis_peak_bytes": self.rss_peak("basis"),
                   "train_peak_bytes": self.rss_peak("train"), "eval_peak_bytes": self.rss_peak("eval")}
        return {"gauge": self.gauge, "baseline_bytes": baseline_bytes, "basis_peak_bytes": self.peak("basis"),
                "train_peak_bytes": self.peak("train"), "eval_peak_bytes": self.peak("eval"),
                "measured_entries": dict(self.measured), "rss": rss}


def git_state(root: str | os.PathLike | None = None) -> tuple[str | None, bool | None]:
    """(commit, dirty) of the repository holding this package; (None, None) outside git."""
    root = Path(root) if root else Path(__file__).resolve().parents[3]
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10)
        if commit.returncode != 0:
            return None, None
        status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                                capture_output=True, text=True, timeout=10)
        return commit.stdout.strip(), bool(status.stdout.strip()) if status.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None, None


def package_versions() -> dict[str, str]:
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return versions


def describe_device(device) -> str:
    import torch

    device = torch.device(device)
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        return f"cuda:{index} {torch.cuda.get_device_name(index)}"
    return f"cpu {platform.processor() or platform.machine()}".strip()


def environment(device) -> dict:
    import torch

    commit, dirty = git_state()
    return {
        "git_commit": commit,
        "git_dirty": dirty,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "packages": package_versions(),
        "device": describe_device(device),
        "device_type": torch.device(device).type,
        "torch_threads": int(torch.get_num_threads()),
        "cpu_count": os.cpu_count(),
    }
