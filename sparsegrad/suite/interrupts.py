"""SIGTERM is an interrupt: it takes the path Ctrl-C takes.

``timeout``, ``kill``, SLURM at the time limit (or earlier with ``sbatch --signal=B:TERM@120``) and a
preempting scheduler send SIGTERM, whose default ends Python at once: no run record, no message, trials
left RUNNING until their heartbeat runs out. :func:`install` (a whole process: a run, a sweep worker)
and :func:`catching` (a block: the driver's work) make the first such signal raise
:class:`KeyboardInterrupt` in the main thread, so every ``except KeyboardInterrupt`` of the suite (the
training loop, the runner, the Optuna sweeper, the reproduction driver) writes its record as
interrupted, gives its trials and claims back and says how to resume, exactly as for Ctrl-C. Later
signals are ignored while the process stops: a driver passes SIGTERM on to its child, which may have
had it already from the process group (``timeout``, SLURM), and the child's clean-up must not be cut.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator

_received: list[int] = []  # the signal that interrupted this process
_deferring: list[bool] = []  # inside deferred(): the interrupt waits for the block's end


def _on_signal(signum, frame) -> None:
    if _received:  # already stopping: let the clean-up finish
        return
    _received.append(signum)
    if not _deferring:
        raise KeyboardInterrupt(cause())


def install(signals: tuple[int, ...] = (signal.SIGTERM,)) -> bool:
    """These signals raise KeyboardInterrupt from now on; False where handlers cannot be set (not the main thread)."""
    if threading.current_thread() is not threading.main_thread():
        return False
    for sig in signals:
        if signal.getsignal(sig) is not _on_signal:
            signal.signal(sig, _on_signal)
    return True


@contextlib.contextmanager
def catching(*signals: int) -> Iterator[None]:
    """:func:`install` for the block only (the handlers before it come back after it); :func:`cause` still
    names what stopped the block once it is over."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    _received.clear()
    previous = {sig: signal.signal(sig, _on_signal) for sig in signals}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


@contextlib.contextmanager
def deferred() -> Iterator[None]:
    """A signal during the block interrupts at its end: a child process being started is known (and can be
    sent the signal) before the interrupt lands."""
    _deferring.append(True)
    try:
        yield
    finally:
        _deferring.pop()
    if _received and not _deferring:
        raise KeyboardInterrupt(cause())


def received() -> int | None:
    """The signal (SIGTERM, SIGHUP) that interrupted this process; None for Ctrl-C or no interrupt."""
    return _received[0] if _received else None


def cause() -> str:
    """What interrupted this process, in words: the signal's name, or Ctrl-C."""
    return signal.Signals(_received[0]).name if _received else "Ctrl-C"


def pass_on(child) -> None:
    """This process was interrupted while ``child`` (a :class:`subprocess.Popen`) ran: let the child write
    its records and give its trials back, then return. Ctrl-C reached the child from the terminal (same
    process group); a signal sent to this process alone (``kill``, a scheduler) did not, so the child
    gets SIGTERM, which it takes as an interrupt (a child that had it too ignores the copy)."""
    if child is None:
        return
    if _received and child.poll() is None:
        child.send_signal(signal.SIGTERM)
    child.wait()
