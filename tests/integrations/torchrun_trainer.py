"""Run by test_data_parallel under torchrun: transformers.Trainer trains a topk_at="backward" SparseGrad
model on 2 gloo processes, once as it is and once after sparsegrad.prepare_trainer; each process saves
its replica's state, the logged gradient norms and the micro-batches it trained on. :func:`replay`
trains the same in one process.

    python -m torch.distributed.run --nproc_per_node 2 torchrun_trainer.py OUT
"""

import logging
import sys
from pathlib import Path

import torch
from parallel_setup import WORLD, build, micro_batches, state
from transformers import Trainer, TrainingArguments, default_data_collator

import sparsegrad

STEPS, ACCUMULATION, ROWS = 2, 2, 4  # optimizer steps; micro-batches per step and process; rows each
LR, MAX_GRAD_NORM, METHOD = 1e-2, 1.0, "sparsegrad_backward"


def main(out: str) -> None:
    torch.set_num_threads(1)
    logging.getLogger("transformers").setLevel(logging.ERROR)
    args = TrainingArguments(
        out, per_device_train_batch_size=ROWS, gradient_accumulation_steps=ACCUMULATION, max_steps=STEPS,
        learning_rate=LR, lr_scheduler_type="constant", max_grad_norm=MAX_GRAD_NORM, use_cpu=True,
        ddp_backend="gloo", ddp_timeout=120, report_to=[], logging_steps=1, save_strategy="no",
        disable_tqdm=True, train_sampling_strategy="sequential",
    )  # fmt: skip
    rows = [{k: v[i] for k, v in b.items()} for b in micro_batches() for i in range(len(b["labels"]))]
    for name, prepare in (("plain", lambda trainer: trainer), ("prepared", sparsegrad.prepare_trainer)):
        model = build(METHOD)
        optimizer = sparsegrad.build_optimizer(model, lr=LR, schedule=None)  # Trainer's scheduler drives it
        seen = []

        def collate(features, seen=seen):
            batch = default_data_collator(features)
            seen.append({k: v.clone() for k, v in batch.items()})
            return batch

        trainer = prepare(Trainer(model=model, args=args, train_dataset=rows, data_collator=collate,
                                  optimizers=(optimizer, None)))  # fmt: skip
        trainer.train()
        norms = [log["grad_norm"] for log in trainer.state.log_history if "grad_norm" in log]
        used = seen[: STEPS * ACCUMULATION]  # the data loader may have fetched one batch ahead
        torch.save({"state": state(model), "norms": norms, "batches": used},
                   Path(out) / f"trainer-{name}-rank{args.process_index}.pt")  # fmt: skip


def replay(batches_per_rank: list[list[dict]], loss_scale: float = 1.0) -> tuple[dict, list[float]]:
    """One process accumulating, per optimizer step, every process's micro-batches of that step, each
    loss times ``loss_scale``; clipped at MAX_GRAD_NORM; the state and the norms per step."""
    model = build(METHOD)
    optimizer = sparsegrad.build_optimizer(model, lr=LR, schedule="constant", max_grad_norm=MAX_GRAD_NORM)
    norms = []
    for step in range(STEPS):
        for micro in range(step * ACCUMULATION, (step + 1) * ACCUMULATION):
            for rank in range(WORLD):
                (model(**batches_per_rank[rank][micro]).loss * loss_scale).backward()
        optimizer.step()
        optimizer.zero_grad()
        norms.append(optimizer.last_grad_norm)
    return state(model), norms


if __name__ == "__main__":
    main(sys.argv[1])
