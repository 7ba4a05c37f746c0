"""The training loop: plain PyTorch, small enough to hold in one's head, measuring as it goes.

One optimizer step = ``grad_accum`` micro-batches. Every ``eval_every`` steps (and after the last)
the model is evaluated on the selection split; the best weights are kept in memory and patience
counts evaluations without improvement. Throughput counts training steps only (evaluation is timed
separately) and skips the first ``timing_warmup_steps``. A non-finite loss stops the run as
diverged; Ctrl-C stops it as interrupted; either way the state so far is returned to the caller,
which writes the run record.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from sparsegrad.suite import data as data_lib
from sparsegrad.suite import metrics as metrics_lib
from sparsegrad.suite.convergence import EarlyStopping
from sparsegrad.suite.tasks import CAUSAL_LM, REGRESSION, TaskSpec


@dataclass
class TrainerSettings:
    """What the Hydra ``trainer`` group may change (see conf/trainer/default.yaml)."""

    seed: int = 42
    epochs: float = 3.0
    max_steps: int | None = None  # optimizer steps; stops before the epochs run out
    batch_size: int = 16  # per micro-batch
    eval_batch_size: int = 64
    grad_accum: int = 1
    lr: float = 5e-5
    weight_decay: float = 0.0
    schedule: str = "linear"  # linear | constant (after warm-up)
    warmup_steps: int = 0
    warmup_ratio: float = 0.0  # used when warmup_steps is 0
    max_grad_norm: float | None = 1.0
    precision: str = "fp32"  # fp32 | bf16 (autocast)
    eval_every: int | None = 50  # optimizer steps; None: once per epoch
    patience: int | None = 5  # evaluations without improvement; None: never stop early
    protocol: str = "heldout"  # heldout | official (select and report on dev)
    heldout_fraction: float = 0.1
    heldout_max: int | None = 2000
    objective: str = "selection"  # what finetune returns: the best checkpoint's main metric on selection | report
    timing_warmup_steps: int = 3
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    threads: int | None = None  # torch CPU threads (None: torch's default)
    progress: bool = True
    log_every: int = 10


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def autocast(device: torch.device, precision: str):
    if precision == "fp32":
        return contextlib.nullcontext()
    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    raise ValueError(f"trainer.precision={precision!r}; choose fp32 or bf16")


def _to(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


@torch.no_grad()
def evaluate(model, features: list[dict], spec: TaskSpec, *, batch_size: int, device: torch.device,
             precision: str, pad_token_id: int) -> dict[str, float]:
    """Loss and the task's metrics on ``features``."""
    was_training = model.training
    model.eval()
    regression = spec.kind == REGRESSION
    predictions, labels = [], []
    loss_sum, weight = 0.0, 0
    # Longest first: batches of similar length pad little; the metrics do not depend on the order.
    order = sorted(range(len(features)), key=lambda i: -len(features[i]["input_ids"]))
    try:
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            batch = _to(data_lib.collate([features[i] for i in idx], pad_token_id, regression), device)
            with autocast(device, precision):
                out = model(**batch)
            if spec.kind == CAUSAL_LM:
                n = data_lib.count_target_tokens(batch)
                if n:
                    loss_sum += float(out.loss.float()) * n
                    weight += n
                continue
            loss_sum += float(out.loss.float()) * len(idx)
            weight += len(idx)
            logits = out.logits.float()
            predictions.append(logits.squeeze(-1) if regression else logits.argmax(-1))
            labels.append(batch["labels"])
    finally:
        model.train(was_training)
    loss = loss_sum / weight if weight else math.nan
    if spec.kind == CAUSAL_LM:
        return {"loss": loss, "perplexity": metrics_lib.perplexity(loss)}
    p = torch.cat(predictions).cpu().numpy()
    y = torch.cat(labels).cpu().numpy()
    return {"loss": loss, **metrics_lib.compute(spec.metrics, p, y)}


@dataclass
class TrainState:
    step: int = 0
    epoch: float = 0.0
    samples: int = 0
    tokens: int = 0
    train_seconds: float = 0.0
    timed_seconds: float = 0.0
    timed_steps: int = 0
    timed_samples: int = 0
    eval_seconds: float = 0.0
    last_loss: float | None = None
    stop_reason: str = "not started"
    status: str = "completed"
    best_value: float | None = None
    best_step: int | None = None
    best_metrics: dict | None = None
    best_snapshot: dict | None = None
    evaluations: list[dict] = field(default_factory=list)


def snapshot(model) -> dict[str, torch.Tensor]:
    """A CPU copy of what training can change: trainable parameters and persistent buffers.

    Frozen weights are not copied (a LLaMA run trains a few MLPs of a 7B model); non-persistent
    buffers are caches that layers rebuild from their parameters.
    """
    state = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            state["p:" + name] = p.detach().to("cpu", copy=True)
    for module_name, module in model.named_modules():
        skip = getattr(module, "_non_persistent_buffers_set", set())
        for name, b in module.named_buffers(recurse=False):
            if b is not None and name not in skip:
                state["b:" + (f"{module_name}.{name}" if module_name else name)] = b.detach().to("cpu", copy=True)
    return state


@torch.no_grad()
def restore(model, state: dict[str, torch.Tensor]) -> None:
    params = dict(model.named_parameters())
    buffers = dict(model.named_buffers())
    for key, value in state.items():
        kind, name = key.split(":", 1)
        target = params.get(name) if kind == "p" else buffers.get(name)
        if target is not None:
            target.copy_(value.to(target.device))
    for module in model.modules():  # layers that cache derived weights must recompute them
        invalidate = getattr(module, "invalidate_cache", None)
        if callable(invalidate):
            invalidate()


