"""The training loop: plain PyTorch, small enough to hold in one's head, measuring as it goes.

:func:`train` is one loop over optimizer steps: the gradients of ``grad_accum`` micro-batches
(:func:`_forward_backward`), the update, the bookkeeping (:func:`_count`), the divergence check and,
every ``eval_every`` steps (or ``evals_per_epoch`` times an epoch; and after the last), an evaluation
on the selection split (:class:`_Selection`: keeps the best weights in memory and asks the convergence
criterion, :class:`sparsegrad.suite.run.convergence.EarlyStopping`, whether the run has finished
learning); a further stopping rule belongs beside those two.
Throughput counts training steps only (evaluation is timed separately) and skips the first
``timing_warmup_steps`` and, on CPU, the steps whose memory was measured: each step with a batch shape
no measured step covered (:meth:`sparsegrad.suite.run.measure.MemoryMeter.wants`), and the step that
ends an evaluation interval in which no step was measured (a growing optimizer state is seen).
A non-finite loss, or a step loss above ``divergence_factor`` times the first step's, stops the run
as diverged (:func:`divergence`); Ctrl-C or SIGTERM (:mod:`sparsegrad.suite.interrupts`) stops it as
interrupted; either way the state so far is returned to the caller, which writes the run record."""

from __future__ import annotations

import contextlib
import itertools
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from sparsegrad.suite.errors import ConfigError
from sparsegrad.suite.run import data as data_lib
from sparsegrad.suite.run import metrics as metrics_lib
from sparsegrad.suite.run.convergence import (
    CAP_REASON,
    EarlyStopping,
    better,
    budget_reason,
    steps_for_epochs,
)
from sparsegrad.suite.run.settings import TrainerSettings
from sparsegrad.suite.run.tasks import CAUSAL_LM, REGRESSION, TaskSpec

__all__ = ["TrainState", "TrainerSettings", "evaluate", "planned_steps", "restore", "snapshot", "train"]


def resolve_device(name: str) -> torch.device:
    """The device ``trainer.device`` names; a GPU that is not there is a ConfigError (one line), not
    torch's assertion at the first tensor moved."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ConfigError(f"trainer.device={name}: torch sees no CUDA GPU here (no driver, or none visible: "
                              f"CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')}); "
                              "use trainer.device=auto or cpu")
        if device.index is not None and device.index >= count:
            raise ConfigError(f"trainer.device={name}: only {count} CUDA device(s) are visible (cuda:0 to "
                              f"cuda:{count - 1}); use one of those, or trainer.device=cuda")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"trainer.device={name}: MPS is not available in this torch on this Mac; use trainer.device=cpu")
    return device


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
             precision: str, pad_token_id: int, examples: dict | None = None) -> dict[str, float]:
    """Loss and the task's metrics on ``features``; a dict passed as ``examples`` receives the per-example
    arrays in the order of ``features`` (predictions and labels, or each sequence's summed token loss and
    its tokens for language modelling: :mod:`sparsegrad.suite.run.examples`)."""
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
                if examples is not None:
                    predictions.append(_sequence_loss_sums(out.logits, batch["labels"]))
                    labels.append((batch["labels"][:, 1:] != data_lib.IGNORE_INDEX).sum(-1))
                continue
            loss_sum += float(out.loss.float()) * len(idx)
            weight += len(idx)
            logits = out.logits.float()
            predictions.append(logits.squeeze(-1) if regression else logits.argmax(-1))
            labels.append(batch["labels"])
    finally:
        model.train(was_training)
    loss = loss_sum / weight if weight else math.nan
    if examples is not None and predictions:
        restore_order = torch.as_tensor(order).argsort()  # back to the order of ``features``
        first, second = (torch.cat(x).cpu()[restore_order].numpy() for x in (predictions, labels))
        examples.update({"loss_sums": first, "tokens": second} if spec.kind == CAUSAL_LM
                        else {"predictions": first, "labels": second})
    if spec.kind == CAUSAL_LM:
        return {"loss": loss, "perplexity": metrics_lib.perplexity(loss)}
    p = torch.cat(predictions).cpu().numpy()
    y = torch.cat(labels).cpu().numpy()
    return {"loss": loss, **metrics_lib.compute(spec.metrics, p, y)}


def _sequence_loss_sums(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Each sequence's summed next-token loss over its target tokens (labels shifted by one, as the model does)."""
    targets = labels[:, 1:]
    losses = torch.nn.functional.cross_entropy(logits[:, :-1].float().transpose(1, 2), targets,
                                               ignore_index=data_lib.IGNORE_INDEX, reduction="none")
    return losses.sum(-1)


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
    initial_loss: float | None = None  # the first optimizer step's loss: the divergence reference
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
    steps_per_epoch = _steps_per_epoch(len(features), settings)
    last_step = min(total_steps, math.ceil(settings.epochs * steps_per_epoch))
    eval_every = evaluation_interval(settings, steps_per_epoch)
    batches = _micro_batches(len(features), settings)
    stopper = EarlyStopping(settings.patience, higher_is_better if settings.stop_metric == "main" else False,
                            window=settings.stop_window, min_steps=steps_for_epochs(settings.min_epochs, steps_per_epoch))
    watched = main_metric if settings.stop_metric == "main" else "loss"
    selection = _Selection(state, model, evaluate_selection, main_metric, higher_is_better, stopper, watched,
                           meter, tracker, keep_final=settings.checkpoint == "final")
    bar = _progress_bar(settings, total_steps)
    model.train()
    optimizer.zero_grad()
    last_measured = 0  # the last step whose memory was measured
    try:
        state.stop_reason = None
        while state.step < last_step and state.stop_reason is None:
            micro = list(itertools.islice(batches, settings.grad_accum))
            upcoming = state.step + 1  # memory: a new batch shape, or one step per evaluation interval at least
            measured = meter is not None and (meter.wants("train", _shapes(features, micro)) or (
                upcoming % eval_every == 0 and upcoming - last_measured >= eval_every))
            last_measured = upcoming if measured else last_measured
            started = time.perf_counter()
            with meter.phase("train", measure=measured) if meter is not None else contextlib.nullcontext():
                step = _forward_backward(model, features, micro, spec, settings, device, pad_token_id)
                if step is None:  # the epochs ran out in the middle of an accumulated step
                    break
                if not math.isfinite(step.loss):  # before the update: no NaN reaches the weights
                    state.last_loss = step.loss
                    state.status, state.stop_reason = "diverged", divergence(step.loss, None, None, state.step + 1)
                    break
                optimizer.step()
                optimizer.zero_grad()
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
            _count(state, step, time.perf_counter() - started, steps_per_epoch, settings,
                   timed=not (measured and meter.intrusive))
            _show_progress(state, settings, tracker, bar)
            diverged = divergence(step.loss, state.initial_loss, settings.divergence_factor, state.step)
            if diverged:
                state.status, state.stop_reason = "diverged", diverged
            elif state.step % eval_every == 0 and selection.evaluate(bar):
                state.stop_reason = selection.stopper.reason()
        if state.stop_reason is None:
            state.stop_reason = end_reason(state.step, total_steps, settings)
        if state.status == "completed" and state.step > 0 and not selection.evaluated_at(state.step):
            selection.evaluate(bar)
    except KeyboardInterrupt:
        from sparsegrad.suite.interrupts import cause

        state.status, state.stop_reason = "interrupted", f"interrupted ({cause()}) at step {state.step}"
    finally:
        if bar is not None:
            bar.close()
    return state


