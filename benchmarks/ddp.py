"""Data-parallel rows of ``make bench``: full FT, LoRA and SparseGrad in both data-parallel modes under
DistributedDataParallel.

    python -m benchmarks.ddp                       # 2 gloo processes on CPU, BERT-base shape, 16x64 and 16x128
    python -m benchmarks.ddp --steps 8 --shapes 16x128:none --hidden 256 --layers 4

Each method runs in 2 fresh processes (``torch.multiprocessing.spawn``, gloo on 127.0.0.1, one thread
each), each process taking half of every global batch. SparseGrad runs in both modes:
``topk_at="step"`` (dense gradient through the all-reduce, rotation and top-k once per optimizer
step: one process on the whole batch) and ``topk_at="backward"`` (each process keeps its own top-k in
its backward pass and the optimizer all-gathers only those entries: one process accumulating the
processes' micro-batches; :mod:`sparsegrad.data_parallel`). Measured per optimizer step, after
warm-up steps, as the median over the timed steps of rank 0:

* wall seconds and CPU seconds of the process (``time.process_time``, all its threads);
* bytes each process puts into the collectives: DDP's gradient buckets (counted by a communication
  hook, split into the MLP matrices and the rest) plus the sparse exchange's count header, indices
  and values (``optimizer.exchange.last_bytes_sent``, all MLP matrices). Buffers are not included
  (``forward_sync_buffers=False``, ``broadcast_buffers=False`` before torch 2.13; under
  ``topk_at="backward"`` DDP leaves the layers' buffers alone anyway); the bytes DDP's default
  per-forward buffer broadcast would add are listed.

Each batch shape (``--shapes``, rows x tokens, unpadded or padded to the lengths of the movie-review
sentences like ``make bench``'s padded shapes) is its own table. Ratios are to full FT under the same DDP
setting and shape. Writes ``results/bench/ddp.md`` and ``ddp.json``, with
the MLP bytes per step at the BERT-base and LLaMA-2-7B shapes by calculation, from the message sizes
of the same code (:func:`sparsegrad.data_parallel.exchange_message_bytes`).
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import platform
import socket
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
WORLD = 2
# BERT-base 16 x 64 unpadded; 16 x 128 padded to movie-review lengths and unpadded, the two shapes of make
# bench's one-process rows
DEFAULT_SHAPES = "16x64:none,16x128:movie,16x128:none"
METHODS = {
    "full": {"name": "full"},
    "lora": {"name": "lora", "lora_rank": 8},
    "sparsegrad_step": {"name": "sparsegrad", "k": 0.01, "topk_at": "step"},
    "sparsegrad_backward": {"name": "sparsegrad", "k": 0.01, "topk_at": "backward"},
}
LABELS = {
    "sparsegrad_step": "sparsegrad, topk_at='step' (dense all-reduce)",
    "sparsegrad_backward": "sparsegrad, topk_at='backward' (sparse exchange)",
}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _model(opts: dict):
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=30522, hidden_size=opts["hidden"], num_hidden_layers=opts["layers"],
                     num_attention_heads=max(1, opts["hidden"] // 64), intermediate_size=4 * opts["hidden"],
                     num_labels=2, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)  # fmt: skip
    return BertForSequenceClassification(cfg)


def _lengths(opts: dict, step: int) -> list[int]:
    """The rows' token counts of ``step``'s global batch: all ``seq`` unpadded, else movie-sentence lengths."""
    if opts.get("padding", "none") == "none":
        return [opts["seq"]] * opts["batch"]
    from benchmarks.shapes import movie_lengths

    return movie_lengths(opts["batch"], opts["seq"], 1000 + step)


def _batch(opts: dict, step: int, rank: int | None) -> dict:
    """Process ``rank``'s half of the global batch of ``step`` (the whole batch for ``rank=None``)."""
    gen = torch.Generator().manual_seed(1000 + step)
    rows, seq = opts["batch"], opts["seq"]
    ids = torch.randint(1000, 30000, (rows, seq), generator=gen)
    labels = torch.randint(0, 2, (rows,), generator=gen)
    mask = (torch.arange(seq)[None, :] < torch.tensor(_lengths(opts, step))[:, None]).long()
    batch = {"input_ids": ids.masked_fill(mask == 0, 0), "attention_mask": mask, "labels": labels}
    if rank is None:
        return batch
    half = rows // WORLD
    return {key: value[rank * half : (rank + 1) * half] for key, value in batch.items()}


