"""Entry point of ``make reproduce-glue`` and ``make tables``: sweeps, seeds and the paper's tables.

    python -m scripts.reproduce_glue --profile default             # what `make reproduce-glue` runs
    python -m scripts.reproduce_glue --profile default --tables-only
    python -m scripts.reproduce_glue --profile paper --roberta-large --launcher slurm --jobs 8
    python -m scripts.reproduce_glue --profile llama --lr 9e-5      # the authors' code's learning rate
    python -m scripts.reproduce_glue --profile smoke --dry-run      # print the commands, run nothing
    python -m scripts.reproduce_glue --profile default --fresh      # everything again, into results/local/
    python -m scripts.reproduce_glue --profile default --results results/local   # resume that fresh run

Profiles are conf/profile/*.yaml; the work is done by sparsegrad.suite.sweep.driver. Until every stage of the
pipeline exists, this stops with one line naming what is missing instead of failing half-way.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path

CONF_PROFILES = Path(__file__).resolve().parents[1] / "conf" / "profile"

# (what must exist, what it is) for each stage of the pipeline, in order.
STAGES = (
    ("experiments.finetune", "the fine-tuning entry point (python -m experiments.finetune)"),
    ("sparsegrad.suite.sweep.driver", "the Optuna sweep and seed re-runs"),
    ("sparsegrad.suite.report.tables", "the table and figure builders"),
)


def profiles() -> list[str]:
    return sorted(p.stem for p in CONF_PROFILES.glob("*.yaml")) or ["default"]


def missing_stages() -> list[str]:
    missing = []
    for module, what in STAGES:
        try:
            found = importlib.util.find_spec(module) is not None
        except ModuleNotFoundError:
            found = False
        if not found:
            missing.append(what)
    return missing


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--profile", default="default", choices=profiles())
    parser.add_argument("--tables-only", action="store_true", help="rebuild tables and figures from run records")
    parser.add_argument("--roberta-large", action="store_true", help="paper profiles: add RoBERTa-large")
    parser.add_argument("--launcher", default=None,
                        help="a Hydra launcher for the runs: parallel (joblib), slurm, slurm_local, ...")
    parser.add_argument("--jobs", type=int, default=None, help="trials / seeds launched at once (with --launcher)")
    parser.add_argument("--lr", type=float, default=None, help="profiles without a sweep: the learning rate")
    parser.add_argument("--dry-run", action="store_true", help="print the commands instead of running them")
    parser.add_argument("--fresh", action="store_true",
                        help="ignore every earlier record and study of the profile: run everything again from "
                             "scratch into results/local/<profile> (an earlier one there is moved aside; "
                             "one a live driver is running is joined instead)")
    parser.add_argument("--results", default=None, metavar="DIR",
                        help="results root other than results/ (e.g. results/local to resume a --fresh run)")
    args = parser.parse_args(argv)
    from sparsegrad.suite import interrupts

    interrupts.install()  # SIGTERM (kill, timeout, SLURM's --signal or time limit) stops it as Ctrl-C does
    missing = missing_stages()
    if missing:
        print(f"make reproduce-glue (PROFILE={args.profile}): not built yet: {'; '.join(missing)}. Nothing was run.")
        return 3
    from sparsegrad.suite.sweep.driver import run_profile  # noqa: PLC0415  (only once it exists)

    return run_profile(
        args.profile, tables_only=args.tables_only, launcher=args.launcher, jobs=args.jobs, lr=args.lr,
        dry_run=args.dry_run, extra_models=("roberta_large",) if args.roberta_large else (), fresh=args.fresh,
        results=args.results,
    )


if __name__ == "__main__":
    sys.exit(main())
