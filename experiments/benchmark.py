"""``make bench``: training speed and memory of every method, side by side (the :mod:`benchmarks` harness).

    python -m experiments.benchmark                      # --preset cpu on a CPU machine, gpu with CUDA
    python -m experiments.benchmark --preset quick       # MiniLM, a few minutes
    python -m experiments.benchmark --preset gpu --device cuda --out-dir "$OUT"
    python -m experiments.benchmark --models bert-base --batch-sizes 16 --methods full,lora,sparsegrad
    python -m experiments.benchmark --render results/bench/cpu.json   # rebuild the .md from its records

The options are those of :func:`benchmarks.cli.parse_args` (``--help``).
"""

import sys

from benchmarks.cli import main

if __name__ == "__main__":
    sys.exit(main())
