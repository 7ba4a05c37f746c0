"""From run records to figures: medians over repeats, ratios to full fine-tuning and LoRA, target checks.

A pure function of the records (:func:`summarize`), so a saved report can be re-rendered from its
``records`` alone (``python -m experiments.benchmark --render FILE.json``).
"""

from __future__ import annotations

import statistics

from benchmarks.measure import MB
from benchmarks.precision import master_copy_mb

# The speed and memory targets SparseGrad and its variant are checked against: figure -> bound
# (ratios are method / reference; the sparse-by-dense speed-up is a lower bound, the rest upper bounds).
TARGETS = {
    "step_time_vs_lora": 1.1,
    "step_time_vs_full": 1.0,
    "peak_vs_lora": 1.05,
    "peak_vs_full": 0.8,
    "basis_seconds": 15.0,
    "basis_extra_mb": 300.0,
    "sd_speedup_vs_regular": 4.0,
}


def _median(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def summarize(records: list[dict], device: str, basis_sweep: list[dict] | None = None) -> dict:
    """Per shape and method: medians over repeats, ratios to full and LoRA, target checks.

    The basis targets use the standalone measurement of ``basis_sweep`` for the same shape and
    micro-batch when there is one (time under the default allocator, memory from its mmap-allocator
    run), else the estimation inside the training run."""
    shapes: dict = {}
    for r in records:
        shapes.setdefault(r["shape"], {}).setdefault(r["method"], []).append(r)
    out = {}
    for shape, by_method in shapes.items():
        rows = {}
        for method, runs in by_method.items():
            ok = [r for r in runs if "error" not in r]
            if not ok:
                rows[method] = {"error": runs[-1]["error"], "runs": len(runs)}
                continue
            basis = next((r["basis"] for r in ok if r.get("basis") and not r["basis"].get("loaded_from_cache")), None)
            peak_key = "peak_train_bytes" if device == "cuda" else "peak_above_loaded_bytes"
            steps = _median([r["steps_per_s"] for r in ok])
            rows[method] = {
                "steps_per_s": steps,
                "step_s": 1.0 / steps if steps else None,
                "steps_per_s_runs": [r["steps_per_s"] for r in ok],
                "cpu_step_s": _median([r.get("cpu_s_per_step") for r in ok]),
                "peak_mb": _median([r[peak_key] for r in ok]) / MB,
                "memory_gauge": ok[0].get("memory_gauge"),  # absent in reports from before the live-bytes gauge
                "peak_mb_runs": [r[peak_key] / MB for r in ok],
                "peak_above_loaded_mb": _median([r["peak_above_loaded_bytes"] for r in ok]) / MB,
                "optimizer_state_mb": _median([r["optimizer_state_bytes"] for r in ok]) / MB,
                "method_buffer_mb": _median([r["method_buffer_bytes"] for r in ok]) / MB,
                "master_copy_mb": master_copy_mb(ok),
                "trainable_params": ok[0]["trainable_params"],
                "model_params": ok[0]["model_params"],
                "tokens_per_batch": ok[0]["tokens_per_batch"],
                "padded_tokens_per_batch": ok[0]["padded_tokens_per_batch"],
                "model_source": ok[0]["model_source"],
                "model_layers": ok[0]["model_layers"],
                "k": ok[0].get("k"),
                "runs": len(ok),
                "basis": basis,
                "profile": next((r["profile"] for r in ok if r.get("profile")), None),
            }
        for row in rows.values():
            if "error" in row:
                continue
            for ref in ("full", "lora"):
                base = rows.get(ref)
                ok = base is not None and "error" not in base
                row[f"step_time_vs_{ref}"] = row["step_s"] / base["step_s"] if ok else None
                row[f"cpu_time_vs_{ref}"] = (row["cpu_step_s"] / base["cpu_step_s"]
                                             if ok and row.get("cpu_step_s") and base.get("cpu_step_s") else None)  # fmt: skip
                row[f"peak_vs_{ref}"] = row["peak_mb"] / base["peak_mb"] if ok and base["peak_mb"] > 0 else None
                row[f"optimizer_state_vs_{ref}"] = (row["optimizer_state_mb"] / base["optimizer_state_mb"]
                                                    if ok and base["optimizer_state_mb"] > 0 else None)  # fmt: skip
        out[shape] = {"methods": rows, "targets": check_targets(rows, device, _sweep_basis(basis_sweep, shape, rows))}
    return out


def _sweep_basis(sweep: list[dict] | None, shape: str, rows: dict) -> dict | None:
    """The standalone basis figures matching the shape and the training runs' micro-batch, if measured."""
    in_run = (rows.get("sparsegrad") or {}).get("basis") or {}
    for r in sweep or []:
        b, m = r.get("basis") or {}, r.get("memory_run") or {}
        if (r.get("shape") == shape and "error" not in r and "extra_peak_bytes" in m
                and b.get("micro_batch") == in_run.get("micro_batch")):  # fmt: skip
            return {**b, "extra_peak_bytes": m["extra_peak_bytes"], "source": "standalone"}
    return None


def check_targets(rows: dict, device: str, sweep_basis: dict | None = None) -> dict:
    """The targets for sparsegrad and the variant; None where a figure is missing."""
    checks = {}
    regular = rows.get("sparsegrad_regular")
    for method in ("sparsegrad", "leading_block"):
        row = rows.get(method)
        if row is None or "error" in row:
            continue
        c = {}
        for name in ("step_time_vs_lora", "step_time_vs_full", "peak_vs_lora", "peak_vs_full"):
            value = row.get(name)
            c[name] = {"value": value, "bound": TARGETS[name], "met": None if value is None else value <= TARGETS[name]}
        if device == "cpu":  # the same step-time bounds on process CPU time, robust to a busy machine
            for ref in ("lora", "full"):
                value, bound = row.get(f"cpu_time_vs_{ref}"), TARGETS[f"step_time_vs_{ref}"]
                c[f"cpu_time_vs_{ref}"] = {"value": value, "bound": bound, "met": None if value is None else value <= bound}
        basis = (sweep_basis if method == "sparsegrad" and sweep_basis else None) or row.get("basis")
        if basis:
            source = "standalone run" if basis.get("source") == "standalone" else "inside the training run"
            c["basis_seconds"] = {"value": basis["seconds"], "bound": TARGETS["basis_seconds"], "source": source,
                                  "met": basis["seconds"] <= TARGETS["basis_seconds"]}  # fmt: skip
            extra = basis["extra_peak_bytes"] / MB
            c["basis_extra_mb"] = {"value": extra, "bound": TARGETS["basis_extra_mb"], "source": source,
                                   "met": extra <= TARGETS["basis_extra_mb"]}  # fmt: skip
        if method == "sparsegrad" and regular is not None and "error" not in regular:
            value = row["steps_per_s"] / regular["steps_per_s"]
            c["sd_speedup_vs_regular"] = {"value": value, "bound": TARGETS["sd_speedup_vs_regular"],
                                          "met": value >= TARGETS["sd_speedup_vs_regular"]}  # fmt: skip
        checks[method] = c
    return checks