def real_tokens_per_process(opts: dict) -> float:
    """Mean tokens that are not padding in one process's half of a timed step's batch."""
    steps = range(opts["warmup"], opts["warmup"] + opts["steps"])
    return sum(sum(_lengths(opts, s)) for s in steps) / len(steps) / WORLD


def _mlp_matrix_params(model, name: str) -> list:
    """The trained parameters that stand for the MLP matrix ``name``: its weight, or its LoRA adapters."""
    module = model.get_submodule(f"base_model.model.{name}") if hasattr(model, "peft_config") else model.get_submodule(name)
    return [p for n, p in module.named_parameters() if not n.endswith("bias") and p.requires_grad]


def _worker(rank: int, port: int, method: str, opts: dict, out: str) -> None:
    import torch.distributed as dist
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
    from torch.nn.parallel import DistributedDataParallel

    import sparsegrad
    from sparsegrad.data_parallel import backward_topk_layers

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        model = _model(opts)
        targets = sparsegrad.find_targets(model)
        mlp_numels = [model.get_submodule(t.name).weight.numel() for t in targets]
        basis = None
        if method.startswith("sparsegrad"):  # the same batches on every process: the same basis
            basis = sparsegrad.estimate_basis(model, [_batch(opts, -1 - i, None) for i in range(2)], steps=2)
        model = sparsegrad.apply_method(model, METHODS[method], basis=basis)
        # the MLP matrices' parameters (LoRA: their adapters), to split the bytes sent
        mlp_ids = {id(p) for t in targets for p in _mlp_matrix_params(model, t.name)}
        buffer_bytes = sum(b.numel() * b.element_size() for b in {id(b): b for b in model.buffers()}.values())
        ddp = DistributedDataParallel(model, **no_forward_buffer_sync())
        sent = {"mlp": 0, "other": 0}

        def counting_allreduce(state, bucket):  # DDP's default all-reduce, counting what goes in
            for p in bucket.parameters():
                sent["mlp" if id(p) in mlp_ids else "other"] += p.numel() * bucket.buffer().element_size()
            return default_hooks.allreduce_hook(state, bucket)

        ddp.register_comm_hook(None, counting_allreduce)
        optimizer = sparsegrad.build_optimizer(model, lr=1e-5, schedule="constant")
        wall, cpu, mlp, other = [], [], [], []
        for step in range(opts["warmup"] + opts["steps"]):
            batch = _batch(opts, step, rank)
            dist.barrier()
            sent.update(mlp=0, other=0)
            w0, c0 = time.perf_counter(), time.process_time()
            ddp(**batch).loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            w1, c1 = time.perf_counter(), time.process_time()
            exchanged = optimizer.exchange.last_bytes_sent if optimizer.exchange is not None else 0
            if step >= opts["warmup"]:
                wall.append(w1 - w0)
                cpu.append(c1 - c0)
                mlp.append(sent["mlp"] + exchanged)
                other.append(sent["other"])
        result = {
            "method": method, "rank": rank, "wall_s": statistics.median(wall), "cpu_s": statistics.median(cpu),
            "mlp_bytes": statistics.median(mlp), "other_bytes": statistics.median(other),
            "sent_bytes": statistics.median([a + b for a, b in zip(mlp, other)]), "buffer_bytes": buffer_bytes,
            "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad),
            "mlp_numels": mlp_numels,
            "k": [layer.k for _, layer, _ in backward_topk_layers(model)] or None,
        }  # fmt: skip
        Path(out, f"{method}-rank{rank}.json").write_text(json.dumps(result))
    finally:
        dist.destroy_process_group()


def run(opts: dict) -> list[dict]:
    import tempfile

    import torch.multiprocessing as mp

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for method in opts["methods"]:
            print(f"[ddp] {method}: {WORLD} gloo processes ...", flush=True)
            mp.spawn(_worker, args=(_free_port(), method, opts, tmp), nprocs=WORLD, join=True)
            per_rank = [json.loads(Path(tmp, f"{method}-rank{r}.json").read_text()) for r in range(WORLD)]
            rows.append(per_rank[0] | {"wall_s_max_rank": max(r["wall_s"] for r in per_rank)})
    return rows


# The paper's LLaMA-2-7B setting: up and down projections of every third block (11 of 32), k ~ 100,000.
SHAPES = {
    "BERT-base (24 MLP matrices 3072 x 768, k = 1%, LoRA rank 8)": {"n": 24, "out_in": (3072, 768), "k": 0.01, "lora_rank": 8},
    "LLaMA-2-7B (22 MLP matrices 11008 x 4096, k = 100,000, LoRA rank 32)": {"n": 22, "out_in": (11008, 4096), "k": 100_000, "lora_rank": 32},
}  # fmt: skip


