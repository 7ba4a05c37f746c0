"""The training the data-parallel tests run: a tiny BERT, global batches of 8 rows, 3 optimizer steps
(2 with topk_at="backward"); each of 2 processes takes half of every micro-batch.

Two references, one per data-parallel mode:

* ``reference`` (``topk_at="step"``): one process on the whole micro-batches, 2 per step;
* ``reference_accumulating`` (``topk_at="backward"``): one process that accumulates the processes'
  micro-batches (each half batch a micro-batch, its loss divided by the number of processes, as
  DistributedDataParallel averages), ``accumulation`` of them per process and step."""

from __future__ import annotations

import copy
import functools
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
# topk_at="backward" (the default): each process keeps its own top-k, the optimizer exchanges them
BACKWARD_METHODS = {
    "sparsegrad_backward": {"name": "sparsegrad", "k": 0.05},
    "sparsegrad_rotated_backward": {"name": "sparsegrad", "k": 0.05, "storage": "rotated"},
    "meprop_backward": {"name": "meprop", "k": 0.05},
    "leading_block_backward": {"name": "leading_block", "k": 0.05, "block_factor": 2.0},
    # the paper's LLaMA setting: only the MLP matrices train (LLaMA's have no bias), nothing is left for
    # DDP, and the processes train unwrapped: the optimizer's exchange is all the communication
    "meprop_llama_mlp_only": {"name": "meprop", "k": 0.05, "train_non_mlp": False},
}
KIND = {"meprop_llama_mlp_only": "llama"}  # the model of a method (default: bert)
STEPS, ACCUMULATION, ROWS, WORLD = 3, 2, 8, 2
BACKWARD_STEPS = 2  # optimizer steps of the topk_at="backward" runs (the second one sees Adam's state)
OPTIMIZER = {"lr": 1e-2, "schedule": "linear", "total_steps": STEPS, "max_grad_norm": 1.0, "weight_decay": 0.01}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def micro_batches(kind: str = "bert") -> list[dict]:
    """STEPS * ACCUMULATION micro-batches of ROWS rows (the loss: the mean over rows or tokens)."""
    return make_batches(kind, n=STEPS * ACCUMULATION, batch_size=ROWS, seed=11)


def shard(batch: dict, rank: int, world: int = WORLD) -> dict:
    n = next(iter(batch.values())).shape[0] // world
    return {k: v[rank * n : (rank + 1) * n] for k, v in batch.items()}


@functools.cache
def _basis(seed: int):
    return sparsegrad.estimate_basis(make_model("bert"), make_batches("bert", n=2, batch_size=ROWS, seed=seed), steps=2)


def build(method: str, basis_seed: int = 11, **overrides) -> torch.nn.Module:
    """The same model on every process: same seed, same basis (estimated on the same batches; another
    ``basis_seed`` draws other batches)."""
    cfg = {**{**METHODS, **BACKWARD_METHODS}[method], **overrides}
    basis = _basis(basis_seed) if cfg["name"] in ("sparsegrad", "leading_block") else None
    return sparsegrad.apply_method(make_model(KIND.get(method, "bert")), cfg, basis=basis)


def state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def reference(method: str) -> dict[str, torch.Tensor]:
    """One process, whole micro-batches: the state every replica must end in."""
    return copy.deepcopy(_reference(method))


@functools.cache
def _reference(method: str) -> dict[str, torch.Tensor]:
    model = build(method)
    optimizer = sparsegrad.build_optimizer(model, **OPTIMIZER)
    batches = micro_batches()
    for step in range(STEPS):
        for batch in batches[step * ACCUMULATION : (step + 1) * ACCUMULATION]:
            model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return state(model)


def step_batches(step: int, accumulation: int, method: str = "") -> list[dict]:
    return micro_batches(KIND.get(method, "bert"))[step * accumulation : (step + 1) * accumulation]


def reference_accumulating(method: str, accumulation: int) -> tuple[dict, list[float]]:
    """One process accumulating, per step, the half batches every process trains on (``accumulation``
    micro-batches per process), each loss divided by WORLD: the state and clipped norms per step."""
    return copy.deepcopy(_reference_accumulating(method, accumulation))


@functools.cache
def _reference_accumulating(method: str, accumulation: int) -> tuple[dict, list[float]]:
    model = build(method)
    optimizer = sparsegrad.build_optimizer(model, **OPTIMIZER)
    norms = []
    for step in range(BACKWARD_STEPS):
        for batch in step_batches(step, accumulation, method):
            for rank in range(WORLD):
                (model(**shard(batch, rank)).loss / WORLD).backward()
        optimizer.step()
        optimizer.zero_grad()
        norms.append(optimizer.last_grad_norm)
    return state(model), norms
