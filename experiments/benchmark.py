"""Training speed and memory of every method, side by side on one machine (``make bench``).

    python -m experiments.benchmark                      # --preset cpu on a CPU machine, gpu with CUDA
    python -m experiments.benchmark --preset quick       # MiniLM, a few minutes
    python -m experiments.benchmark --preset gpu --device cuda --out-dir "$OUT"
    python -m experiments.benchmark --models bert-base --batch-sizes 16 --paddings movie \
        --methods full,lora,sparsegrad --steps 3 --repeats 2

Every run is a fresh process (``experiments._bench_worker``) for one method on one shape (model,
batch, sequence length, padding); the runs of a shape alternate methods (A B C A B C ...) so a noisy
machine treats them alike. Per run: training steps/s after warm-up, peak training memory (CUDA
allocator peak; on CPU peak RSS above the loaded model), optimizer-state bytes, the method's own
buffers, and for SparseGrad the cost of estimating the transition basis. Results go to
``results/bench/<device>.md`` and ``.json``, every figure also as a ratio to full fine-tuning and to
LoRA of the same shape, with the targets of issue 6 checked, a multiply-add / bytes analysis of each
formulation and, where the MiniLM asset is present, the measurement of where the top-k of dL/dW~ sits.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from experiments._bench_worker import FAMILY, METHODS, MODEL_SHAPES

ROOT = Path(__file__).resolve().parents[1]
MB = 1024 * 1024

# Issue 6 targets: (figure, reference method, bound).
TARGETS = {
    "step_time_vs_lora": 1.1,
    "step_time_vs_full": 1.0,
    "peak_vs_lora": 1.05,
    "peak_vs_full": 0.8,
    "basis_seconds": 15.0,
    "basis_extra_mb": 300.0,
    "sd_speedup_vs_regular": 4.0,
}

METHOD_NOTES = {
    "full": "full fine-tuning, dense AdamW on every parameter",
    "lora": "peft LoRA on the MLP linears (rank 7 encoders, 32 LLaMA), non-MLP dense as in the paper",
    "meprop": "top-k of dL/dW in the original space (paper's MeProp), lazy Adam",
    "sparsegrad": "exact SparseGrad as the library builds it: only W stored (storage 'weight'; each k-sparse step "
                  "applied as u_out·ΔW~·Rᵀ), formulation 'auto', sparse-by-dense, lazy Adam",
    "sparsegrad_rotated": "the same exact method with storage 'rotated': W~ as the parameter plus a cached "
                          "W_eff = u_out W~ Rᵀ (one more out×in matrix per layer; trainable by any sparse optimizer)",
    "sparsegrad_regular": "exact SparseGrad, the paper's 3-product layer ('regular'), dense backward (paper's 'Reg')",
    "leading_block": "variant: SparseGrad restricted to the leading block of W~ (sparsegrad.fixed_support)",
}


@dataclass
class Shape:
    model: str
    batch: int
    seq: int
    padding: str  # movie | none
    layers: int | None = None
    pretrained: bool = False
    methods: list[str] = field(default_factory=lambda: list(METHODS))

    @property
    def key(self) -> str:
        layers = f" ({self.layers} layers)" if self.layers else ""
        pad = "movie-padded" if self.padding == "movie" else "unpadded"
        return f"{self.model}{layers} bs{self.batch}x{self.seq} {pad}"


@dataclass
class Preset:
    shapes: list[Shape]
    steps: int
    warmup: int
    repeats: int
    budget_min: float
    basis_steps: int = 8
    basis_micro_batch: int | None = 4
    basis_sweep: list = field(default_factory=list)  # micro-batch settings measured alone (0: whole batches)
    energy: str = "auto"  # auto | run | cached | skip
    profile_method: str | None = None
    steps_override: dict = field(default_factory=dict)  # method -> timed steps
    notes: list[str] = field(default_factory=list)


ALL = list(METHODS)
LLAMA_METHODS = ["full", "lora", "meprop", "sparsegrad", "sparsegrad_regular", "leading_block"]

PRESETS = {
    "quick": Preset(
        shapes=[Shape("minilm", 16, 128, "movie", pretrained=True)], steps=2, warmup=1, repeats=2,
        budget_min=10, energy="skip",
    ),
    "cpu": Preset(
        shapes=[Shape("bert-base", 16, 128, "movie", methods=ALL),
                Shape("bert-base", 16, 128, "none", methods=["full", "lora", "leading_block", "sparsegrad"])],
        steps=2, warmup=1, repeats=2, budget_min=24, energy="auto", profile_method="sparsegrad",
        basis_sweep=[0, 4, 3, 2],
        steps_override={"sparsegrad_regular": 1},
        notes=[
            "CPU preset (2 cores: a bert-base step takes seconds): bert-base bs16x128 only, 2 timed steps after "
            "1 warm-up (1 timed step for the 3-product layer), 2 alternating repeats; the unpadded shape skips "
            "meprop and the 3-product layer (both dominated by dense per-token work measured on the padded shape).",
            "Skipped on CPU (run by --preset gpu): roberta-base, batch 32, the LLaMA shapes; runs that would "
            "overrun the 21-minute run budget (25 minutes with the top-k location measurement) are skipped and "
            "listed below.",
        ],
    ),
    "gpu": Preset(
        shapes=[Shape("roberta-base", 32, 128, "movie"),
                Shape("llama2-7b", 4, 512, "none", layers=4, methods=LLAMA_METHODS),
                Shape("smollm2", 8, 512, "none", methods=LLAMA_METHODS),
                Shape("roberta-base", 32, 128, "none", methods=[m for m in ALL if m != "sparsegrad_regular"]),
                Shape("bert-base", 16, 128, "movie"),
                Shape("roberta-base", 16, 128, "movie")],
        steps=10, warmup=3, repeats=2, budget_min=6.5, energy="skip",  # basis target is a 2-CPU-core one
        notes=[
            "GPU preset, most important shapes first: roberta-base bs32x128 padded like a GLUE task (the paper's "
            "Table 3 setting), a LLaMA-2-7B-shaped model truncated to 4 layers (blocks 0 and 3 trained, the paper's "
            "every-3rd-block rule, MLP only) bs4x512 packed, the SmolLM2-135M shape (30 layers) bs8x512 packed, "
            "roberta-base bs32 unpadded, bert-base bs16 padded, roberta-base bs16 padded; random float32 weights "
            "(no TF32); 10 timed steps after 3 warm-up. Runs go repeat by repeat, so every shape gets one run of "
            "each method before the second, alternating repeat; runs that would overrun the budget are skipped.",
        ],
    ),
}


# --------------------------------------------------------------------------------------------- running
def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def device_name(device: str) -> tuple[str, str]:
    """(slug for file names, human description)."""
    if device == "cuda":
        import torch

        name = torch.cuda.get_device_name(0)
        return f"cuda-{_slug(name)}", name
    return "cpu", cpu_model()


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info(device: str, threads: int | None) -> dict:
    import torch

    info = {
        "device": device,
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads_per_run": threads or torch.get_num_threads(),
        "torch": torch.__version__,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "mkl": bool(torch.backends.mkl.is_available()),
    }
    try:
        import transformers

        info["transformers"] = transformers.__version__
    except ImportError:
        pass
    if device == "cuda":
        info["gpu"] = torch.cuda.get_device_name(0)
        info["cuda"] = torch.version.cuda
        info["gpu_memory_gb"] = round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                                text=True, timeout=10).stdout.strip()  # fmt: skip
        info["git_commit"] = commit or None
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", "sparsegrad", "experiments"],
                               cwd=ROOT, capture_output=True, text=True, timeout=10).stdout.split("\n")  # fmt: skip
        info["uncommitted"] = [line[3:] for line in dirty if line.strip()]
    except (OSError, subprocess.SubprocessError):
        info["git_commit"] = None
    return info


def worker_env(mmap_allocator: bool = True) -> dict:
    """The worker's environment. ``mmap_allocator``: every allocation of 256 KiB or more by mmap (see
    below); False leaves glibc's defaults, under which the process runs as a user's would."""
    env = dict(os.environ)
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("HF_DATASETS_OFFLINE", "1")
    env.setdefault("WANDB_MODE", "disabled")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    # Large allocations always by mmap, returned to the OS when freed: RSS then follows live memory.
    if mmap_allocator:
        env.setdefault("MALLOC_MMAP_THRESHOLD_", "262144")
    env["PYTHONPATH"] = str(ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


def run_worker(spec: dict, timeout_s: float, mmap_allocator: bool = True) -> dict:
    """One fresh worker process; returns its result or {'error': ...}."""
    with tempfile.NamedTemporaryFile("r", suffix=".json", delete=False) as fh:
        out_path = fh.name
    cmd = [sys.executable, "-m", "experiments._bench_worker", "--spec", json.dumps(spec), "--out", out_path]
    start = time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=ROOT, env=worker_env(mmap_allocator), capture_output=True, text=True,
                              timeout=timeout_s)  # fmt: skip
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout_s:.0f} s", "wall_s": time.perf_counter() - start}
    wall = time.perf_counter() - start
    try:
        if proc.returncode != 0:
            tail = "\n".join(proc.stderr.strip().splitlines()[-15:])
            return {"error": f"exit code {proc.returncode}: {tail}", "wall_s": wall}
        with open(out_path) as fh:
            result = json.load(fh)
        result["wall_s"] = wall
        return result
    finally:
        os.unlink(out_path)


def plan(preset: Preset) -> list[tuple[int, Shape, str]]:
    """Runs in order: repeat-major, then shape, then method (A B C ... A B C ...)."""
    return [(r, s, m) for r in range(preset.repeats) for s in preset.shapes for m in s.methods]


def execute(preset: Preset, args, on_record=None) -> dict:
    """Run the plan; ``on_record(outcome_so_far)`` after every run (the report is rewritten each time)."""
    runs = plan(preset)
    budget_s = preset.budget_min * 60
    start = time.perf_counter()
    cache_dir = tempfile.mkdtemp(prefix="sparsegrad-bench-")
    records: list[dict] = []
    skipped: list[dict] = []
    wall_by: dict = {}
    profiled: set = set()
    sweep = basis_sweep(preset, args, start, budget_s)
    try:
        for i, (rep, shape, method) in enumerate(runs, 1):
            elapsed = time.perf_counter() - start
            same_method = [w for (_, m_), w in wall_by.items() if m_ == method]
            expected = wall_by.get((shape.key, method), max(same_method, default=0.0))
            if elapsed + expected > budget_s:
                why = f"time budget: {elapsed / 60:.1f} of {preset.budget_min:g} min used, a run takes ~{expected:.0f} s"
                skipped.append({"shape": shape.key, "method": method, "repeat": rep, "why": why})
                print(f"[{i}/{len(runs)}] skip {shape.key} / {method} (repeat {rep + 1}): {why}", flush=True)
                continue
            cache_key = _slug(f"{shape.model}-{shape.layers}-{shape.batch}-{shape.pretrained}")
            spec = {
                "model": shape.model, "layers": shape.layers, "batch": shape.batch, "seq": shape.seq,
                "padding": shape.padding, "method": method, "device": args.device,
                "steps": preset.steps_override.get(method, preset.steps), "warmup": preset.warmup,
                "threads": args.threads, "seed": args.seed, "basis_steps": preset.basis_steps,
                "basis_micro_batch": preset.basis_micro_batch,
                "basis_cache": os.path.join(cache_dir, f"basis-{cache_key}.pt"),
                "pretrained": shape.pretrained, "block_factor": args.block_factor,
                "profile": method == preset.profile_method and shape.key not in profiled,
            }  # fmt: skip
            if spec["profile"]:
                profiled.add(shape.key)
            load_before = os.getloadavg()
            print(f"[{i}/{len(runs)}] {shape.key} / {method} (repeat {rep + 1}) ...", end=" ", flush=True)
            result = run_worker(spec, args.run_timeout)
            result.update(shape=shape.key, method=method, repeat=rep, load_before=load_before,
                          load_after=os.getloadavg())  # fmt: skip
            wall_by[(shape.key, method)] = max(wall_by.get((shape.key, method), 0.0), result.get("wall_s", 0.0))
            records.append(result)
            if "error" in result:
                print(f"FAILED ({result['error'].splitlines()[0]})", flush=True)
                print(result["error"], file=sys.stderr, flush=True)
            else:
                peak = result["peak_train_bytes"] if args.device == "cuda" else result["peak_above_loaded_bytes"]
                basis = result.get("basis") or {}
                extra = f", basis {basis['seconds']:.1f} s" if basis.get("seconds") is not None else ""
                print(f"{result['steps_per_s']:.3f} steps/s, peak {peak / MB:.0f} MB, optimizer state "
                      f"{result['optimizer_state_bytes'] / MB:.1f} MB{extra} ({result['wall_s']:.0f} s, "
                      f"load {load_before[0]:.1f})", flush=True)  # fmt: skip
            if on_record is not None:
                on_record({"records": records, "skipped": skipped, "seconds": time.perf_counter() - start,
                           "basis_sweep": sweep})  # fmt: skip
    finally:
        shutil.rmtree(cache_dir, ignore_errors=True)
    return {"records": records, "skipped": skipped, "seconds": time.perf_counter() - start, "basis_sweep": sweep}


def basis_sweep(preset: Preset, args, start: float, budget_s: float) -> list[dict]:
    """The basis estimation alone, per micro-batch setting (first shape with a basis): two fresh processes
    each, one under glibc's default allocator (its time is what a user sees) and one with every large
    allocation by mmap (its peak resident memory follows live memory, as in the training runs)."""
    shape = next((s for s in preset.shapes if any(m in ("sparsegrad", "leading_block") for m in s.methods)), None)
    out: list[dict] = []
    if shape is None:
        return out
    for micro in preset.basis_sweep:
        if time.perf_counter() - start > budget_s / 4:
            break
        spec = {"model": shape.model, "layers": shape.layers, "batch": shape.batch, "seq": shape.seq,
                "padding": shape.padding, "method": "sparsegrad", "device": args.device, "threads": args.threads,
                "seed": args.seed, "basis_steps": preset.basis_steps, "basis_micro_batch": micro or None,
                "pretrained": shape.pretrained, "basis_only": True}  # fmt: skip
        print(f"[basis] {shape.key}: micro-batch {micro or 'none'} ...", end=" ", flush=True)
        load = os.getloadavg()
        result = run_worker(spec, args.run_timeout, mmap_allocator=False)
        result.update(shape=shape.key, load=load)
        if "error" not in result:
            memory = run_worker(spec, args.run_timeout, mmap_allocator=True)
            result["memory_run"] = memory.get("basis") or {"error": memory.get("error")}
        out.append(result)
        if "error" in result:
            print(f"FAILED ({result['error'].splitlines()[0]})", flush=True)
        else:
            b, m = result["basis"], result["memory_run"]
            mem = f"{m['extra_peak_bytes'] / MB:.0f} MB" if "extra_peak_bytes" in m else "memory run failed"
            print(f"{b['seconds']:.1f} s, {mem} ({m.get('seconds', float('nan')):.1f} s with the mmap allocator)",
                  flush=True)  # fmt: skip
    return out


# ------------------------------------------------------------------------------------------- summary
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
                "peak_mb_runs": [r[peak_key] / MB for r in ok],
                "peak_above_loaded_mb": _median([r["peak_above_loaded_bytes"] for r in ok]) / MB,
                "optimizer_state_mb": _median([r["optimizer_state_bytes"] for r in ok]) / MB,
                "method_buffer_mb": _median([r["method_buffer_bytes"] for r in ok]) / MB,
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
    """Issue 6 targets for sparsegrad and the variant; None where a figure is missing."""
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


# ---------------------------------------------------------------------------- multiply-adds and bytes
def mlp_shapes(model: str, layers: int | None) -> dict:
    """(in, out) of the up and down MLP matrices and how many of each are trained."""
    shape = dict(MODEL_SHAPES[model])
    model_type = shape.pop("model_type")
    defaults = {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12}
    h = shape.get("hidden_size", defaults["hidden_size"])
    i = shape.get("intermediate_size", defaults["intermediate_size"])
    n = layers or shape.get("num_hidden_layers", defaults["num_hidden_layers"])
    fam = FAMILY["llama" if model_type == "llama" else model_type]
    nth = fam["every_nth_block"] or 1
    trained = len([b for b in range(n) if b % nth == 0])
    return {"up": (h, i), "down": (i, h), "matrices_per_group": trained, "family": fam}


def leading_block_dims(d_in: int, d_out: int, k: int, factor: float) -> tuple[int, int]:
    import math

    from sparsegrad.fixed_support import leading_block_shape

    return leading_block_shape(d_out, d_in, math.ceil(factor * k))


def macs_table(model: str, layers: int | None, tokens: int, rows_nonzero: float, block_factor: float) -> list[dict]:
    """Multiply-adds per training step of one MLP matrix under each formulation (kernels' cost model)."""
    from sparsegrad.fixed_support import block_gradient_macs
    from sparsegrad.kernels import cheapest_rotation_sides, macs_auto, macs_dense, macs_lora, macs_regular

    info = mlp_shapes(model, layers)
    fam = info["family"]
    out = []
    for group in ("up", "down"):
        d_in, d_out = info[group]
        k = max(1, round(fam["k"] * d_in * d_out))
        tb = max(1, round(rows_nonzero))
        r, c = leading_block_dims(d_in, d_out, k, block_factor)
        per_tok_in, per_tok_out = cheapest_rotation_sides(tb, d_in, d_out)
        full_refresh = d_out * d_in * (d_in + d_out)
        # incremental refresh after a k-sparse update, touched columns ~ all: k out + in min(in,out) out
        inc_refresh = min(k * d_in + d_out * min(d_out, k) * d_in, k * d_out + d_in * min(d_in, k) * d_out)
        lb_refresh = d_out * r * c + d_out * c * d_in if r <= c else r * c * d_in + d_out * r * d_in
        leading = (tokens * d_in * d_out + tb * d_in * d_out + min(block_gradient_macs(tb, d_in, d_out, r, c).values())
                   + lb_refresh)
        out.append({
            "group": group, "in": d_in, "out": d_out, "k": k, "tokens": tokens, "rows_nonzero": tb,
            "full": macs_dense(tokens, d_in, d_out),
            "lora": macs_lora(tokens, d_in, d_out, fam["lora_rank"]),
            "regular_dense_backward": macs_regular(tokens, d_in, d_out),
            "regular_sd": macs_regular(tokens, d_in, d_out, tb),
            "auto_full_refresh": macs_auto(tokens, d_in, d_out, tb, full_refresh),
            "auto_incremental_refresh": macs_auto(tokens, d_in, d_out, tb, min(inc_refresh, full_refresh)),
            "leading_block": leading, "block": f"{r}x{c}",
            "rotation_per_token": tb * (d_in * d_in + d_out * d_out),
            "rotation_once": d_out * d_in * (d_in + d_out),
            "auto_rotates": ("input per token" if per_tok_in else "input once/step") + ", "
                            + ("output per token" if per_tok_out else "output once/step"),
            "matrices": info["matrices_per_group"],
        })  # fmt: skip
    return out


def bytes_table(model: str, layers: int | None, block_factor: float, rank: int | None = None) -> list[dict]:
    """Bytes (float32) each method keeps for the trained MLP matrices beyond their weights, per group.

    Per matrix: full FT a gradient and two Adam moments; LoRA adapters + gradients + two moments;
    exact SparseGrad, storage "weight" (the library's default): W is the only weight (no W~, no cached
    copy), the updated-coordinates bit set (1 bit per entry), the k-sparse gradient (values + int64
    row/column indices: 20 bytes per entry) and 12 bytes of compact lazy-Adam state per touched
    coordinate (k after one step), plus one shared copy of u_in, u_out per group; storage "rotated":
    the same plus the cached W_eff (out·in floats); the leading block: B, its gradient, its compact
    state, and one shared copy of the basis columns per group. Transients (one layer's dense dL/dW~
    during its backward) are not counted.
    """
    info = mlp_shapes(model, layers)
    fam = info["family"]
    rank = rank or fam["lora_rank"]
    n_mat = info["matrices_per_group"]
    out = []
    for group in ("up", "down"):
        d_in, d_out = info[group]
        n = d_in * d_out
        k = max(1, round(fam["k"] * n))
        r, c = leading_block_dims(d_in, d_out, k, block_factor)
        basis = 4 * (d_in * d_in + d_out * d_out)
        out.append({
            "group": group, "in": d_in, "out": d_out, "matrices": n_mat,
            "full": n_mat * 4 * n * 3,
            "lora": n_mat * 4 * rank * (d_in + d_out) * 4,
            "sparsegrad": n_mat * (n // 8 + 20 * k + 12 * k) + basis,
            "sparsegrad_rotated": n_mat * (4 * n + n // 8 + 20 * k + 12 * k) + basis,
            "leading_block": n_mat * (4 * r * c * 2 + 12 * k) + 4 * (d_in * c + d_out * r),
            "block": f"{r}x{c}",
        })  # fmt: skip
    return out


# ------------------------------------------------------------------------------------------ markdown
def _f(v, fmt="{:.2f}"):
    return "–" if v is None else fmt.format(v)


def _mark(check):
    if check is None or check.get("met") is None:
        return "n/a"
    return "**met**" if check["met"] else "not met"


def to_markdown(report: dict) -> str:
    m = report["machine"]
    lines = [
        f"# Training speed and memory: {report['device_name']} ({report['device']})",
        "",
        f"Generated by `{report['command']}` on {report['date']} (git {m.get('git_commit')}"
        + (f", with uncommitted changes to {', '.join(m['uncommitted'])}" if m.get("uncommitted") else "") + "). Preset "
        f"`{report['preset']}`; {report['steps']} timed steps after {report['warmup']} warm-up per run, "
        f"{report['repeats']} repeats alternating methods; every run a fresh process; {report['seconds'] / 60:.1f} min.",
        "",
        f"Machine: {m['cpu_model']}, {m['cpu_count']} logical CPUs, {m['torch_threads_per_run']} torch threads per run; "
        f"torch {m['torch']}, transformers {m.get('transformers')}, Python {m['python']}"
        + (f"; GPU {m.get('gpu')} ({m.get('gpu_memory_gb')} GiB), CUDA {m.get('cuda')}" if m.get("gpu") else "") + ".",
        f"Load average (1, 5, 15 min) before: {', '.join(f'{x:.2f}' for x in report['load_before'])}; after: "
        f"{', '.join(f'{x:.2f}' for x in report['load_after'])}. "
        + ("**The machine was busy with other work** (load above its core count): absolute times are inflated; "
           "the alternating order spreads the noise over all methods, ratios are the figures to read."
           if max(report["load_before"][0], report["load_after"][0]) > (m["cpu_count"] or 1) else
           "The machine was otherwise quiet."),
        "",
    ]
    for note in report.get("notes", []):
        lines.append(f"- {note}")
    mem_def = ("CUDA allocator peak over the training steps (`max_memory_allocated`, reset before training; "
               "includes the model)" if report["device"] != "cpu" else
               "peak resident memory over the training steps (sampled every 2 ms) minus the resident memory once "
               "the model was loaded, i.e. what training adds: gradients, optimizer state, activations, the "
               "method's buffers")  # fmt: skip
    lines += [
        "- Step time = wall time of a training step (forward, backward, optimizer step), timed steps only"
        + (" (CUDA-synchronised)." if report["device"] != "cpu" else "; CPU s/step = the process's CPU time per step "
           "(all its threads), which other processes time-slicing the cores do not inflate: on a busy machine "
           "its ratios are the ones to read."),
        f"- Peak memory = {mem_def}. Optimizer state = bytes of the optimizer's state tensors after the last step. "
        "Method buffers = transition matrices, cached effective weights and masks held by the swapped layers.",
        "- Methods: " + "; ".join(f"`{k}`: {v}" for k, v in METHOD_NOTES.items()) + ".",
        "",
    ]
    for shape, block in report["summary"].items():
        rows = block["methods"]
        any_row = next((r for r in rows.values() if "error" not in r), None)
        lines += [f"## {shape}", ""]
        if any_row:
            toks = any_row["tokens_per_batch"]
            lines.append(
                f"{any_row['model_params'] / 1e6:.1f} M parameters ({any_row['model_source']}); real tokens per batch "
                f"{min(toks)}–{max(toks)} of {any_row['padded_tokens_per_batch']} "
                f"({statistics.mean(toks) / any_row['padded_tokens_per_batch'] * 100:.0f}% non-padding); sparse budget "
                f"k = {any_row['k'] * 100:.2f}% of each MLP matrix."
            )
            lines.append("")
        lines += [
            "| method | steps/s | s/step | time ×full | time ×LoRA | CPU s/step | CPU ×full | CPU ×LoRA | peak MB | peak ×full | "
            "peak ×LoRA | optimizer state MB | opt ×full | opt ×LoRA | method buffers MB | trainable params | runs |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for method in METHODS:
            row = rows.get(method)
            if row is None:
                continue
            if "error" in row:
                lines.append(f"| {method} | failed: {row['error'].splitlines()[0][:80]} |" + " |" * 15)
                continue
            lines.append(
                f"| {method} | {_f(row['steps_per_s'], '{:.3f}')} | {_f(row['step_s'])} | {_f(row['step_time_vs_full'])} | "
                f"{_f(row['step_time_vs_lora'])} | {_f(row.get('cpu_step_s'))} | {_f(row.get('cpu_time_vs_full'))} | "
                f"{_f(row.get('cpu_time_vs_lora'))} | {_f(row['peak_mb'], '{:.0f}')} | {_f(row['peak_vs_full'])} | "
                f"{_f(row['peak_vs_lora'])} | {_f(row['optimizer_state_mb'], '{:.1f}')} | {_f(row['optimizer_state_vs_full'])} | "
                f"{_f(row['optimizer_state_vs_lora'])} | {_f(row['method_buffer_mb'], '{:.1f}')} | "
                f"{row['trainable_params'] / 1e6:.2f} M | {row['runs']} |"
            )
        lines.append("")
        spread = [f"{m_}: " + ", ".join(f"{v:.3f}" for v in r["steps_per_s_runs"]) for m_, r in rows.items()
                  if "error" not in r and len(r["steps_per_s_runs"]) > 1]  # fmt: skip
        if spread:
            lines += ["Steps/s of each repeat (noise check): " + "; ".join(spread) + ".", ""]
        basis_rows = [(m_, r["basis"]) for m_, r in rows.items() if "error" not in r and r.get("basis")]
        for m_, b in basis_rows:
            micro = b.get("micro_batch")
            passes = (f"{b['steps']} batches of {b.get('batch', '?')} movie-length rows, one backward pass per "
                      f"{micro} rows" if micro else f"{b['steps']} backward passes on movie-length batches")
            lines += [
                f"Transition basis (estimated in the `{m_}` run, {passes}, "
                f"trimmed to their longest row, widths {min(b['padded_width'])}–{max(b['padded_width'])}): "
                f"{b['seconds']:.1f} s ({b['seconds_backward']:.1f} s backward + Gram, {b['seconds_eigh']:.1f} s "
                f"eigendecompositions), {b['extra_peak_bytes'] / MB:.0f} MB extra peak memory.",
                "",
            ]
        if block["targets"]:
            lines += ["| target | sparsegrad | leading_block |", "|---|---|---|"]
            names = {
                "step_time_vs_lora": "step time ≤ 1.1× LoRA", "step_time_vs_full": "step time ≤ 1.0× full FT",
                "cpu_time_vs_lora": "step CPU time ≤ 1.1× LoRA", "cpu_time_vs_full": "step CPU time ≤ 1.0× full FT",
                "peak_vs_lora": "peak memory ≤ 1.05× LoRA", "peak_vs_full": "peak memory ≤ 0.8× full FT",
                "basis_seconds": "basis estimation ≤ 15 s",
                "basis_extra_mb": "basis extra memory ≤ 300 MB",
                "sd_speedup_vs_regular": "sparse-by-dense ≥ 4× the 3-product layer",
            }  # fmt: skip
            for key, label in names.items():
                cells = []
                for method in ("sparsegrad", "leading_block"):
                    c = block["targets"].get(method, {}).get(key)
                    where = f", {c['source']}" if c is not None and c.get("source") else ""
                    cells.append("–" if c is None else f"{_f(c['value'])} ({_mark(c)}{where})")
                if any(cell != "–" for cell in cells):
                    lines.append(f"| {label} | {cells[0]} | {cells[1]} |")
            lines.append("")
        prof = next((r["profile"] for r in rows.values() if "error" not in r and r.get("profile")), None)
        if prof:
            lines += ["Profile of one `sparsegrad` training step (torch.profiler, self time, top operators):", "",
                      "| operator | calls | self ms |", "|---|---|---|"]  # fmt: skip
            lines += [f"| `{p['op']}` | {p['calls']} | {p['self_ms']:.0f} |" for p in prof[:15]]
            lines.append("")
    lines += basis_sweep_markdown(report.get("basis_sweep") or [], report["device"])
    lines += analysis_markdown(report)
    if report.get("energy_md"):
        lines += [report["energy_md"], ""]
    if report["skipped"]:
        lines += ["## Skipped runs", ""]
        lines += [f"- {s['shape']} / {s['method']} (repeat {s['repeat'] + 1}): {s['why']}" for s in report["skipped"]]
        lines.append("")
    return "\n".join(lines)


def basis_sweep_markdown(sweep: list[dict], device: str) -> list[str]:
    ok = [r for r in sweep if "error" not in r and r.get("basis")]
    if not ok:
        return []
    b0 = ok[0]["basis"]
    lines = [
        "## Basis estimation alone, by micro-batch",
        "",
        f"`{ok[0]['shape']}`: {b0['steps']} batches of {b0.get('batch', '?')} movie-length rows (trimmed to their "
        f"longest row; a micro-batch also to its own), each setting in a fresh process, the basis estimated from "
        f"scratch (`sparsegrad.estimate_basis(..., micro_batch=m)`: one backward pass and one gradient slice per "
        f"m rows). Each setting runs twice: the time is that of a process under glibc's default allocator (as "
        f"a user runs it); the extra memory is the "
        + ("CUDA allocator peak above the loaded model" if device.startswith("cuda")
           else "peak resident memory above the loaded model")
        + " in a second process where every allocation of 256 KiB or more is an mmap, returned to the system "
        "when freed, so resident memory follows live memory (the setting of the training runs; it makes many "
        f"allocations slower, hence its own time column). Targets: ≤ {TARGETS['basis_seconds']:g} s and "
        f"≤ {TARGETS['basis_extra_mb']:g} MB.",
        "",
        "| micro-batch | seconds | backward + Gram s | eigh s | extra peak MB | seconds, mmap allocator | "
        "both targets | load before |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in ok:
        b, m = r["basis"], r.get("memory_run") or {}
        extra = m.get("extra_peak_bytes")
        met = (extra is not None and b["seconds"] <= TARGETS["basis_seconds"]
               and extra / MB <= TARGETS["basis_extra_mb"])  # fmt: skip
        lines.append(
            f"| {b.get('micro_batch') or 'whole batch'} | {b['seconds']:.1f} | {b['seconds_backward']:.1f} | "
            f"{b['seconds_eigh']:.1f} | {_f(None if extra is None else extra / MB, '{:.0f}')} | "
            f"{_f(m.get('seconds'), '{:.1f}')} | {'**met**' if met else 'not met'} | {r['load'][0]:.2f} |"
        )
    lines += ["", "The top-k energy each setting's basis captures on held-out gradients is in the MiniLM section "
              "below (`HOSVD, basis from micro-batches`).", ""]  # fmt: skip
    return lines


def analysis_markdown(report: dict) -> list[str]:
    lines = [
        "## What bounds each formulation: multiply-adds and bytes",
        "",
        "Per MLP matrix and training step (forward + backward + weight refresh), from `sparsegrad.kernels`' cost "
        "model; T = tokens in the batch, T' = rows of dL/dY that are not entirely zero (padding and, in the last "
        "encoder layer, all but [CLS] are zero; the figure below uses the real-token count). Rotating per token "
        "costs T'(in² + out²); rotating the gradient once per step costs out·in·(in + out); the exact method's "
        "`auto` formulation picks, per side, whichever is cheaper (`cheapest_rotation_sides`). Each k-sparse "
        "step adds u_out·ΔW~·Rᵀ to W (storage 'weight') or to the cached W_eff (storage 'rotated'): about "
        "k·max(in,out) + min(in,out)²·max(in,out) when every row/column is touched ('incr.'); the rotated "
        "storage also recomputes W_eff = u_out W~ Rᵀ in full (out·in·(in+out), 'full refresh') every 100 steps "
        "or when W~ changes outside the optimizer.",
        "",
        "| shape | matrix | T | T' | full | LoRA | 3-product, dense bwd | 3-product, SD | exact auto, incr. refresh | "
        "exact auto, full refresh | leading block | block | auto rotates |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for shape in report["shape_defs"]:
        summary = report["summary"].get(shape["key"], {}).get("methods", {})
        row0 = next((r for r in summary.values() if "error" not in r), None)
        tokens = shape["batch"] * shape["seq"]
        real = statistics.mean(row0["tokens_per_batch"]) if row0 else tokens * (0.21 if shape["padding"] == "movie" else 1)
        for t in macs_table(shape["model"], shape["layers"], tokens, real, report["block_factor"]):
            g = 1e9
            lines.append(
                f"| {shape['key']} | {t['group']} {t['out']}×{t['in']} | {t['tokens']} | {t['rows_nonzero']} | "
                f"{t['full'] / g:.1f} G | {t['lora'] / g:.1f} G (×{t['lora'] / t['full']:.2f}) | "
                f"{t['regular_dense_backward'] / g:.1f} G (×{t['regular_dense_backward'] / t['full']:.2f}) | "
                f"{t['regular_sd'] / g:.1f} G (×{t['regular_sd'] / t['full']:.2f}) | "
                f"{t['auto_incremental_refresh'] / g:.1f} G (×{t['auto_incremental_refresh'] / t['full']:.2f}) | "
                f"{t['auto_full_refresh'] / g:.1f} G (×{t['auto_full_refresh'] / t['full']:.2f}) | "
                f"{t['leading_block'] / g:.1f} G (×{t['leading_block'] / t['full']:.2f}) | {t['block']} | {t['auto_rotates']} |"
            )
    lines += [
        "",
        "Bytes each method keeps for the trained MLP matrices of a group beyond their weights (float32; see "
        "`bytes_table`): full FT a gradient and two Adam moments per weight; LoRA its adapters, their gradients "
        "and moments; `sparsegrad` = the exact layer as the library builds it (storage 'weight'): W is the only "
        "stored weight (W~ never stored; each k-sparse step applied as u_out·ΔW~·Rᵀ), a bit per entry for the "
        "updated-coordinates set, the k-sparse gradient (20 bytes per entry), 12 bytes of compact lazy-Adam "
        "state per touched coordinate (k after one step; it grows to the union of touched coordinates) and one "
        "shared u_in, u_out per group; `sparsegrad rotated` = storage 'rotated', the same plus a cached "
        "W_eff per matrix (out·in); `leading block` = the variant. Transients (one layer's dense dL/dW~ "
        "during its backward) are not counted.",
        "",
        "| model | group (matrices) | full FT | LoRA | sparsegrad | sparsegrad rotated | leading block | block |",
        "|---|---|---|---|---|---|---|---|",
    ]
    seen = set()
    for shape in report["shape_defs"]:
        key = (shape["model"], shape["layers"])
        if key in seen:
            continue
        seen.add(key)
        for b in bytes_table(shape["model"], shape["layers"], report["block_factor"]):
            lines.append(
                f"| {shape['model']}{' (' + str(shape['layers']) + ' layers)' if shape['layers'] else ''} | {b['group']} "
                f"{b['out']}×{b['in']} (×{b['matrices']}) | {b['full'] / MB:.0f} MB | {b['lora'] / MB:.1f} MB | "
                f"{b['sparsegrad'] / MB:.0f} MB | {b['sparsegrad_rotated'] / MB:.0f} MB | {b['leading_block'] / MB:.0f} MB | "
                f"{b['block']} |"
            )
    lines.append("")
    return lines


# ------------------------------------------------------------------------------------------------ main
def energy_section(mode: str, out_dir: Path, device: str) -> tuple[str | None, dict | None]:
    from experiments import _bench_energy

    cached = out_dir / "energy_minilm.json"
    if mode == "skip":
        return None, None
    if mode == "cached":
        if not cached.exists():
            return None, None
        result = json.loads(cached.read_text())
        return _bench_energy.to_markdown(result), result
    if mode == "auto":
        try:
            from sparsegrad.suite.assets import is_ready

            if not (is_ready("minilm") and is_ready("movie_reviews")):
                return None, None
        except Exception:  # noqa: BLE001 - no asset cache: nothing to measure on
            return None, None
    print("[energy] measuring where the top-k of dL/dW~ sits (MiniLM, movie sentences) ...", flush=True)
    cmd = [sys.executable, "-m", "experiments._bench_energy", "--json", str(cached), "--eval-batches", "2"]
    proc = subprocess.run(cmd, cwd=ROOT, env=worker_env(), capture_output=True, text=True)
    if proc.returncode != 0 or not cached.exists():
        print(f"[energy] failed: {proc.stderr.strip().splitlines()[-1:]}", flush=True)
        return None, None
    result = json.loads(cached.read_text())
    return _bench_energy.to_markdown(result), result


def build_preset(args) -> tuple[str, Preset]:
    name = args.preset or ("gpu" if args.device == "cuda" else "cpu")
    if name not in PRESETS:
        raise SystemExit(f"unknown preset {name!r}; valid: {', '.join(PRESETS)}")
    base = PRESETS[name]
    preset = Preset(shapes=[Shape(**asdict(s)) for s in base.shapes], steps=base.steps, warmup=base.warmup,
                    repeats=base.repeats, budget_min=base.budget_min, basis_steps=base.basis_steps,
                    basis_micro_batch=base.basis_micro_batch, basis_sweep=list(base.basis_sweep),
                    energy=base.energy, profile_method=base.profile_method,
                    steps_override=dict(base.steps_override), notes=list(base.notes))  # fmt: skip
    if args.models or args.batch_sizes or args.paddings or args.seq or args.layers:
        models = args.models.split(",") if args.models else sorted({s.model for s in preset.shapes})
        bss = [int(x) for x in args.batch_sizes.split(",")] if args.batch_sizes else sorted({s.batch for s in preset.shapes})
        pads = args.paddings.split(",") if args.paddings else ["movie"]
        seq = args.seq or 128
        preset.shapes = [Shape(m, b, seq, p, layers=args.layers, pretrained=m in ("minilm", "smollm2"))
                         for m in models for b in bss for p in pads]  # fmt: skip
        preset.notes = [f"Custom grid: models {models}, batch sizes {bss}, paddings {pads}, sequence {seq}."]
        preset.steps_override = {}
    if args.methods:
        methods = args.methods.split(",")
        bad = [m for m in methods if m not in METHODS]
        if bad:
            raise SystemExit(f"unknown method(s) {bad}; valid: {', '.join(METHODS)}")
        for s in preset.shapes:
            s.methods = [m for m in methods]
    if args.basis_sweep is not None:
        preset.basis_sweep = [int(x) for x in args.basis_sweep.split(",") if x.strip()]
    if args.basis_micro_batch is not None:
        preset.basis_micro_batch = args.basis_micro_batch or None
    for attr in ("steps", "warmup", "repeats", "basis_steps"):
        if getattr(args, attr) is not None:
            setattr(preset, attr, getattr(args, attr))
    if args.steps is not None:
        preset.steps_override = {}
    if args.budget_min is not None:
        preset.budget_min = args.budget_min
    if args.energy is not None:
        preset.energy = args.energy
    if args.no_profile:
        preset.profile_method = None
    return name, preset


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Benchmark training speed and memory of every method (issue 6).")
    p.add_argument("--preset", choices=sorted(PRESETS), default=None, help="default: cpu, or gpu with --device cuda")
    p.add_argument("--device", choices=["cpu", "cuda"], default=None, help="default: cuda when available")
    p.add_argument("--models", default=None, help=f"comma list of {', '.join(MODEL_SHAPES)} (overrides the preset grid)")
    p.add_argument("--layers", type=int, default=None, help="truncate the models to this many layers")
    p.add_argument("--batch-sizes", default=None, help="comma list, e.g. 16,32")
    p.add_argument("--seq", type=int, default=None, help="sequence length (default 128)")
    p.add_argument("--paddings", default=None, help="comma list of movie (real sentence lengths, padded) and none")
    p.add_argument("--methods", default=None, help=f"comma list of {', '.join(METHODS)}")
    p.add_argument("--steps", type=int, default=None, help="timed steps per run")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps per run")
    p.add_argument("--repeats", type=int, default=None, help="alternating repeats of every method")
    p.add_argument("--basis-steps", type=int, default=None, help="batches for the transition basis")
    p.add_argument("--basis-micro-batch", type=int, default=None,
                   help="rows per backward pass of the basis estimation (0: whole batches; default 4)")
    p.add_argument("--basis-sweep", default=None,
                   help="comma list of micro-batch sizes to time the basis estimation alone with (0: whole "
                        "batches; empty: none); default per preset")
    p.add_argument("--budget-min", type=float, default=None, help="skip runs that would end after this many minutes")
    p.add_argument("--threads", type=int, default=None, help="torch threads per run (default: all cores)")
    p.add_argument("--block-factor", type=float, default=2.0, help="leading_block: block of factor*k entries")
    p.add_argument("--energy", choices=["auto", "run", "cached", "skip"], default=None,
                   help="the top-k location measurement (MiniLM asset needed)")
    p.add_argument("--no-profile", action="store_true", help="skip the profiled step")
    p.add_argument("--run-timeout", type=float, default=1800.0, help="seconds before a run is abandoned")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out-dir", default=None, help="default: $OUT if set, else results/bench")
    p.add_argument("--tag", default=None, help="report name suffix: results/bench/<device>-<tag>.md")
    p.add_argument("--render", default=None, metavar="JSON",
                   help="only rebuild the .md (and summary) of a saved report from its run records")
    return p.parse_args(argv)


def render(path: str) -> Path:
    """Rebuild a report's summary and markdown from its run records (a pure function of the records)."""
    path = Path(path)
    report = json.loads(path.read_text())
    report["summary"] = summarize(report["records"], "cuda" if report["device"].startswith("cuda") else "cpu",
                                  report.get("basis_sweep"))  # fmt: skip
    path.write_text(json.dumps(report, indent=1, default=str))
    md_path = path.with_suffix(".md")
    md_path.write_text(to_markdown(report))
    return md_path


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.render:
        print(f"wrote {render(args.render)}")
        return 0
    if args.device is None:
        try:
            import torch

            args.device = "cuda" if torch.cuda.is_available() else "cpu"
        except ImportError:
            args.device = "cpu"
    name, preset = build_preset(args)
    out_dir = Path(args.out_dir or os.environ.get("OUT") or ROOT / "results" / "bench")
    out_dir.mkdir(parents=True, exist_ok=True)
    slug, human = device_name(args.device)
    if args.tag:
        slug += f"-{_slug(args.tag)}"
    elif name != ("gpu" if args.device == "cuda" else "cpu") or args.models or args.methods:
        slug += f"-{name}" if not (args.models or args.methods) else "-custom"  # keep the default report intact
    load_before = os.getloadavg()
    n_runs = len(plan(preset))
    print(f"benchmark preset {name} on {human}: {len(preset.shapes)} shapes, {n_runs} runs, budget "
          f"{preset.budget_min:g} min; load {load_before[0]:.2f}", flush=True)  # fmt: skip

    def write(outcome, energy_md=None, energy=None, final=False):
        report = {
            "device": slug,
            "device_name": human,
            "preset": name,
            "command": "python -m experiments.benchmark " + " ".join(sys.argv[1:] if argv is None else argv),
            "date": _dt.datetime.now(_dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
            "machine": machine_info(args.device, args.threads),
            "load_before": list(load_before),
            "load_after": list(os.getloadavg()),
            "steps": preset.steps,
            "warmup": preset.warmup,
            "repeats": preset.repeats,
            "steps_override": preset.steps_override,
            "block_factor": args.block_factor,
            "notes": preset.notes + ([] if final else ["**Partial report: the benchmark is still running (or was stopped).**"]),
            "targets": TARGETS,
            "shape_defs": [{**asdict(s), "key": s.key} for s in preset.shapes],
            "summary": summarize(outcome["records"], args.device, outcome.get("basis_sweep")),
            "records": outcome["records"],
            "skipped": outcome["skipped"],
            "basis_sweep": outcome.get("basis_sweep", []),
            "seconds": outcome["seconds"],
            "energy": energy,
            "energy_md": energy_md,
        }
        (out_dir / f"{slug}.json").write_text(json.dumps(report, indent=1, default=str))
        (out_dir / f"{slug}.md").write_text(to_markdown(report))

    outcome = execute(preset, args, on_record=write)
    energy_md, energy = energy_section(preset.energy, out_dir, args.device)
    write(outcome, energy_md, energy, final=True)
    for shape, block in summarize(outcome["records"], args.device, outcome.get("basis_sweep")).items():
        for method, checks in block["targets"].items():
            for key, c in checks.items():
                state = "n/a" if c["met"] is None else ("met" if c["met"] else "NOT met")
                print(f"target {shape} / {method} / {key}: {_f(c['value'])} vs {c['bound']:g}: {state}", flush=True)
    print(f"wrote {out_dir / (slug + '.md')} and .json ({outcome['seconds'] / 60:.1f} min)", flush=True)
    failed = [r for r in outcome["records"] if "error" in r]
    return 1 if failed and len(failed) == len(outcome["records"]) else 0


if __name__ == "__main__":
    sys.exit(main())
