"""Look at, and repair, an Optuna study that sweep workers share.

    python -m scripts.repair_study --storage postgresql://user@dbhost:5432/sparsegrad --study bert_base-full-cola
    python -m scripts.repair_study --storage journal:///shared/fs/study.log --study toy --grace 30

Prints the study's budget and its trials by state, then does what a live worker would do on its own:
fails the RUNNING trials without a heartbeat for ``--grace`` seconds (their worker died) and queues
their setting again once, and queues a ticket for every budget slot that has no trial (the worker that
queued the budget died half-way). Safe while workers run. Then start (or restart) the sweep workers.
"""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--storage", required=True, help="the study storage URL (sqlite:///, postgresql://, journal:///)")
    parser.add_argument("--study", required=True, help="the study name")
    parser.add_argument("--grace", type=float, default=30.0, help="seconds without a heartbeat before a trial is failed")
    args = parser.parse_args(argv)

    import optuna

    from sparsegrad.suite.sweep import studies

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        study = optuna.load_study(study_name=args.study, storage=studies.open_storage(args.storage))
    except studies.StudyError as exc:
        print(f"repair_study: {exc}")
        return 2
    except KeyError:
        names = [s.study_name for s in optuna.get_all_study_summaries(studies.open_storage(args.storage))]
        print(f"repair_study: no study {args.study!r} in {args.storage}; its studies: {', '.join(names) or 'none'}")
        return 2
    failed = studies.fail_stale(study, args.grace)
    queued = studies.refill(study)
    state = studies.progress(study)
    counts = {}
    for t in study.get_trials(deepcopy=False):
        counts[t.state.name.lower()] = counts.get(t.state.name.lower(), 0) + 1
    print(f"study {args.study!r}: budget {state['budget']}, {state['slots']} slot(s) with a trial; trials "
          + ", ".join(f"{n} {s}" for s, n in sorted(counts.items())))
    print(f"  stale trials failed and queued again: {failed or 'none'}; missing slots queued: {queued or 'none'}")
    for kept in studies.duplicate_runs(study):
        print(f"  duplicate run: {studies.describe_duplicate_run(kept, args.study)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
