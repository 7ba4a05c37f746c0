"""Measuring a run: peak memory per phase, the environment a record must name.

Memory: on CUDA the allocator's peak (``max_memory_allocated``), reset at the start of every phase
and read at its end. On CPU the peak resident set size, sampled by a background thread every few
milliseconds (``ru_maxrss`` cannot be reset and covers the whole process lifetime, so it would
charge training with the model loading and evaluation peaks). A phase is a ``with meter.phase(name)``
block; the same name may be entered many times and keeps the maximum.
"""

from __future__ import annotations

import contextlib
import os
import platform
import subprocess
import sys
import threading
from importlib import metadata
from pathlib import Path

PACKAGES = ("torch", "transformers", "peft", "datasets", "tokenizers", "accelerate", "numpy", "scipy",
            "scikit-learn", "hydra-core", "omegaconf", "wandb", "optuna", "sparsegrad")


class MemoryMeter:
    def __init__(self, device, interval_s: float = 0.005):
        import torch

        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        self.interval_s = interval_s
        self.peaks: dict[str, int] = {}
        self._current: str | None = None
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = None
        self._process = None
        if not self.cuda:
            import psutil

            self._process = psutil.Process(os.getpid())

    @property
    def how(self) -> str:
        if self.cuda:
            return "torch.cuda.max_memory_allocated, reset at each phase start"
        return f"peak process RSS (psutil), sampled every {self.interval_s * 1000:g} ms per phase"

    def current_bytes(self) -> int:
        import torch

        if self.cuda:
            return int(torch.cuda.memory_allocated(self.device))
        return int(self._process.memory_info().rss)

    def _note(self, value: int) -> None:
        with self._lock:
            if self._current is not None:
                self.peaks[self._current] = max(self.peaks.get(self._current, 0), value)

    def _sample_forever(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self._note(int(self._process.memory_info().rss))
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

    @contextlib.contextmanager
    def phase(self, name: str):
        import torch

        previous = self._current
        if self.cuda:
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        with self._lock:
            self._current = name
        if not self.cuda:
            self._note(self.current_bytes())
        try:
            yield self
        finally:
            if self.cuda:
                torch.cuda.synchronize(self.device)
                peak = int(torch.cuda.max_memory_allocated(self.device))
                with self._lock:
                    self.peaks[name] = max(self.peaks.get(name, 0), peak)
            else:
                self._note(self.current_bytes())
            with self._lock:
                self._current = previous

    def peak(self, name: str) -> int | None:
        return self.peaks.get(name)


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
