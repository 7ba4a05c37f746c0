"""Which machine a report comes from: device name, CPU model, library versions, git commit."""

from __future__ import annotations

import os
import platform
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def device_name(device: str) -> tuple[str, str]:
    """(slug for file names, human description)."""
    if device == "cuda":
        import torch

        name = torch.cuda.get_device_name(0)
        return f"cuda-{slug(name)}", name
    return "cpu", cpu_model()


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info(device: str, threads: int | None) -> dict:
    import torch

    info = {
        "device": device,
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads_per_run": threads or torch.get_num_threads(),
        "torch": torch.__version__,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "mkl": bool(torch.backends.mkl.is_available()),
    }
    try:
        import transformers

        info["transformers"] = transformers.__version__
    except ImportError:
        pass
    if device == "cuda":
        info["gpu"] = torch.cuda.get_device_name(0)
        info["cuda"] = torch.version.cuda
        info["gpu_memory_gb"] = round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                                text=True, timeout=10).stdout.strip()  # fmt: skip
        info["git_commit"] = commit or None
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", "sparsegrad", "benchmarks"],
                               cwd=ROOT, capture_output=True, text=True, timeout=10).stdout.split("\n")  # fmt: skip
        info["uncommitted"] = [line[3:] for line in dirty if line.strip()]
    except (OSError, subprocess.SubprocessError):
        info["git_commit"] = None
    return info