def mlp_bytes_by_mode(n: int, out_in: tuple[int, int], k, lora_rank: int) -> dict[str, int]:
    """Bytes one process puts into the collectives per optimizer step for ``n`` MLP matrices (float32
    gradients, one micro-batch per process): the dense all-reduce of full FT and topk_at='step', LoRA's
    adapters, and the sparse exchange of topk_at='backward' (its own message-size rule)."""
    from sparsegrad.data_parallel import exchange_message_bytes
    from sparsegrad.kernels import resolve_k

    out_f, in_f = out_in
    count = resolve_k(k, out_f * in_f)
    dense = n * out_f * in_f * 4
    return {"full": dense, "lora": n * lora_rank * (out_f + in_f) * 4, "sparsegrad_step": dense,
            "sparsegrad_backward": exchange_message_bytes([count] * n, [out_f * in_f] * n)}  # fmt: skip


def no_forward_buffer_sync() -> dict:
    """DDP's keyword that turns off the buffer broadcast before every forward pass: ``forward_sync_buffers``
    from torch 2.13 (``broadcast_buffers`` is deprecated there), ``broadcast_buffers`` before."""
    from torch.nn.parallel import DistributedDataParallel

    params = inspect.signature(DistributedDataParallel.__init__).parameters
    return {"forward_sync_buffers": False} if "forward_sync_buffers" in params else {"broadcast_buffers": False}


def _targets_note(rows: list[dict]) -> str:
    """The sparse exchange against full FT at this shape, beside the targets of a sparse data-parallel mode."""
    by = {r["method"]: r for r in rows}
    if not {"full", "sparsegrad_backward"} <= set(by):
        return ""
    full, sparse = by["full"], by["sparsegrad_backward"]
    cpu, mlp = sparse["cpu_s"] / full["cpu_s"], sparse["mlp_bytes"] / full["mlp_bytes"]

    def verdict(ratio: float, target: float) -> str:
        return f"{ratio:.3f}x (target <= {target}x: {'met' if ratio <= target else 'not met'})"

    return (f"Targets, topk_at='backward' against full FT: CPU time per step {verdict(cpu, 1.3)}; bytes of the "
            f"MLP matrices {verdict(mlp, 0.1)}.")  # fmt: skip


def _cost_note(opts: dict, rows: list[dict]) -> str:
    """Multiply-adds per MLP matrix, process and optimizer step at the measured shape (the layers' cost
    model, :mod:`sparsegrad.kernels`): where SparseGrad's extra CPU time goes."""
    from sparsegrad.kernels import macs_auto, macs_dense

    tokens, d_in, d_out = opts["batch"] // WORLD * opts["seq"], opts["hidden"], 4 * opts["hidden"]
    real = int(round(real_tokens_per_process(opts)))
    dense = macs_dense(tokens, d_in, d_out)
    apply_step = d_out * d_in * min(d_in, d_out)  # u_out dW~ R^T, a step touching every row and column
    backward = macs_auto(tokens, d_in, d_out, n_backward_rows=real, weight_refresh_macs=apply_step)
    step = dense + d_out * d_in * (d_in + d_out) + apply_step
    g = 1e9
    sent = {r["method"]: r["mlp_bytes"] for r in rows}
    share = (f"{sent['sparsegrad_backward'] / sent['full']:.1%} of" if {"full", "sparsegrad_backward"} <= set(sent)
             else "a small fraction of")  # fmt: skip
    padded = (f" ({real} of them not padding: the rotations and dL/dx run on those rows only, sparse_by_dense)"
              if real < tokens else "")  # fmt: skip
    return (
        f"Where SparseGrad's CPU time goes, by the layers' cost model (`sparsegrad.kernels`), per MLP matrix "
        f"({d_out} x {d_in}), process and optimizer step at {tokens} tokens per process{padded}: full FT's three "
        f"products {dense / g:.1f} G multiply-adds; topk_at='backward' {backward / g:.1f} G (the rotations of "
        f"each backward pass, per token or once per call whichever is cheaper, plus about "
        f"{apply_step / g:.1f} G to apply the summed k-sparse step to W); topk_at='step' {step / g:.1f} G (one "
        f"rotation of the dense summed gradient, out*in*(in + out), plus the same step). The exchange itself "
        f"sends {share} full FT's MLP bytes; the rotations, not the communication, set SparseGrad's time."
    )


