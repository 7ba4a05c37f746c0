"""Data-parallel rows of ``make bench``: full FT, LoRA and SparseGrad under DistributedDataParallel.

    python -m benchmarks.ddp                       # 2 gloo processes on CPU, BERT-base shape, 16 x 64
    python -m benchmarks.ddp --steps 8 --seq 128 --hidden 256 --layers 4

Each method runs in 2 fresh processes (``torch.multiprocessing.spawn``, gloo on 127.0.0.1, one thread
each), each process taking half of every global batch. SparseGrad runs with ``topk_at="step"`` (dense
gradient through the all-reduce, rotation and top-k once per optimizer step: the exact data-parallel
mode). Measured per optimizer step, after warm-up steps, as the median over the timed steps of rank 0:

* wall seconds and CPU seconds of the process (``time.process_time``, all its threads);
* bytes all-reduced: counted by a DDP communication hook (the gradient buckets of the step, what
  each process sends into the all-reduce), buffers not included (``broadcast_buffers=False``: every
  replica computes the same buffers, the basis and the updated-coordinate bit set, itself). The bytes
  DDP's default ``broadcast_buffers=True`` would add per forward pass are listed beside them.

Ratios are to full FT under the same DDP setting. Writes ``results/bench/ddp.md`` and ``ddp.json``.
"""

from __future__ import annotations

