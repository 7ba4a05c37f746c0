"""The command line of the whole-model benchmark (``make bench``, ``python -m experiments.benchmark``).

    python -m experiments.benchmark                      # --preset cpu on a CPU machine, gpu with CUDA
    python -m experiments.benchmark --preset quick       # MiniLM, a few minutes
    python -m experiments.benchmark --preset gpu --device cuda --out-dir "$OUT"
    python -m experiments.benchmark --models bert-base --batch-sizes 16 --paddings movie \
        --methods full,lora,sparsegrad --steps 3 --repeats 2
    python -m experiments.benchmark --render results/bench/cpu.json   # rebuild the .md from its records

Every run is a fresh process (:mod:`benchmarks.worker`) for one method on one shape (model, batch,
sequence length, padding); the runs of a shape alternate methods (A B C A B C ...) so a noisy machine
treats them alike. Per run: training steps/s after warm-up, peak training memory (CUDA allocator peak;
on CPU peak RSS above the loaded model), optimizer-state bytes, the method's own buffers, and for
SparseGrad the cost of estimating the transition basis. Results go to ``results/bench/<device>.md`` and
``.json``, every figure also as a ratio to full fine-tuning and to LoRA of the same shape, with the speed
and memory targets checked (:mod:`benchmarks.summary`), a multiply-add / bytes analysis of each
formulation (:mod:`benchmarks.costs`) and, where the MiniLM asset is present, the measurement of where
the top-k of dL/dW~ sits (:mod:`benchmarks.energy`).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import sys
from dataclasses import asdict
from pathlib import Path

from benchmarks.grid import PRESETS, build_preset, plan
from benchmarks.machine import ROOT, device_name, machine_info, slug
from benchmarks.measure import CUDA_GAUGE, LIVE_GAUGE
from benchmarks.methods import ROWS
from benchmarks.report import fmt, to_markdown
from benchmarks.runner import execute
from benchmarks.shapes import MODEL_SHAPES
from benchmarks.summary import TARGETS, summarize


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Benchmark training speed and memory of every method.")
    p.add_argument("--preset", choices=sorted(PRESETS), default=None, help="default: cpu, or gpu with --device cuda")
    p.add_argument("--device", choices=["cpu", "cuda"], default=None, help="default: cuda when available")
    p.add_argument("--models", default=None, help=f"comma list of {', '.join(MODEL_SHAPES)} (overrides the preset grid)")
    p.add_argument("--layers", type=int, default=None, help="truncate the models to this many layers")
    p.add_argument("--batch-sizes", default=None, help="comma list, e.g. 16,32")
    p.add_argument("--seq", type=int, default=None, help="sequence length (default 128)")
    p.add_argument("--paddings", default=None, help="comma list of movie (real sentence lengths, padded) and none")
    p.add_argument("--methods", default=None, help=f"comma list of {', '.join(ROWS)}")
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
    name_slug, human = device_name(args.device)
    if args.tag:
        name_slug += f"-{slug(args.tag)}"
    elif name != ("gpu" if args.device == "cuda" else "cpu") or args.models or args.methods:
        name_slug += f"-{name}" if not (args.models or args.methods) else "-custom"  # keep the default report intact
    load_before = os.getloadavg()
    n_runs = len(plan(preset))
    print(f"benchmark preset {name} on {human}: {len(preset.shapes)} shapes, {n_runs} runs, budget "
          f"{preset.budget_min:g} min; load {load_before[0]:.2f}", flush=True)  # fmt: skip

    def write(outcome, energy_md=None, energy_result=None, final=False):
        report = {
            "device": name_slug,
            "device_name": human,
            "memory_gauge": CUDA_GAUGE if args.device == "cuda" else LIVE_GAUGE,
            "preset": name,
            "command": " ".join(["python -m experiments.benchmark", *(sys.argv[1:] if argv is None else argv)]),
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
            "energy": energy_result,
            "energy_md": energy_md,
        }
        (out_dir / f"{name_slug}.json").write_text(json.dumps(report, indent=1, default=str))
        (out_dir / f"{name_slug}.md").write_text(to_markdown(report))

    outcome = execute(preset, args, on_record=write)
    from benchmarks import energy  # torch at import: only once the runs are done

    energy_md, energy_result = energy.section(preset.energy, out_dir)
    write(outcome, energy_md, energy_result, final=True)
    for shape, block in summarize(outcome["records"], args.device, outcome.get("basis_sweep")).items():
        for method, checks in block["targets"].items():
            for key, c in checks.items():
                state = "n/a" if c["met"] is None else ("met" if c["met"] else "NOT met")
                print(f"target {shape} / {method} / {key}: {fmt(c['value'])} vs {c['bound']:g}: {state}", flush=True)
    print(f"wrote {out_dir / (name_slug + '.md')} and .json ({outcome['seconds'] / 60:.1f} min)", flush=True)
    failed = [r for r in outcome["records"] if "error" in r]
    return 1 if failed and len(failed) == len(outcome["records"]) else 0


if __name__ == "__main__":
    sys.exit(main())
