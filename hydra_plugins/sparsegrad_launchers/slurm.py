"""submitit's SLURM launcher (hydra-submitit-launcher) that cancels the jobs it submitted when it is stopped.

The stock launcher submits a batch as a job array and blocks on the results; a Ctrl-C or SIGTERM there
ends the sweep but leaves the array queued or running on the cluster, its results never told to Optuna.
This one keeps the submitit job objects of every batch and, when the wait is cut short (Ctrl-C,
SIGTERM, or a job that SLURM killed), cancels the ones without a result through ``job.cancel()``
(``scancel <array id>_<index>``) and logs one line naming them. The sweeper then gives their trials
back to the study (queued again), so the next command runs them.

    python -m experiments.finetune --multirun +hparams_search=lr_batch hydra/launcher=slurm ...

Used by ``conf/hydra/launcher/slurm.yaml`` (``_target_``); every parameter is the stock launcher's.
"""

import contextlib
import logging
import signal
import threading
from collections.abc import Iterator, Sequence
from typing import Any

from hydra.core.utils import JobReturn
from hydra_plugins.hydra_submitit_launcher.submitit_launcher import SlurmLauncher as StockSlurmLauncher

log = logging.getLogger(__name__)


class SlurmLauncher(StockSlurmLauncher):
    """The stock SLURM launcher plus: the jobs of an interrupted batch are cancelled, and it says so."""

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        submitted: list = []
        with _recording_submissions(submitted), _sigterm_interrupts():
            try:
                return super().launch(job_overrides, initial_job_idx)
            except BaseException as exc:
                with _deaf_to_interrupts():  # a second Ctrl-C or SIGTERM must not cut the cancelling short
                    cancel_unfinished(submitted, "interrupted" if isinstance(exc, KeyboardInterrupt)
                                      else f"{type(exc).__name__}")
                raise


def cancel_unfinished(jobs: Sequence[Any], why: str) -> list[str]:
    """Cancel (``job.cancel()``, i.e. scancel) every job of ``jobs`` that has no result yet; the ids cancelled."""
    todo = [job for job in jobs if not job.paths.result_pickle.exists()]
    cancelled, failed = [], []
    for job in todo:
        try:
            job.cancel(check=False)
            cancelled.append(job.job_id)
        except OSError as err:  # no scancel on PATH, or it could not start
            failed.append(f"{job.job_id} ({err.strerror or err})")
    if cancelled:
        log.warning(f"{why}: cancelled {len(cancelled)} SLURM job(s) of this sweep (scancel {' '.join(cancelled)}); "
                    "their trials are queued again for the next run")
    if failed:
        log.warning(f"{why}: could not cancel SLURM job(s) {', '.join(failed)}; cancel them by hand with scancel")
    return cancelled


@contextlib.contextmanager
def _recording_submissions(into: list) -> Iterator[None]:
    """Make the stock launcher's ``submitit.AutoExecutor`` append the jobs it submits to ``into``.

    The stock ``launch`` builds its executor and waits on the jobs in one method and returns only their
    results; swapping the executor class for the call keeps every library step and hands us the job objects.
    """
    import submitit

    stock = submitit.AutoExecutor

    class RecordingExecutor(stock):
        def map_array(self, fn, *iterable):
            jobs = super().map_array(fn, *iterable)
            into.extend(jobs)
            return jobs

    submitit.AutoExecutor = RecordingExecutor
    try:
        yield
    finally:
        submitit.AutoExecutor = stock


@contextlib.contextmanager
def _sigterm_interrupts() -> Iterator[None]:
    """While the launcher waits, SIGTERM (kill, SLURM's end of a driver job) interrupts like Ctrl-C instead of
    killing the process outright, so the jobs get cancelled. A handler someone else installed is kept."""
    if threading.current_thread() is not threading.main_thread() or signal.getsignal(signal.SIGTERM) != signal.SIG_DFL:
        yield
        return

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


@contextlib.contextmanager
def _deaf_to_interrupts() -> Iterator[None]:
    """SIGINT and SIGTERM ignored for the block (main thread only; elsewhere no signal lands anyway)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {sig: signal.signal(sig, signal.SIG_IGN) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
