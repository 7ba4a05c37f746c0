"""What a benchmark run measures inside its own process: peak memory, live bytes, method buffers, a profile.

Memory on CUDA is the allocator's (``reset_peak_memory_stats`` / ``max_memory_allocated``); on CPU
it is the resident set size, sampled every 2 ms by a thread (:class:`PeakMeter`). ``release_freed_memory``
(``malloc_trim``) is called between phases so memory freed by an earlier phase is not charged to the next.
"""

from __future__ import annotations

import os
import threading

MB = 1024 * 1024


def rss() -> int:
    import psutil

    return int(psutil.Process(os.getpid()).memory_info().rss)


def release_freed_memory() -> None:
    from sparsegrad.methods.sparsegrad.basis import release_freed_memory as trim

    trim()


class PeakMeter:
    """Peak memory over a block: CUDA allocator peak, or sampled RSS on CPU."""

    def __init__(self, device):
        self.device = device
        self.cuda = device.type == "cuda"
        self.peak = 0
        self._stop = threading.Event()
        self._thread = None

    def _run(self):
        while not self._stop.wait(0.002):
            self.peak = max(self.peak, rss())

    def __enter__(self):
        import torch

        if self.cuda:
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            self.peak = rss()
            self._thread = threading.Thread(target=self._run, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc):
        import torch

        if self.cuda:
            torch.cuda.synchronize(self.device)
            self.peak = int(torch.cuda.max_memory_allocated(self.device))
        else:
            self._stop.set()
            self._thread.join()
            self.peak = max(self.peak, rss())
        return False


def current_bytes(device) -> int:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)
        return int(torch.cuda.memory_allocated(device))
    return rss()



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