@dataclass
class _Step:
    loss: float  # mean over the micro-batches; a non-finite micro-batch loss stops the step at once
    samples: int = 0
    tokens: int = 0


def _shapes(features, micro: list[list[int]]) -> list[tuple[int, int]]:
    """(rows, padded length) of each micro-batch: what a step's memory depends on."""
    return [(len(idx), max(len(features[i]["input_ids"]) for i in idx)) for idx in micro if idx]


def _forward_backward(model, features, micro, spec, settings, device, pad_token_id) -> _Step | None:
    """Gradients of one optimizer step over the ``grad_accum`` micro-batches ``micro`` (index lists); None when
    the data ran out first."""
    if len(micro) < settings.grad_accum:
        return None
    step = _Step(loss=0.0)
    for idx in micro:
        batch = _to(data_lib.collate([features[i] for i in idx], pad_token_id, spec.kind == REGRESSION), device)
        with autocast(device, settings.precision):
            loss = model(**batch).loss.float()
        loss_value = float(loss.detach())
        if not math.isfinite(loss_value):
            return _Step(loss=loss_value)
        (loss / settings.grad_accum).backward()
        step.loss += loss_value / settings.grad_accum
        step.samples += len(idx)
        step.tokens += int(batch["attention_mask"].sum())
    return step


def _count(state: TrainState, step: _Step, seconds: float, steps_per_epoch: int, settings: TrainerSettings,
           timed: bool = True) -> None:
    """Book one optimizer step: counters, throughput (after the timing warm-up, and only ``timed`` steps:
    a step whose memory the CPU gauge measured ran slower), losses."""
    state.step += 1
    state.epoch = state.step / steps_per_epoch
    state.samples += step.samples
    state.tokens += step.tokens
    state.train_seconds += seconds
    if timed and state.step > settings.timing_warmup_steps:
        state.timed_seconds += seconds
        state.timed_steps += 1
        state.timed_samples += step.samples
    state.last_loss = step.loss
    if state.initial_loss is None:
        state.initial_loss = step.loss


