"""The Hydra launchers a profile's runs can go through, and what each means for the plan.

``--launcher`` (``make reproduce-glue LAUNCHER=...``) names a file of ``conf/hydra/launcher/`` or one of the
launchers Hydra's plugins bring. Local launchers run the trials on this machine (the plan gives a wall
time from its cores); cluster launchers submit them to SLURM, where the wall time is the queue's, so the
plan gives runs, trials in flight and GPU-hours instead. No Hydra here: the names are checked from the
config folder before any subprocess starts.
"""

from __future__ import annotations

import shutil

from sparsegrad.suite.sweep.profiles import CONF_DIR, ReproduceError

PLUGIN_LAUNCHERS = ("basic", "joblib", "submitit_local", "submitit_slurm")  # Hydra's and its plugins' own
CLUSTER_LAUNCHERS = ("slurm", "submitit_slurm")


def available() -> list[str]:
    ours = sorted(p.stem for p in (CONF_DIR / "hydra" / "launcher").glob("*.yaml"))
    return ours + [name for name in PLUGIN_LAUNCHERS if name not in ours]


def is_cluster(name: str | None) -> bool:
    return name in CLUSTER_LAUNCHERS


def check(name: str | None, submitting: bool = True) -> None:
    """One line (a :class:`ReproduceError`) for a launcher that is unknown or, when ``submitting``, cannot
    run here (a dry run only prints the commands)."""
    if name is None:
        return
    valid = available()
    if name not in valid:
        raise ReproduceError(f"unknown launcher {name!r}; valid launchers: {', '.join(valid)} "
                             "(e.g. make reproduce-glue LAUNCHER=parallel JOBS=2)")
    if submitting and is_cluster(name) and shutil.which("sbatch") is None:
        raise ReproduceError(f"launcher {name!r} submits the runs with SLURM's sbatch, which is not on PATH here: run "
                             "it on the cluster's login node, or try the same code path on this machine with "
                             "LAUNCHER=slurm_local")
