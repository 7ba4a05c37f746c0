"""``make bench-layer``: one BERT-base MLP pair per method, forward + backward + step (:mod:`benchmarks.layer`).

    python -m experiments.bench_layer            # writes results/bench/layer.md and layer.json
    python -m experiments.bench_layer --quick    # a smoke run (fewer steps, smaller batch)
"""

import sys

from benchmarks.layer import main

if __name__ == "__main__":
    sys.exit(main())
