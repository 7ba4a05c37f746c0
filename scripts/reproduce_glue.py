"""Entry point of ``make reproduce-glue``: sweeps, seeds and the paper's tables.

Until every stage of the pipeline exists, this stops with one line naming what is missing
instead of failing half-way.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys

PROFILES = ("default", "smoke", "paper", "paper_best", "llama")

# (what must exist, what it is) for each stage of the pipeline, in order.
STAGES = (
    ("experiments.finetune", "the fine-tuning entry point (python -m experiments.finetune)"),
    ("sparsegrad.suite.sweep", "the Optuna sweep and seed re-runs"),
    ("sparsegrad.suite.tables", "the table and figure builders"),
)


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
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--profile", default="default", choices=PROFILES)
    parser.add_argument("--tables-only", action="store_true", help="rebuild tables and figures from run records")
    args = parser.parse_args(argv)
    missing = missing_stages()
    if missing:
        print(f"make reproduce-glue (PROFILE={args.profile}): not built yet: {'; '.join(missing)}. Nothing was run.")
        return 3
    from sparsegrad.suite.sweep import run_profile  # noqa: PLC0415  (only once it exists)

    return run_profile(args.profile, tables_only=args.tables_only)


if __name__ == "__main__":
    sys.exit(main())
