"""The training both data-parallel tests run: a tiny BERT, global batches of 8 rows, 2 micro-batches
per optimizer step, 3 steps; each of 2 processes takes half of every micro-batch. ``reference``
trains the same on one process with whole micro-batches."""

from __future__ import annotations

import os
import socket
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "method"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from method_fixtures import make_batches, make_model  # noqa: E402

import sparsegrad  # noqa: E402

METHODS = {
    "full": {"name": "full"},
    "sparsegrad": {"name": "sparsegrad", "k": 0.05, "topk_at": "step"},
    "sparsegrad_rotated": {"name": "sparsegrad", "k": 0.05, "topk_at": "step", "storage": "rotated"},
    "meprop": {"name": "meprop", "k": 0.05, "topk_at": "step"},
    "leading_block": {"name": "leading_block", "k": 0.05, "block_factor": 2.0, "topk_at": "step"},
}
STEPS, ACCUMULATION, ROWS, WORLD = 3, 2, 8, 2
OPTIMIZER = {"lr": 1e-2, "schedule": "linear", "total_steps": STEPS, "max_grad_norm": 1.0, "weight_decay": 0.01}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def micro_batches() -> list[dict]:
    """STEPS * ACCUMULATION micro-batches of ROWS rows (classification loss: the mean over rows)."""
    return make_batches("bert", n=STEPS * ACCUMULATION, batch_size=ROWS, seed=11)


def shard(batch: dict, rank: int, world: int = WORLD) -> dict:
    n = next(iter(batch.values())).shape[0] // world
    return {k: v[rank * n : (rank + 1) * n] for k, v in batch.items()}


def build(method: str) -> torch.nn.Module:
    """The same model on every process: same seed, same basis (estimated on the same batches)."""
    cfg = METHODS[method]
    basis = None
    if cfg["name"] in ("sparsegrad", "leading_block"):
        basis = sparsegrad.estimate_basis(make_model("bert"), micro_batches()[:2], steps=2)
    return sparsegrad.apply_method(make_model("bert"), cfg, basis=basis)


def reference(method: str) -> dict[str, torch.Tensor]:
    """One process, whole micro-batches: the state every replica must end in."""
    model = build(method)
    optimizer = sparsegrad.build_optimizer(model, **OPTIMIZER)
    batches = micro_batches()
    for step in range(STEPS):
        for batch in batches[step * ACCUMULATION : (step + 1) * ACCUMULATION]:
            model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return {k: v.detach().clone() for k, v in model.state_dict().items()}
