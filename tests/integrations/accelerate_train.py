"""Run by test_data_parallel under `accelerate launch --num_processes 2`: train each method given on
the command line with accelerate (gradient accumulation included) and save every replica's state.
Methods of either data-parallel mode (parallel_setup.METHODS: topk_at="step"; BACKWARD_METHODS:
topk_at="backward", the optimizer exchanging each process's top-k entries).

    python -m accelerate.commands.launch --multi_gpu --num_processes 2 accelerate_train.py OUT METHOD...
"""

import sys
from pathlib import Path

import torch
from accelerate import Accelerator
from parallel_setup import (
    ACCUMULATION,
    BACKWARD_METHODS,
    BACKWARD_STEPS,
    OPTIMIZER,
    build,
    micro_batches,
    shard,
)

import sparsegrad


def main(out: str, methods: list[str]) -> None:
    torch.set_num_threads(1)
    for method in methods:
        accelerator = Accelerator(cpu=True, gradient_accumulation_steps=ACCUMULATION)
        model = build(method)
        optimizer = sparsegrad.build_optimizer(model, **OPTIMIZER)
        model, optimizer = accelerator.prepare(model, optimizer)
        rank, world = accelerator.process_index, accelerator.num_processes
        batches = micro_batches()
        if method in BACKWARD_METHODS:
            batches = batches[: BACKWARD_STEPS * ACCUMULATION]
        for batch in batches:
            with accelerator.accumulate(model):
                # accelerate scales the loss by 1 / ACCUMULATION; the reference sums the micro-batch
                # losses, so undo it to compare the same objective
                accelerator.backward(model(**shard(batch, rank, world)).loss * ACCUMULATION)
                optimizer.step()
                optimizer.zero_grad()
        state = accelerator.unwrap_model(model).state_dict()
        torch.save({k: v.detach().clone() for k, v in state.items()}, Path(out) / f"{method}-rank{rank}.pt")
        accelerator.wait_for_everyone()
        accelerator.free_memory()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