def _mb(b: float) -> str:
    return f"{b / 1e6:,.1f}"


def _shape_label(opts: dict) -> str:
    pad = ("unpadded" if opts.get("padding", "none") == "none"
           else f"padded to the movie-review sentence lengths, {real_tokens_per_process(opts):.0f} of "
                f"{opts['batch'] // WORLD * opts['seq']} tokens per process not padding")  # fmt: skip
    return f"global batch {opts['batch']} x {opts['seq']} tokens ({opts['batch'] // WORLD} rows per process), {pad}"


def _table(rows: list[dict]) -> list[str]:
    base = next(r for r in rows if r["method"] == "full")
    lines = [
        "| method | wall s / step | vs full | CPU s / step | vs full | MB sent / step | vs full | MLP matrices MB "
        "| vs full | rest MB | buffers MB (broadcast each forward if DDP syncs buffers, its default) | trainable parameters |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {LABELS.get(r['method'], r['method'])} | {r['wall_s']:.3f} | {r['wall_s'] / base['wall_s']:.2f}x | "
            f"{r['cpu_s']:.3f} | {r['cpu_s'] / base['cpu_s']:.2f}x | {_mb(r['sent_bytes'])} | "
            f"{r['sent_bytes'] / base['sent_bytes']:.2f}x | {_mb(r['mlp_bytes'])} | "
            f"{r['mlp_bytes'] / base['mlp_bytes']:.3f}x | {_mb(r['other_bytes'])} | {_mb(r['buffer_bytes'])} | "
            f"{r['trainable']:,} |"
        )
    return lines


def render(configs: list[dict], meta: dict) -> str:
    """``configs``: one ``{"options": ..., "rows": ...}`` per batch shape, all from one run."""
    first = configs[0]["options"]
    lines = [
        "# Data-parallel training cost per optimizer step (DistributedDataParallel)",
        "",
        f"{WORLD} processes, gloo on 127.0.0.1, one thread each, CPU; random BERT (hidden {first['hidden']}, "
        f"{first['layers']} layers, MLP {4 * first['hidden']}); median of {first['steps']} steps after "
        f"{first['warmup']} warm-up steps, rank 0; one table per batch shape, all measured in one run. SparseGrad: "
        "k = 1% of each MLP matrix, in its two data-parallel "
        "modes: topk_at='step' (dense gradient through the all-reduce, rotation and top-k once per step: one "
        "process on the whole batch) and topk_at='backward' (each process keeps its own top-k in its backward "
        "pass, the optimizer all-gathers only those entries and steps their sum: one process accumulating the "
        "processes' micro-batches). LoRA: rank 8 on the MLP linears. Every method in the paper's encoder setting "
        "(non-MLP parameters train densely, through DDP's all-reduce).",
        "",
        f"Machine: {meta['machine']}; load average before the run: {meta['load_before']}, after: "
        f"{meta['load_after']}; torch {meta['torch']}; git {meta['git']}. Wall times on a shared 2-core machine "
        "are dominated by waiting for the other process; the CPU seconds are the steadier figure.",
        "",
        "Bytes are what each process puts into the collectives per optimizer step (the all-reduce's input; the "
        "all-gather's input, of which each process receives 2 x): the MLP matrices (their gradients, LoRA's "
        "adapters, or the sparse exchange's counts, indices and values) and the rest (non-MLP parameters and "
        "biases).",
    ]
    for config in configs:
        opts, rows = config["options"], config["rows"]
        targets = _targets_note(rows)
        lines += ["", f"## {_shape_label(opts)[0].upper()}{_shape_label(opts)[1:]}", "", *_table(rows), "",
                  *([targets, ""] if targets else []), _cost_note(opts, rows)]  # fmt: skip
    lines += [
        "",
        "## MLP bytes per step by calculation",
        "",
        "From the message sizes of the same code (`sparsegrad.data_parallel.exchange_message_bytes`: 8 bytes of "
        "count per matrix, then per matrix k entries of an int32 flat index and a float32 value) and the float32 "
        "gradient sizes of the dense modes, per process and optimizer step, one micro-batch per process (with "
        "gradient accumulation the exchange carries up to k per micro-batch). Each process receives N times "
        "the exchange's bytes (N = 2: twice); a ring all-reduce moves about 2 (N - 1) / N times its input per "
        "process. bf16 gradients halve the dense rows and make an entry 6 bytes.",
        "",
        "| shape | full FT | LoRA | SparseGrad topk_at='step' | SparseGrad topk_at='backward' | received by each of 2 processes | backward / full |",
        "|---|---|---|---|---|---|---|",
    ]
    for label, shape in SHAPES.items():
        b = mlp_bytes_by_mode(**shape)
        lines.append(
            f"| {label} | {_mb(b['full'])} MB | {_mb(b['lora'])} MB | {_mb(b['sparsegrad_step'])} MB | "
            f"{_mb(b['sparsegrad_backward'])} MB | {_mb(WORLD * b['sparsegrad_backward'])} MB | "
            f"{b['sparsegrad_backward'] / b['full']:.4f}x |"
        )
    checks = {}  # measured MLP bytes at the BERT-base shape against the calculation, one line per distinct result
    calc = mlp_bytes_by_mode(**next(iter(SHAPES.values())))
    for config in configs:
        opts, measured = config["options"], {r["method"]: r["mlp_bytes"] for r in config["rows"]}
        if opts["hidden"] == 768 and opts["layers"] == 12 and "sparsegrad_backward" in measured:
            text = ", ".join(f"{m} {_mb(measured[m])} MB (calculated {_mb(calc[m])})" for m in measured if m in calc)
            checks.setdefault(text, []).append(f"{opts['batch']} x {opts['seq']} {opts.get('padding', 'none')}")
    for text, shapes in checks.items():
        lines += ["", f"Measured at the BERT-base shape ({'; '.join(shapes)}): {text}."]
    return "\n".join(lines) + "\n"


