"""The layer benchmark's write-up: ``layer.json`` (the measurements) and ``layer.md`` (the table and the
multiply-add counts per formulation), from the results of :mod:`benchmarks.layer`."""

from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path

# Every method the layer benchmark times, with the label its report prints.
METHODS = {
    "dense": "nn.Linear pair + AdamW (full fine-tuning of the pair)",
    "lora": "peft LoRA r=7 on both linears (biases train), AdamW",
    "meprop_weight": "MeProp, top-k of dL/dW (paper's baseline), lazy sparse Adam",
    "meprop_output": "meProp (Sun et al.), top-k per row of dL/dY, AdamW",
    "sparsegrad_regular": "SparseGrad, paper's 3-product formulation, no row dropping",
    "sparsegrad_regular_sd": "SparseGrad, 3-product + sparse-by-dense (paper's SD)",
    "sparsegrad_auto_nosd": "SparseGrad, 'auto' formulation (only W stored, steps applied as u_out dW~ R^T), no row dropping",
    "sparsegrad_auto_rotated": "SparseGrad, 'auto' formulation with storage 'rotated' (W~ + cached W_eff) + sparse-by-dense",
    "sparsegrad_auto": "SparseGrad, 'auto' formulation (only W stored) + sparse-by-dense (ours, default)",
    "sparsegrad_auto_compact": "same, with compact optimizer state (moments only for touched coordinates)",
}


def _macs(args, n_rows: int) -> dict[str, int]:
    """Multiply-adds per training step of the pair (both linears), by formulation."""
    from sparsegrad.kernels import macs_auto, macs_dense, macs_lora, macs_regular

    t = args.batch * args.seq
    shapes = [(args.hidden, args.intermediate), (args.intermediate, args.hidden)]
    k = args.k

    def incremental(d_in, d_out):  # worst case: the k entries touch every row and column of W~
        return min(k * d_in + d_out * d_out * d_in, k * d_out + d_in * d_in * d_out)

    out = {
        "dense": sum(macs_dense(t, i, o) for i, o in shapes),
        "lora": sum(macs_lora(t, i, o, args.lora_rank) for i, o in shapes),
        "sparsegrad_regular": sum(macs_regular(t, i, o) for i, o in shapes),
        "sparsegrad_regular_sd": sum(macs_regular(t, i, o, n_rows) for i, o in shapes),
        "sparsegrad_auto_nosd": sum(macs_auto(t, i, o, t, incremental(i, o)) for i, o in shapes),
        "sparsegrad_auto": sum(macs_auto(t, i, o, n_rows, incremental(i, o)) for i, o in shapes),
        "sparsegrad_auto_rotated": sum(macs_auto(t, i, o, n_rows, incremental(i, o)) for i, o in shapes),
        "sparsegrad_auto_compact": sum(macs_auto(t, i, o, n_rows, incremental(i, o)) for i, o in shapes),
        "sparsegrad_auto_full_refresh": sum(macs_auto(t, i, o, n_rows) for i, o in shapes),
    }
    # MeProp: forward on all tokens, backward on the non-zero rows of dL/dY only
    out["meprop_weight"] = sum((t + 2 * n_rows) * i * o for i, o in shapes)
    out["meprop_output"] = out["meprop_weight"]
    return out


def _machine(args) -> dict:
    import torch

    info = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "threads": args.threads,
        "device": args.device,
    }
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    info["cpu_model"] = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    if args.device.startswith("cuda"):
        info["gpu"] = torch.cuda.get_device_name(0)
    info["load_avg"] = getattr(args, "load_avg", None)
    return info


def _fmt_load(load) -> str:
    if not load:
        return "n/a"
    return " -> ".join(f"{tuple(round(v, 2) for v in load[k])} ({k})" for k in ("before", "after"))


def fmt_bytes(n) -> str:
    return "n/a" if n is None else f"{n / 2**20:.1f}"


