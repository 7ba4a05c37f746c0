"""Rebuild tables and figures from any folder of run records (no training, no Hydra).

    python -m scripts.build_tables --profile default                 # = make tables PROFILE=default
    python -m scripts.build_tables --records some/records --out some/results --analogue default

``--records`` holds ``<stage>/<study>/<run_id>.json`` (stage: sweep, seeds or kept), as written by
``make reproduce-glue``; ``--analogue`` names a profile whose ``paper_analogue`` maps stand-in models and
tasks to the paper's (e.g. minilm -> bert_base); ``--analysis`` is the sparsity-analysis record for
Figures 2-3 and the findings table's claim (f) (default: <out>/analysis/sparsity.json, else the one beside
the records folder). A record that cannot be read is named on screen (and the exit code is 1); the tables
are built from the others.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--profile", default=None, help="use results/<profile>/ for records and output")
    parser.add_argument("--records", type=Path, default=None)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--analogue", default=None, help="profile whose paper_analogue to use (default: --profile)")
    parser.add_argument("--analysis", type=Path, default=None)
    args = parser.parse_args(argv)
    from sparsegrad.suite.report import figures, tables
    from sparsegrad.suite.sweep import driver as sweep
    from sparsegrad.suite.sweep import runrecords

    try:
        if args.profile:
            layout = sweep.Layout.for_profile(args.profile)
            args.records = args.records or layout.records
            args.out = args.out or layout.results
        if args.records is None or args.out is None:
            parser.error("give --profile, or --records and --out")
        analogue_profile = args.analogue or args.profile
        analogue = sweep.load_profile(analogue_profile).paper_analogue if analogue_profile else {}
        loaded = runrecords.load_records(args.records)
        records = loaded.records
        for line in runrecords.describe_problems(loaded.problems):
            print(line)
        if not records:
            print(f"no run records under {args.records}")
            return 1
        if args.analysis is None:
            beside = [args.out / "analysis" / "sparsity.json", args.records.parent / "analysis" / "sparsity.json"]
            args.analysis = next((p for p in beside if p.exists()), beside[0])
        written = tables.write_all(records, args.out, profile_name=args.profile or args.out.name, analogue=analogue,
                                   bench_dir=sweep.ROOT / "results" / "bench", analysis=args.analysis)
        written += figures.write_all(records, args.out, analysis=args.analysis)
    except sweep.ReproduceError as exc:
        print(f"error: {exc}")
        return 2
    except Exception as exc:  # noqa: BLE001 - one line, never a traceback
        print(f"error: {type(exc).__name__}: {exc}")
        return 1
    print(f"{len(records)} run records -> {len(written)} files under {args.out}")
    return 1 if loaded.problems else 0


if __name__ == "__main__":
    sys.exit(main())