import argparse
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
METHODS = {
    "full": {"name": "full"},
    "lora": {"name": "lora", "lora_rank": 8},
    "sparsegrad": {"name": "sparsegrad", "k": 0.01, "topk_at": "step"},
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


def _batch(opts: dict, step: int, rank: int) -> dict:
    gen = torch.Generator().manual_seed(1000 + step)
    rows, seq = opts["batch"], opts["seq"]
    ids = torch.randint(1000, 30000, (rows, seq), generator=gen)
    labels = torch.randint(0, 2, (rows,), generator=gen)
    half = rows // WORLD
    return {"input_ids": ids[rank * half : (rank + 1) * half], "labels": labels[rank * half : (rank + 1) * half]}


def _worker(rank: int, port: int, method: str, opts: dict, out: str) -> None:
    import torch.distributed as dist
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
    from torch.nn.parallel import DistributedDataParallel

    import sparsegrad

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        model = _model(opts)
        basis = None
        if method == "sparsegrad":
            basis = sparsegrad.estimate_basis(model, [_batch(opts, -1 - i, rank) for i in range(2)], steps=2)
        model = sparsegrad.apply_method(model, METHODS[method], basis=basis)
        buffer_bytes = sum(b.numel() * b.element_size() for b in {id(b): b for b in model.buffers()}.values())
        ddp = DistributedDataParallel(model, broadcast_buffers=False)
        sent = [0]

        def counting_allreduce(state, bucket):  # DDP's default all-reduce, counting what goes in
            sent[0] += bucket.buffer().numel() * bucket.buffer().element_size()
            return default_hooks.allreduce_hook(state, bucket)

        ddp.register_comm_hook(None, counting_allreduce)
        optimizer = sparsegrad.build_optimizer(model, lr=1e-5, schedule="constant")
        wall, cpu, comm = [], [], []
        for step in range(opts["warmup"] + opts["steps"]):
            batch = _batch(opts, step, rank)
            dist.barrier()
            sent[0] = 0
            w0, c0 = time.perf_counter(), time.process_time()
            ddp(**batch).loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            w1, c1 = time.perf_counter(), time.process_time()
            if step >= opts["warmup"]:
                wall.append(w1 - w0)
                cpu.append(c1 - c0)
                comm.append(sent[0])
        result = {
            "method": method, "rank": rank, "wall_s": statistics.median(wall), "cpu_s": statistics.median(cpu),
            "allreduce_bytes": statistics.median(comm), "buffer_bytes": buffer_bytes,
            "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad),
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


def render(rows: list[dict], opts: dict, meta: dict) -> str:
    base = next(r for r in rows if r["method"] == "full")
    lines = [
        "# Data-parallel training cost per optimizer step (DistributedDataParallel)",
        "",
        f"{WORLD} processes, gloo on 127.0.0.1, one thread each, CPU; random BERT (hidden {opts['hidden']}, "
        f"{opts['layers']} layers, MLP {4 * opts['hidden']}), global batch {opts['batch']} x {opts['seq']} tokens "
        f"({opts['batch'] // WORLD} rows per process), unpadded; median of {opts['steps']} steps after "
        f"{opts['warmup']} warm-up steps, rank 0. SparseGrad: k = 1% of each MLP matrix, topk_at='step' "
        "(dense gradient through the all-reduce, rotation and top-k once per step). LoRA: rank 8 on the MLP "
        "linears. Every method in the paper's encoder setting (non-MLP parameters train densely).",
        "",
        f"Machine: {meta['machine']}; load average before the run: {meta['load_before']}, after: "
        f"{meta['load_after']}; torch {meta['torch']}; git {meta['git']}.",
        "",
        "| method | wall s / step | vs full | CPU s / step | vs full | all-reduced MB / step | vs full "
        "| buffers MB (broadcast each forward if broadcast_buffers=True) | trainable parameters |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['method']} | {r['wall_s']:.3f} | {r['wall_s'] / base['wall_s']:.2f}x | {r['cpu_s']:.3f} | "
            f"{r['cpu_s'] / base['cpu_s']:.2f}x | {r['allreduce_bytes'] / 1e6:.1f} | "
            f"{r['allreduce_bytes'] / base['allreduce_bytes']:.2f}x | {r['buffer_bytes'] / 1e6:.1f} | "
            f"{r['trainable']:,} |"
        )
    lines += [
        "",
        "SparseGrad's exact data-parallel mode all-reduces the dense gradient of its MLP weights, as full FT "
        "does (the top-k of the whole batch's gradient needs the whole gradient); LoRA all-reduces only its "
        "adapters and the non-MLP parameters. Its extra time over full FT is the rotation "
        "u_out^T (dL/dW) R once per step, out*in*(in + out) multiply-adds per matrix (9.1 G for a "
        "768 x 3072 one), the top-k and the lazy sparse Adam. Rotating per token in the backward pass "
        "(what topk_at='backward' picks when cheaper) costs T (in^2 + out^2): the step rotation is the "
        "cheaper one from about out*in*(in + out) / (in^2 + out^2) tokens per optimizer step (900 for "
        "BERT-base's MLP), so this small-batch row (512 tokens per process) is its worst case. Wall times "
        "on a shared 2-core machine are dominated by waiting for the other process; the CPU seconds are "
        "the steadier figure.",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated, of {', '.join(METHODS)}")
    parser.add_argument("--hidden", type=int, default=768, help="BERT hidden size (MLP: 4x); default BERT-base")
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--batch", type=int, default=16, help="global batch (rows), split over the processes")
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--out-dir", type=Path, default=ROOT / "results" / "bench")
    parser.add_argument("--render", type=Path, help="rebuild ddp.md from a ddp.json (no training)")
    args = parser.parse_args(argv)
    if args.render:
        saved = json.loads(args.render.read_text())
        (args.render.parent / "ddp.md").write_text(render(saved["rows"], saved["options"], saved["meta"]))
        return 0
    methods = [m for m in args.methods.split(",") if m]
    unknown = [m for m in methods if m not in METHODS]
    if unknown or "full" not in methods:
        parser.error(f"--methods: unknown {unknown}; valid: {', '.join(METHODS)} (full is needed for the ratios)")
    opts = {"methods": methods, "hidden": args.hidden, "layers": args.layers, "batch": args.batch,
            "seq": args.seq, "steps": args.steps, "warmup": args.warmup}  # fmt: skip
    load_before = os.getloadavg()[0]
    rows = run(opts)
    import subprocess

    git = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    meta = {"machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs",
            "load_before": f"{load_before:.1f}", "load_after": f"{os.getloadavg()[0]:.1f}",
            "torch": torch.__version__, "git": git.stdout.strip() or "unknown"}  # fmt: skip
    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / "ddp.json").write_text(json.dumps({"options": opts, "meta": meta, "rows": rows}, indent=2) + "\n")
    (args.out_dir / "ddp.md").write_text(render(rows, opts, meta))
    print(render(rows, opts, meta))
    return 0


if __name__ == "__main__":
    sys.exit(main())