def write(results: list[dict], args, out_dir: Path, n_rows: int) -> None:
    by = {r["method"]: r for r in results}
    dense = by.get("dense")
    macs = _macs(args, n_rows)
    for r in results:
        r["macs"] = macs.get(r["method"])
        if dense:
            r["time_ratio_to_dense"] = r["median_s"] / dense["median_s"]
            if r["peak_mem_delta_bytes"] is not None and dense["peak_mem_delta_bytes"]:
                r["mem_ratio_to_dense"] = r["peak_mem_delta_bytes"] / dense["peak_mem_delta_bytes"]
    record = {
        "benchmark": "layer",
        "shape": {"batch": args.batch, "seq": args.seq, "hidden": args.hidden, "intermediate": args.intermediate,
                  "non_padding_tokens": n_rows, "k": args.k, "lora_rank": args.lora_rank,
                  "meprop_k_per_row": args.meprop_k_per_row, "sparse_state": args.sparse_state},  # fmt: skip
        "steps": args.steps,
        "warmup": args.warmup,
        "quick": args.quick,
        "machine": _machine(args),
        "generated_utc": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "command": "python -m experiments.bench_layer" + "".join(" " + a for a in args.argv),
        "args": {k: v for k, v in vars(args).items() if k not in ("worker", "from_json", "out")},
        "results": results,
        "macs_extra": {"sparsegrad_auto_full_refresh": macs["sparsegrad_auto_full_refresh"]},
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "layer.json").write_text(json.dumps(record, indent=2) + "\n")
    render(record, args, out_dir)