def _show_progress(state: TrainState, settings: TrainerSettings, tracker, bar) -> None:
    if tracker is not None and (state.step % max(1, settings.log_every) == 0 or state.step == 1):
        tracker.log({"train/loss": state.last_loss, "train/epoch": state.epoch}, step=state.step)
    if bar is not None:
        bar.update(1)
        rate = state.timed_samples / state.timed_seconds if state.timed_seconds else 0.0
        bar.set_postfix_str(f"loss {state.last_loss:.4f} | {rate:.1f} samples/s")


class _Selection:
    """Evaluation on the selection split: keeps the weights of the best raw main metric and feeds the
    watched metric to the convergence criterion (``stopper``)."""

    def __init__(self, state, model, evaluate_selection, main_metric, higher_is_better, stopper, watched, meter,
                 tracker, keep_final=False):
        self.state, self.model, self.run = state, model, evaluate_selection
        self.keep_final = keep_final  # trainer.checkpoint=final: the latest evaluation is the kept checkpoint
        self.metric, self.higher = main_metric, higher_is_better
        self.stopper, self.watched = stopper, watched
        self.meter, self.tracker = meter, tracker

    def evaluated_at(self, step: int) -> bool:
        return bool(self.state.evaluations) and self.state.evaluations[-1]["step"] == step

    def evaluate(self, bar=None) -> bool:
        """Evaluate now; True when the convergence criterion says stop."""
        state = self.state
        t0 = time.perf_counter()
        with self.meter.phase("eval") if self.meter is not None else contextlib.nullcontext():
            result = self.run()
        state.eval_seconds += time.perf_counter() - t0
        state.evaluations.append({"step": state.step, "epoch": state.epoch, "metrics": result})
        if self.tracker is not None:
            self.tracker.log({f"selection/{k}": v for k, v in result.items()}, step=state.step)
        value = result.get(self.metric)
        self.stopper.update(result.get(self.watched), state.step)
        improved = better(value, state.best_value, self.higher)
        if self.keep_final:
            state.best_value, improved = value, True
        if improved or state.best_snapshot is None:
            state.best_value = value if improved else state.best_value
            state.best_step, state.best_metrics = state.step, result
            state.best_snapshot = snapshot(self.model)
        if bar is not None:
            loss = f"loss {state.last_loss:.4f} | " if state.last_loss is not None else ""
            bar.set_postfix_str(f"{loss}{self.metric} {value:.4f}")
        return self.stopper.should_stop


def _micro_batches(n: int, settings: TrainerSettings):
    """Index lists of ceil(epochs) shuffled epochs, one after the other (seeded by the run's seed)."""
    generator = torch.Generator().manual_seed(settings.seed)
    for _ in range(math.ceil(settings.epochs)):
        yield from data_lib.batch_indices(n, settings.batch_size, True, generator)


def _progress_bar(settings: TrainerSettings, total_steps: int):
    if not settings.progress:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total_steps, desc="train", unit="step", dynamic_ncols=True, leave=False)


def evaluation_interval(settings: TrainerSettings, steps_per_epoch: int) -> int:
    """Optimizer steps between evaluations: ``evals_per_epoch`` times an epoch, else ``eval_every``, else once
    per epoch."""
    if settings.evals_per_epoch:
        return max(1, steps_per_epoch // settings.evals_per_epoch)
    return settings.eval_every or steps_per_epoch


def end_reason(step: int, total_steps: int, settings: TrainerSettings) -> str:
    """Why a run that no stopping rule ended stopped: its linear schedule ran out (the learning rate is 0 at
    ``total_steps``), the step cap, or the end of its epochs."""
    if settings.schedule == "linear" and step >= total_steps:
        return budget_reason(step)
    return CAP_REASON if step >= (settings.max_steps or math.inf) else "epochs done"


def _steps_per_epoch(n_examples: int, settings: TrainerSettings) -> int:
    return max(1, math.ceil(n_examples / settings.batch_size) // settings.grad_accum)


def divergence(loss: float, initial: float | None, factor: float | None, step: int) -> str | None:
    """Why the run diverged at ``step`` (with the hint to lower the learning rate), or None."""
    if not math.isfinite(loss):
        return f"non-finite loss ({loss}) at step {step}; lower trainer.lr"
    if factor and initial is not None and initial > 0 and loss > factor * initial:
        return (f"loss {loss:.4g} at step {step} is above {factor:g} x the first step's {initial:.4g} "
                "(trainer.divergence_factor); lower trainer.lr")
    return None


def planned_steps(n_examples: int, settings: TrainerSettings) -> int:
    """Optimizer steps the run will take if nothing stops it early (for schedules and progress bars)."""
    total = int(math.ceil(settings.epochs * _steps_per_epoch(n_examples, settings)))
    if settings.max_steps:
        total = min(total, settings.max_steps)
    return max(1, total)


def warmup_steps(settings: TrainerSettings, total_steps: int) -> int:
    return settings.warmup_steps or int(round(settings.warmup_ratio * total_steps))
