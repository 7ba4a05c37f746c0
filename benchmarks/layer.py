"""Layer benchmark: one BERT-base MLP pair (768 -> 3072 -> GELU -> 768), forward + backward + step.

Each method runs in a fresh Python process (so peak memory is its own) on the same inputs: 16 x 128
tokens, about half of them padding (the loss is masked there, so those rows of dL/dY are zero), the
input requiring grad (so dL/dx is computed, as inside a network). Times are the median of N steps
after a warm-up; memory is the peak resident set size (CPU: VmHWM after resetting it via
/proc/self/clear_refs) or peak CUDA allocation (GPU), above what the process held after building the
layers, inputs and optimizer — i.e. what the training steps add (activations, gradients, optimizer
state, temporaries). Everything is also given as a ratio to the dense Linear measured in the same run.

    python -m experiments.bench_layer            # writes results/bench/layer.md and layer.json (make bench-layer)
    python -m experiments.bench_layer --quick    # a smoke run (fewer steps, smaller batch)

Each memory measurement is a ``python -m benchmarks.layer --worker METHOD`` process.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.layer_report import METHODS  # the labels live with the report

_BASIS_CACHE: dict = {}


def _build(method: str, args, device):
    import torch
    from torch import nn

    import sparsegrad

    torch.manual_seed(0)

    class MLPPair(nn.Module):
        def __init__(self):
            super().__init__()
            self.up = nn.Linear(args.hidden, args.intermediate)
            self.act = nn.GELU()
            self.down = nn.Linear(args.intermediate, args.hidden)

        def forward(self, x):
            return self.down(self.act(self.up(x)))

    model = MLPPair().to(device)
    patterns = {"up": r"^up$", "down": r"^down$"}
    common = {"target_patterns": patterns, "train_non_mlp": False, "k": args.k}
    basis = None
    if method == "dense":
        cfg = {"name": "full", **common}
    elif method == "lora":
        cfg = {"name": "lora", **common, "lora_rank": args.lora_rank}
    elif method.startswith("meprop"):
        cfg = {"name": "meprop", **common, "meprop_mode": method.split("_")[1],
               "meprop_k_per_row": args.meprop_k_per_row}  # fmt: skip
    else:
        formulation = "regular" if "regular" in method else "auto"
        cfg = {"name": "sparsegrad", **common, "formulation": formulation,
               "storage": "rotated" if ("rotated" in method or formulation == "regular") else "weight",
               "sparse_by_dense": not method.endswith(("regular", "nosd"))}  # fmt: skip
        if "basis" not in _BASIS_CACHE:  # one random basis per process, shared by the variants
            targets = sparsegrad.find_targets(model, patterns)
            _BASIS_CACHE["basis"] = sparsegrad.random_basis(targets, model, seed=0)
        basis = _BASIS_CACHE["basis"]
    model = sparsegrad.apply_method(model, cfg, basis=basis)
    sparse_state = "compact" if method.endswith("compact") else args.sparse_state
    opt = sparsegrad.build_optimizer(model, lr=1e-4, schedule="constant", sparse_state=sparse_state)

    gen = torch.Generator().manual_seed(1)
    x = torch.randn(args.batch, args.seq, args.hidden, generator=gen).to(device).requires_grad_(True)
    target = torch.randn(args.batch, args.seq, args.hidden, generator=gen).to(device)
    # lengths uniform in [1, 2 (1 - pad) seq]: about a fraction `pad` of the positions is padding
    lengths = torch.full((args.batch,), args.seq)
    if args.pad_fraction > 0:
        span = 2 * (1 - args.pad_fraction) * args.seq
        lengths = (torch.rand(args.batch, generator=gen) * span).clamp(1, args.seq).long()
    mask = (torch.arange(args.seq)[None, :] < lengths[:, None]).to(device)
    return model, opt, x, target, mask


def _make_step(method: str, args, device):
    """Build one method and return (step function, optimizer, number of non-padding tokens)."""
    import torch

    model, opt, x, target, mask = _build(method, args, device)
    weight = mask[..., None].to(x.dtype)
    n_tokens = float(mask.sum())

    def step():
        x.grad = None
        y = model(x)
        loss = ((y - target) ** 2 * weight).sum() / n_tokens
        loss.backward()
        opt.step()
        opt.zero_grad()
        if device.type == "cuda":
            torch.cuda.synchronize()

    return step, opt, int(n_tokens)


def _memory_worker(method: str, args) -> dict:
    """Fresh process: peak memory of the training steps of one method (plus its own step times)."""
    import torch

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    step, opt, n_tokens = _make_step(method, args, device)
    baseline = _current_memory(device)
    _reset_peak(device)
    times = []
    for _ in range(args.mem_steps):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    peak = _peak_memory(device)
    return {
        "method": method,
        "peak_mem_delta_bytes": peak - baseline if peak is not None else None,
        "optimizer_state_bytes": opt.state_bytes(),
        "memory_run_times_s": times,
        "non_padding_tokens": n_tokens,
    }


def _time_all(methods: list[str], args) -> dict[str, list[float]]:
    """All methods in one process, stepped round-robin (rotating the order every round), so that load
    changes on a shared machine hit every method alike. Returns the timed steps per method."""
    import torch

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    steps = {m: _make_step(m, args, device)[0] for m in methods}
    times: dict[str, list[float]] = {m: [] for m in methods}
    for r in range(args.warmup + args.steps):
        order = methods[r % len(methods):] + methods[: r % len(methods)]
        for m in order:
            start = time.perf_counter()
            steps[m]()
            if r >= args.warmup:
                times[m].append(time.perf_counter() - start)
    return times


def _proc_status_bytes(field: str) -> int | None:
    """A memory field of /proc/self/status (``VmRSS``, ``VmHWM``) in bytes, None if absent."""
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    return None


def _current_memory(device) -> int:
    import torch

    if device.type == "cuda":
        return torch.cuda.memory_allocated(device)
    return _proc_status_bytes("VmRSS") or 0


def _reset_peak(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    try:
        with open("/proc/self/clear_refs", "w") as fh:  # "5" resets VmHWM to the current RSS
            fh.write("5")
    except OSError:
        pass


def _peak_memory(device) -> int | None:
    import torch

    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return _proc_status_bytes("VmHWM")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--quick", action="store_true", help="smoke run: 2 steps, batch 4")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--mem-steps", type=int, default=2, help="steps per memory-measuring process")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--hidden", type=int, default=768)
    parser.add_argument("--intermediate", type=int, default=3072)
    parser.add_argument("--pad-fraction", type=float, default=0.5)
    parser.add_argument("--k", type=int, default=28000, help="gradient entries kept per linear (paper: 28000)")
    parser.add_argument("--lora-rank", type=int, default=7)
    parser.add_argument("--meprop-k-per-row", type=float, default=0.05)
    parser.add_argument("--sparse-state", default="dense", choices=["dense", "compact"],
                        help="optimizer state layout of the sparse methods (the *_compact row always uses compact)")
    parser.add_argument("--methods", nargs="*", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--out", default="results/bench")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--from-json", default=None, help="re-render layer.md from an existing layer.json")
    args = parser.parse_args(argv)
    from benchmarks import layer_report

    if args.from_json:
        record = json.loads(Path(args.from_json).read_text())
        saved = argparse.Namespace(**record["args"])
        layer_report.render(record, saved, Path(args.out))
        print(f"wrote {Path(args.out) / 'layer.md'}")
        return
    raw = list(argv if argv is not None else sys.argv[1:])
    args.argv = [a for i, a in enumerate(raw) if not a.startswith("--out") and (i == 0 or raw[i - 1] != "--out")]
    if args.device is None:
        import torch

        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.quick:
        args.steps, args.warmup, args.batch = min(args.steps, 2), min(args.warmup, 1), min(args.batch, 4)
        args.mem_steps = 1

    if args.worker:
        print("RESULT " + json.dumps(_memory_worker(args.worker, args)), flush=True)
        return

    passthrough = _strip_methods(list(argv if argv is not None else sys.argv[1:])) + ["--device", args.device]
    load_before = os.getloadavg()
    results = []
    for method in args.methods:  # memory: one fresh process per method
        cmd = [sys.executable, "-m", "benchmarks.layer", *passthrough, "--worker", method]
        env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
        line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
        if proc.returncode != 0 or not line:
            sys.stderr.write(proc.stdout + proc.stderr)
            raise SystemExit(f"benchmark worker for {method!r} failed (exit {proc.returncode})")
        result = json.loads(line[-1][len("RESULT "):])
        print(f"{method:24s} peak +{layer_report.fmt_bytes(result['peak_mem_delta_bytes'])} MiB", flush=True)
        results.append(result)
    n_rows = results[0]["non_padding_tokens"]
    times = _time_all(args.methods, args)  # time: all methods interleaved in this process
    for result in results:
        t = times[result["method"]]
        result.update(median_s=statistics.median(t), min_s=min(t), times_s=t)
        print(f"{result['method']:24s} {1000 * result['median_s']:8.0f} ms/step (median of {len(t)})", flush=True)
    args.load_avg = {"before": load_before, "after": os.getloadavg()}
    layer_report.write(results, args, Path(args.out), n_rows)
    print(f"wrote {Path(args.out) / 'layer.md'} and layer.json")


def _strip_methods(argv: list[str]) -> list[str]:
    out, skip = [], False
    for a in argv:
        if a == "--methods":
            skip = True
            continue
        if skip and not a.startswith("--"):
            continue
        skip = False
        out.append(a)
    return out


if __name__ == "__main__":
    main()