def render(record: dict, args, out_dir: Path) -> None:
    """layer.md from a layer.json record (``--from-json`` re-renders without re-measuring)."""
    results = record["results"]
    by = {r["method"]: r for r in results}
    dense = by.get("dense")
    n_rows = record["shape"]["non_padding_tokens"]
    macs = _macs(args, n_rows)
    m = record["machine"]
    mem_what = "peak CUDA allocation" if args.device.startswith("cuda") else "peak RSS (VmHWM)"
    lines = [
        "# Layer benchmark: one BERT-base MLP pair, forward + backward + optimizer step",
        "",
        f"Generated by `{record.get('command') or 'python -m experiments.bench_layer' + ''.join(' ' + a for a in args.argv)}` "
        f"({record.get('generated_utc', 'n/a')}).",
        "",
        f"- Shape: {args.hidden} -> {args.intermediate} -> GELU -> {args.hidden}; batch {args.batch} x {args.seq} "
        f"tokens, {n_rows} of {args.batch * args.seq} non-padding (the loss is masked on padding, so those rows "
        "of dL/dY are zero); the input requires grad.",
        f"- Budget: k = {args.k} gradient entries per linear (SparseGrad, MeProp weight); LoRA rank "
        f"{args.lora_rank}; meProp output keeps {args.meprop_k_per_row} of each dL/dY row; sparse optimizer "
        f"state layout: {args.sparse_state} (except the *_compact row). SparseGrad uses a random orthogonal basis (cost does not depend "
        "on it, except the incremental weight refresh, for which a random basis is the worst case).",
        f"- Machine: {m.get('cpu_model', m['processor'])}{', ' + m['gpu'] if 'gpu' in m else ''}; "
        f"device {args.device}; torch {m['torch']}; {args.threads} threads; 1/5/15-min load average "
        f"{_fmt_load(m['load_avg'])} (other processes on the machine inflate absolute times).",
        f"- Time: median of {args.steps} steps after {args.warmup} warm-up rounds; all methods live in one "
        "process and are stepped round-robin (order rotated every round) so load changes hit all alike.",
        f"- Memory: {mem_what} during {args.mem_steps} steps, each method in a fresh process, minus what the "
        "process held after building layers, inputs and optimizer (so: activations, gradients, optimizer "
        "state, temporaries).",
        "",
        "| method | description | time / step (ms) | x dense | peak mem delta (MiB) | x dense | "
        "optimizer state (MiB) | multiply-adds / step (G) | x dense |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        mac = r.get("macs")
        mac_ratio = mac / macs["dense"] if mac else None
        lines.append(
            f"| {r['method']} | {METHODS[r['method']]} | {1000 * r['median_s']:.0f} | "
            f"{r.get('time_ratio_to_dense', float('nan')):.2f} | {fmt_bytes(r['peak_mem_delta_bytes'])} | "
            f"{r.get('mem_ratio_to_dense', float('nan')):.2f} | {fmt_bytes(r['optimizer_state_bytes'])} | "
            f"{mac / 1e9:.1f} | {mac_ratio:.2f} |"
            if mac
            else f"| {r['method']} | {METHODS[r['method']]} | {1000 * r['median_s']:.0f} | "
            f"{r.get('time_ratio_to_dense', float('nan')):.2f} | {fmt_bytes(r['peak_mem_delta_bytes'])} | "
            f"{r.get('mem_ratio_to_dense', float('nan')):.2f} | {fmt_bytes(r['optimizer_state_bytes'])} | n/a | n/a |"
        )
    goals = []
    if "sparsegrad_auto" in by and dense:
        best = by["sparsegrad_auto"]
        goals.append(f"- SparseGrad ('auto', only W stored, sparse-by-dense) vs dense Linear: "
                     f"{best['median_s'] / dense['median_s']:.2f}x the time (goal: within 2x).")  # fmt: skip
        if "sparsegrad_regular" in by:
            reg = by["sparsegrad_regular"]
            goals.append(f"- vs the regular 3-product formulation: {reg['median_s'] / best['median_s']:.2f}x faster "
                         "(goal: at least 3x).")  # fmt: skip
        if "sparsegrad_regular_sd" in by:
            sd = by["sparsegrad_regular_sd"]
            goals.append(f"- vs the paper's sparse-by-dense 3-product: {sd['median_s'] / best['median_s']:.2f}x faster.")
        goals.append(
            f"- Ceiling from the multiply-add counts below: the regular formulation needs "
            f"{macs['sparsegrad_regular'] / macs['sparsegrad_auto']:.2f}x the multiply-adds of ours at this shape, "
            "and an exact top-k needs the full dense dL/dW~, whose two rotations (min(T', out) in^2 + "
            "min(T', in) out^2 per linear) no exact formulation avoids; the regular path's large square "
            "products also run at higher BLAS efficiency than our thin ones, and top-k, row selection and the "
            "optimizer add fixed costs. With a gradient basis (rather than this random one) the top-k entries "
            "concentrate in leading rows/columns and the incremental refresh gets cheaper."
        )
    t = args.batch * args.seq
    lines += [
        "",
        *goals,
        "",
        "## Multiply-add counts per linear (T tokens, T' non-zero rows of dL/dY, in x out weight)",
        "",
        "| formulation | forward | backward |",
        "|---|---|---|",
        "| dense nn.Linear | T in out | 2 T in out |",
        "| LoRA rank r (frozen W) | T in out + T r (in + out) | T in out + 2 T r (in + out) |",
        "| SparseGrad regular (paper 3-product) | T (in^2 + in out + out^2) | T' out^2 + T' (out in + in^2) + T' out in |",
        "| SparseGrad auto (ours) | T in out, + the k-sparse step applied to W (storage 'weight') or to the cached "
        "W_eff (storage 'rotated') as u_out dW~ R^T: <= k max(in,out) + out in min(in,out); the rotated storage "
        "also recomputes W_eff in full (out in (in + out)) every 100 steps | "
        "2 T' in out + min(T', out) in^2 + min(T', in) out^2 |",
        "",
        f"Here T = {t}, T' = {n_rows}; per step for the pair (both linears): "
        + ", ".join(f"{name} {v / 1e9:.1f} G" for name, v in macs.items())
        + ". MeProp counts assume its backward skips zero rows like ours. Top-k selection, the optimizer and "
        "the GELU are not counted.",
        "",
        "Notes: the dense Linear does not skip padded rows (torch's backward has no such path); the "
        "sparse-by-dense path does. Wall time on a shared 2-core CPU is noisy: compare ratios within one run. "
        "Peak RSS deltas of this size are dominated by activations and by the allocator's caching; two runs "
        "on the loaded development machine differed by up to ~50 MiB per method, so only the optimizer-state "
        "column is exact accounting.",
    ]
    (out_dir / "layer.md").write_text("\n".join(lines) + "\n")
