"""What a benchmark run measures inside its own process: peak memory, live bytes, method buffers, a profile.

Memory is gauged as the training runs gauge it (:mod:`sparsegrad.suite.run.measure`): on CUDA the
allocator's peak (``reset_peak_memory_stats`` / ``max_memory_allocated``); on CPU the peak of live
tensor bytes (:class:`sparsegrad.suite.run.live_bytes.LiveTensorBytes`), with the peak resident set
size sampled every 2 ms beside it (:class:`PeakMeter`). The CPU gauge costs Python time per tensor
operation, so a timed step must not be gauged: :meth:`PeakMeter.gauged` switches it on for the steps
the caller picks. ``release_freed_memory`` (``malloc_trim``) is called between phases so the RSS
beside it is not charged with memory an earlier phase freed.
"""

from __future__ import annotations

import contextlib
import os
import threading

MB = 1024 * 1024
LIVE_GAUGE, CUDA_GAUGE = "live_tensor_bytes", "cuda_max_memory_allocated"


def rss() -> int:
    import psutil

    return int(psutil.Process(os.getpid()).memory_info().rss)


def release_freed_memory() -> None:
    from sparsegrad.methods.sparsegrad.basis import release_freed_memory as trim

    trim()


def gauge_name(device) -> str:
    return CUDA_GAUGE if device.type == "cuda" else LIVE_GAUGE


class PeakMeter:
    """Peak memory over a block: the CUDA allocator's peak, or on CPU the peak live tensor bytes of the gauged
    steps (``watch``: the models and optimizers whose tensors exist at entry) and the peak RSS beside it."""

    def __init__(self, device, watch: tuple = ()):
        self.device = device
        self.cuda = device.type == "cuda"
        self.watch = watch
        self.peak = 0
        self.rss_peak = 0
        self._stop = threading.Event()
        self._thread = None
        self._gauge = None

    def _run(self):
        while not self._stop.wait(0.002):
            self.rss_peak = max(self.rss_peak, rss())

    def __enter__(self):
        import torch

        if self.cuda:
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            from sparsegrad.suite.run.live_bytes import LiveTensorBytes, tensors_of

            self._gauge = LiveTensorBytes()
            self._gauge.adopt(tensors_of(*self.watch))
            self.peak = self._gauge.live
            self.rss_peak = rss()
            self._thread = threading.Thread(target=self._run, daemon=True)
            self._thread.start()
        return self

    @contextlib.contextmanager
    def gauged(self, on: bool = True):
        """Count live tensor bytes inside the block (CPU; on CUDA the allocator always counts)."""
        if self._gauge is None or not on:
            yield self
            return
        from sparsegrad.suite.run.live_bytes import tensors_of

        self._gauge.adopt(tensors_of(*self.watch))  # tensors made while ungauged (the optimizer's state)
        with self._gauge:
            yield self
        self.peak = max(self.peak, self._gauge.peak)

    def __exit__(self, *exc):
        import torch

        if self.cuda:
            torch.cuda.synchronize(self.device)
            self.peak = int(torch.cuda.max_memory_allocated(self.device))
        else:
            self._stop.set()
            self._thread.join()
            self.rss_peak = max(self.rss_peak, rss())
            self._gauge.forget()
        return False


def current_bytes(device, *watch) -> int:
    """Live tensor bytes now: the CUDA allocator's count, or on CPU the bytes of the tensors ``watch`` holds."""
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)
        return int(torch.cuda.memory_allocated(device))
    from sparsegrad.suite.run.live_bytes import LiveTensorBytes, tensors_of

    gauge = LiveTensorBytes()
    gauge.adopt(tensors_of(*watch))
    live = int(gauge.live)
    gauge.forget()
    return live



def method_buffer_bytes(model) -> int:
    """Bytes of buffers the method adds to the swapped layers (basis, caches, masks), shared ones once.

    A buffer named ``weight`` is the frozen original weight (the leading-block variant keeps W so), which
    the original layer held too: not counted."""
    from sparsegrad.registry import swapped_modules

    seen, total = set(), 0
    for _, module, _ in swapped_modules(model):
        for name, b in module.named_buffers(recurse=False):
            if b is None or name == "weight":
                continue
            key = (b.untyped_storage().data_ptr(), b.dtype)
            if key in seen:
                continue
            seen.add(key)
            total += b.numel() * b.element_size()
    return total


def profile_step(step, batch, device, top: int = 25) -> list[dict]:
    """Self time of the top operators over one training step (torch.profiler)."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        step(batch)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    rows = []
    key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    events = sorted(prof.key_averages(), key=lambda e: getattr(e, key, 0), reverse=True)[:top]
    for e in events:
        rows.append({"op": e.key, "calls": int(e.count), "self_ms": getattr(e, key, 0) / 1000.0})
    return rows

