"""Speed and memory benchmarks of the methods (``make bench``, ``make bench-layer``).

Not part of the method layer: it measures :mod:`sparsegrad` from outside, one fresh process per run.

Whole-model benchmark (``make bench``, ``python -m experiments.benchmark``), one job per module:

* :mod:`benchmarks.methods`: the rows, one registered :class:`~benchmarks.methods.BenchMethod` per method
  or variant (how to apply it, which optimizer); add a row there.
* :mod:`benchmarks.grid`: presets of model shapes × methods, steps, repeats and budget; the run order.
* :mod:`benchmarks.shapes`: model architectures and synthetic, movie-padded batches.
* :mod:`benchmarks.worker`: one run in a fresh process (``python -m benchmarks.worker``).
* :mod:`benchmarks.measure`: peak memory, live bytes, method buffers, a profiled step.
* :mod:`benchmarks.runner`: runs a preset's plan within its budget, and the basis-estimation sweep.
* :mod:`benchmarks.summary`: medians, ratios to full fine-tuning and LoRA, target checks.
* :mod:`benchmarks.costs`: multiply-add and byte counts per formulation (no measurement).
* :mod:`benchmarks.energy`: where the top-k of the rotated gradient sits, on real MiniLM gradients.
* :mod:`benchmarks.report`: the Markdown report, a list of sections; add a section there.
* :mod:`benchmarks.machine`: device, CPU, versions and commit of the machine.
* :mod:`benchmarks.cli`: the command line (run as ``experiments.benchmark``).

Layer benchmark (``make bench-layer``, ``python -m experiments.bench_layer``): one BERT-base MLP pair per method
(:mod:`benchmarks.layer`, written up by :mod:`benchmarks.layer_report`).
"""
