"""One GPU per run when several runs share a node.

``--launcher parallel --jobs N`` (or N drivers, or N shells) starts N runs on one machine at once; with
``trainer.device=auto`` (the default) or ``cuda`` each would take the current CUDA device, device 0. A run
here leases a device instead: the first GPU no other run of this node holds, scanning the visible GPUs in
order, so that N concurrent runs on N GPUs get one each, and run N + 1 shares the GPU with the fewest runs.
A lease is an exclusive ``flock`` on a small file (``<device>.slot<k>.lock`` in a folder of the node's
temporary directory), so it is released when the run ends and also when its process dies, however it
dies; it needs no server and works across launchers (joblib, submitit's local executor, separate drivers).

A run given an explicit device (``trainer.device=cuda:1``, ``cpu``) or on a machine with fewer than two
GPUs takes no lease. The run record names the device in ``environment.device`` (``cuda:1 <GPU name>``) and
the lease in ``environment.device_lease``. ``SPARSEGRAD_DEVICES=0,2`` restricts the GPUs shared out (torch's
indices); ``SPARSEGRAD_DEVICE_LOCKS`` moves the lock folder (e.g. to a node-local disk).
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

DEVICES_ENV = "SPARSEGRAD_DEVICES"
LOCKS_ENV = "SPARSEGRAD_DEVICE_LOCKS"
MAX_SHARE = 64  # runs per GPU at most before a run gives up leasing (and takes the current device)


def visible() -> list[int]:
    """The CUDA device indices runs are spread over: ``SPARSEGRAD_DEVICES`` if set, else every visible one."""
    listed = os.environ.get(DEVICES_ENV, "").strip()
    if listed:
        return [int(part) for part in listed.replace(" ", "").split(",") if part]
    import torch

    return list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []


def lock_folder() -> Path:
    folder = Path(os.environ.get(LOCKS_ENV) or Path(tempfile.gettempdir()) / f"sparsegrad-devices-{os.getuid()}")
    folder.mkdir(parents=True, exist_ok=True)
    return folder


@dataclass
class Lease:
    """A run's hold on one GPU of the node; ``slot`` 0 means no other run held it when leased."""

    device: str  # "cuda:<index>"
    slot: int
    devices: list[int]
    _fd: int | None = field(default=None, repr=False)

    def describe(self) -> dict:
        return {"device": self.device, "slot": self.slot, "devices": list(self.devices)}

    def __del__(self) -> None:  # a run that failed before it could release its lease
        self.release()

    def release(self) -> None:
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.close(self._fd)  # closing the file drops the flock
            self._fd = None


def acquire(requested: str) -> Lease | None:
    """A lease on the least-shared GPU for a run asking for ``auto`` or ``cuda``; None when the run should take
    the device it asked for (an explicit one, fewer than two GPUs, or every slot taken)."""
    import fcntl

    if requested not in ("auto", "cuda"):
        return None
    devices = visible()
    if len(devices) < 2:
        return None
    folder = lock_folder()
    for slot in range(MAX_SHARE):
        for index in devices:
            fd = os.open(folder / f"cuda{index}.slot{slot}.lock", os.O_CREAT | os.O_RDWR, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                continue
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()}\n".encode())  # who holds it, for a person looking
            return Lease(f"cuda:{index}", slot, devices, fd)
    return None