def parse_shapes(text: str) -> list[dict]:
    """``"16x64:none,16x128:movie"`` -> batch, seq and padding of each shape."""
    shapes = []
    for part in (p.strip() for p in text.split(",") if p.strip()):
        size, _, padding = part.partition(":")
        rows, _, seq = size.partition("x")
        padding = padding or "none"
        if not (rows.isdigit() and seq.isdigit()) or padding not in ("none", "movie") or int(rows) % WORLD:
            raise ValueError(f"--shapes: {part!r} is not ROWSxTOKENS[:none|movie] with ROWS a multiple of {WORLD} "
                             "(e.g. 16x64:none,16x128:movie)")
        shapes.append({"batch": int(rows), "seq": int(seq), "padding": padding})
    if not shapes:
        raise ValueError("--shapes: give at least one shape, e.g. 16x64:none")
    return shapes


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated, of {', '.join(METHODS)}")
    parser.add_argument("--hidden", type=int, default=768, help="BERT hidden size (MLP: 4x); default BERT-base")
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--shapes", default=DEFAULT_SHAPES,
                        help="global batches ROWSxTOKENS[:none|movie], comma-separated, split over the processes; "
                             "movie: padded to the movie-review sentence lengths")  # fmt: skip
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--out-dir", type=Path, default=ROOT / "results" / "bench")
    parser.add_argument("--render", type=Path, help="rebuild ddp.md from a ddp.json (no training)")
    args = parser.parse_args(argv)
    if args.render:
        saved = json.loads(args.render.read_text())
        configs = saved.get("configs") or [{"options": saved["options"], "rows": saved["rows"]}]
        (args.render.parent / "ddp.md").write_text(render(configs, saved["meta"]))
        return 0
    methods = [m for m in args.methods.split(",") if m]
    unknown = [m for m in methods if m not in METHODS]
    if unknown or "full" not in methods:
        parser.error(f"--methods: unknown {unknown}; valid: {', '.join(METHODS)} (full is needed for the ratios)")
    try:
        shapes = parse_shapes(args.shapes)
    except ValueError as err:
        parser.error(str(err))
    load_before = os.getloadavg()[0]
    configs = []
    for shape in shapes:
        opts = {"methods": methods, "hidden": args.hidden, "layers": args.layers, "steps": args.steps,
                "warmup": args.warmup, **shape}  # fmt: skip
        print(f"[ddp] {_shape_label(opts)}", flush=True)
        configs.append({"options": opts, "rows": run(opts)})
    import subprocess

    git = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    meta = {"machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs",
            "load_before": f"{load_before:.1f}", "load_after": f"{os.getloadavg()[0]:.1f}",
            "torch": torch.__version__, "git": git.stdout.strip() or "unknown"}  # fmt: skip
    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / "ddp.json").write_text(json.dumps({"meta": meta, "configs": configs}, indent=2) + "\n")
    (args.out_dir / "ddp.md").write_text(render(configs, meta))
    print(render(configs, meta))
    return 0


if __name__ == "__main__":
    sys.exit(main())