def train(
    model,
    optimizer,
    features: list[dict],
    spec: TaskSpec,
    settings: TrainerSettings,
    *,
    device: torch.device,
    pad_token_id: int,
    evaluate_selection: Callable[[], dict[str, float]],
    main_metric: str,
    higher_is_better: bool,
    total_steps: int,
    meter=None,
    tracker=None,
    state: TrainState | None = None,
) -> TrainState:
    """Train until ``total_steps``, early stopping or divergence; return the state (best weights in memory)."""
    state = state or TrainState()
    regression = spec.kind == REGRESSION
    generator = torch.Generator().manual_seed(settings.seed)
    steps_per_epoch = max(1, math.ceil(len(features) / settings.batch_size) // settings.grad_accum)
    eval_every = settings.eval_every or steps_per_epoch
    stopper = EarlyStopping(settings.patience, higher_is_better)  # the convergence criterion
    bar = None
    if settings.progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=total_steps, desc="train", unit="step", dynamic_ncols=True, leave=False)

    def run_evaluation() -> bool:
        """Evaluate on the selection split; True when patience is exhausted."""
        t0 = time.perf_counter()
        with meter.phase("eval") if meter is not None else contextlib.nullcontext():
            result = evaluate_selection()
        state.eval_seconds += time.perf_counter() - t0
        state.evaluations.append({"step": state.step, "epoch": state.epoch, "metrics": result})
        if tracker is not None:
            tracker.log({f"selection/{k}": v for k, v in result.items()}, step=state.step)
        value = result.get(main_metric)
        if stopper.update(value) or state.best_snapshot is None:
            state.best_value = stopper.best
            state.best_step, state.best_metrics = state.step, result
            state.best_snapshot = snapshot(model)
        if bar is not None:
            bar.set_postfix_str(f"loss {state.last_loss:.4f} | {main_metric} {value:.4f}" if state.last_loss is not None
                                else f"{main_metric} {value:.4f}")
        return stopper.should_stop

    model.train()
    optimizer.zero_grad()
    micro_in_step, step_loss, step_samples, step_tokens = 0, 0.0, 0, 0
    step_started = time.perf_counter()
    last_evaluated = -1
    try:
        state.stop_reason = "epochs done"
        epoch_float_steps = settings.epochs * steps_per_epoch
        stop = False
        epoch = 0
        while not stop:
            if epoch >= math.ceil(settings.epochs):
                break
            batches = data_lib.batch_indices(len(features), settings.batch_size, True, generator)
            for idx in batches:
                if micro_in_step == 0:
                    step_started = time.perf_counter()
                with meter.phase("train") if meter is not None else contextlib.nullcontext():
                    batch = _to(data_lib.collate([features[i] for i in idx], pad_token_id, regression), device)
                    with autocast(device, settings.precision):
                        out = model(**batch)
                    loss = out.loss.float()
                    loss_value = float(loss.detach())
                    if not torch.isfinite(loss):
                        state.last_loss = loss_value
                        state.status, state.stop_reason = "diverged", f"non-finite loss ({loss_value}) at step {state.step}"
                        stop = True
                        break
                    (loss / settings.grad_accum).backward()
                    micro_in_step += 1
                    step_loss += loss_value / settings.grad_accum
                    step_samples += len(idx)
                    step_tokens += int(batch["attention_mask"].sum())
                    if micro_in_step < settings.grad_accum:
                        continue
                    optimizer.step()
                    optimizer.zero_grad()
                    if device.type == "cuda":
                        torch.cuda.synchronize(device)
                elapsed = time.perf_counter() - step_started
                state.step += 1
                state.epoch = state.step / steps_per_epoch
                state.samples += step_samples
                state.tokens += step_tokens
                state.train_seconds += elapsed
                if state.step > settings.timing_warmup_steps:
                    state.timed_seconds += elapsed
                    state.timed_steps += 1
                    state.timed_samples += step_samples
                state.last_loss = step_loss
                if tracker is not None and (state.step % max(1, settings.log_every) == 0 or state.step == 1):
                    tracker.log({"train/loss": step_loss, "train/epoch": state.epoch}, step=state.step)
                if bar is not None:
                    bar.update(1)
                    rate = state.timed_samples / state.timed_seconds if state.timed_seconds else 0.0
                    bar.set_postfix_str(f"loss {step_loss:.4f} | {rate:.1f} samples/s")
                micro_in_step, step_loss, step_samples, step_tokens = 0, 0.0, 0, 0
                if state.step % eval_every == 0:
                    last_evaluated = state.step
                    if run_evaluation():
                        state.stop_reason = stopper.reason()
                        stop = True
                        break
                if state.step >= total_steps or state.step >= epoch_float_steps:
                    state.stop_reason = "max_steps reached" if state.step >= (settings.max_steps or math.inf) else "epochs done"
                    stop = True
                    break
            epoch += 1
        if state.status == "completed" and last_evaluated != state.step and state.step > 0:
            run_evaluation()
    except KeyboardInterrupt:
        state.status, state.stop_reason = "interrupted", f"interrupted (Ctrl-C) at step {state.step}"
    finally:
        if bar is not None:
            bar.close()
    return state


def planned_steps(n_examples: int, settings: TrainerSettings) -> int:
    """Optimizer steps the run will take if nothing stops it early (for schedules and progress bars)."""
    steps_per_epoch = max(1, math.ceil(n_examples / settings.batch_size) // settings.grad_accum)
    total = int(math.ceil(settings.epochs * steps_per_epoch))
    if settings.max_steps:
        total = min(total, settings.max_steps)
    return max(1, total)


def warmup_steps(settings: TrainerSettings, total_steps: int) -> int:
    return settings.warmup_steps or int(round(settings.warmup_ratio * total_steps))
