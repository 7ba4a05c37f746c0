"""A bf16 model with float32 master copies: the ``bf16`` preset and its report part.

    python -m experiments.benchmark --preset bf16          # = make bench BENCH_ARGS="--preset bf16"

SmolLM2-135M loaded in bf16 (the real weights from the asset cache) trains every method the way a
paper-scale LLaMA run does: the MLPs of every third block, nothing else (the paper's LLaMA setting).
The sparse-gradient methods keep float32 master copies of their trained matrices
(:func:`sparsegrad.build_optimizer`); full FT and LoRA train their bf16 parameters with AdamW as they
are. Step time and peak memory come out as ratios to full FT of the same shape, as for every preset;
:func:`master_copies` adds what the master copies themselves take.
"""

from __future__ import annotations

from benchmarks.measure import MB

BF16_METHODS = ["full", "lora", "meprop", "meprop_adamw", "sparsegrad", "sparsegrad_rotated", "leading_block"]


def bf16_preset(preset_cls, shape_cls):
    """The ``bf16`` preset (built by :mod:`benchmarks.grid` with its Preset and Shape classes)."""
    return preset_cls(
        shapes=[shape_cls("smollm2", 4, 128, "none", pretrained=True, dtype="bfloat16", methods=list(BF16_METHODS))],
        steps=2, warmup=1, repeats=1, budget_min=30, basis_steps=3, energy="skip",
        notes=[
            "bf16 preset: SmolLM2-135M-Instruct loaded in bf16 on CPU, batch 4 x 128 tokens unpadded, the MLPs "
            "of every third block trained (the paper's LLaMA setting); 2 timed steps after 1 warm-up, one run "
            "per method, basis from 3 batches. The sparse-gradient methods (meprop, meprop_adamw, sparsegrad, "
            "sparsegrad_rotated, leading_block) keep float32 master copies of their trained matrices; full FT "
            "and LoRA train the bf16 parameters as they are. CPU bf16 kernels are slow and few steps are "
            "timed: read the ratios, not the absolute times.",
        ],
    )  # fmt: skip


def master_copies(shape: str, block: dict, report: dict) -> list[str]:
    """The float32 master copies of each method (only for shapes where a method keeps them)."""
    rows = {m: r for m, r in block["methods"].items() if "error" not in r and r.get("master_copy_mb")}
    if not rows:
        return []
    lines = ["Float32 master copies of the trained matrices (part of the peak above):", ""]
    for method, r in rows.items():
        share = r["master_copy_mb"] / r["peak_mb"] if r.get("peak_mb") else None
        lines.append(f"- {method}: {r['master_copy_mb']:.1f} MB" + (f" ({share:.0%} of its peak)" if share else ""))
    lines.append("")
    return lines


def master_copy_mb(runs: list[dict]) -> float:
    """Median master-copy bytes of a method's runs, in MB (0 for records from before the field)."""
    values = sorted(int(r.get("master_bytes") or 0) for r in runs)
    return values[len(values) // 2] / MB if values else 0.0
