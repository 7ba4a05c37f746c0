"""Running a preset: every run a fresh worker process, in plan order, within the preset's time budget.

:func:`execute` runs the plan of :mod:`benchmarks.grid` (skipping runs that would overrun the budget
and calling back after each run so the report is rewritten as it goes); :func:`basis_sweep` times the
basis estimation alone per micro-batch setting; :func:`run_worker` is one ``python -m
benchmarks.worker`` process.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

from benchmarks.grid import Preset, plan
from benchmarks.machine import ROOT, slug
from benchmarks.measure import MB


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
    cmd = [sys.executable, "-m", "benchmarks.worker", "--spec", json.dumps(spec), "--out", out_path]
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
            cache_key = slug(f"{shape.model}-{shape.layers}-{shape.batch}-{shape.pretrained}-{shape.dtype}")
            spec = {
                "model": shape.model, "layers": shape.layers, "batch": shape.batch, "seq": shape.seq,
                "padding": shape.padding, "method": method, "device": args.device,
                "steps": preset.steps_override.get(method, preset.steps), "warmup": preset.warmup,
                "threads": args.threads, "seed": args.seed, "basis_steps": preset.basis_steps,
                "basis_micro_batch": preset.basis_micro_batch,
                "basis_cache": os.path.join(cache_dir, f"basis-{cache_key}.pt"),
                "pretrained": shape.pretrained, "block_factor": args.block_factor, "dtype": shape.dtype,
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
        result = run_worker({**spec, "gauge_basis": False}, args.run_timeout, mmap_allocator=False)  # its time
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

