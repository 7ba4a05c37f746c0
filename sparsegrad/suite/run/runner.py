"""One fine-tuning run as a short sequence of named steps, each a function below:

    check    settings checked first (no model is loaded)              settings.check_settings, methods.check_kind
    start    the run record's skeleton, the device, the memory meter  start
    load     splits, tokenizer, token ids                             load_data
    build    the model with the task's head                           build_model
    basis    SparseGrad's preliminary phase (basis methods only)      estimate_basis
    method   the method applied, the optimizer built                  apply_method
    train    the training loop (sparsegrad.suite.run.trainer)             train
    evaluate report splits for the final and the best checkpoint      evaluate
    record   record.json written, the logger closed, a summary shown  write_record

:func:`finetune` takes plain settings (no Hydra) and returns the run record; the Hydra entry point
``experiments/finetune.py`` builds the settings from the composed config with
:func:`settings_from_config`. The record is written on every exit path after the check: completed,
diverged, interrupted (Ctrl-C or SIGTERM) or failed (the exception is re-raised after writing). When the
record cannot be written (a read-only or full disk) the summary is still printed, the record goes
to a fallback file (or to the screen) and :class:`RecordWriteError` says so.
"""

from __future__ import annotations

import json
import math
import os
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sparsegrad.suite.errors import ConfigError, SuiteError
from sparsegrad.suite.run import record as record_lib
from sparsegrad.suite.run.methods import check_kind
from sparsegrad.suite.run.settings import FinetuneSettings, check_settings, settings_from_config
from sparsegrad.suite.run.tasks import CAUSAL_LM

__all__ = ["FinetuneSettings", "RecordWriteError", "finetune", "objective_value", "settings_from_config",
           "summary_line"]


class RecordWriteError(SuiteError):
    """The run finished but its record could not be written where it belongs; ``record`` holds it."""

    def __init__(self, message: str, record: dict):
        super().__init__(message)
        self.record = record


def seed_everything(seed: int) -> None:
    """Python's, NumPy's and torch's generators (every device), by :func:`transformers.set_seed`."""
    from transformers import set_seed

    set_seed(seed)


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def _texts_for_tokenizer(examples: list[dict]) -> list[str]:
    texts = []
    for e in examples:
        if "messages" in e:
            texts.extend(m["content"] for m in e["messages"])
        else:
            texts.extend(t for t in e["texts"] if t)
    return texts


def _print(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


@dataclass
class Run:
    """What the steps share: the settings, where things run and the record being filled in."""

    settings: FinetuneSettings
    out_dir: Path
    device: Any
    meter: Any
    record: dict
    t_start: float
    spec: Any = None
    tracker: Any = None
    state: Any = None  # the trainer's TrainState once training starts
    name: str = ""
    lease: Any = None  # the GPU this run holds among concurrent runs of the node (sparsegrad.suite.run.devices)
    baseline_rss: int | None = None  # the process's RSS before training (CPU), beside the live bytes
    examples: dict = field(default_factory=dict)  # checkpoint -> per-example results on the reported split

    @property
    def trainer(self):
        return self.settings.trainer


@dataclass
class Data:
    """The run's splits as token ids."""

    selection_name: str
    train: list[dict]
    selection: list[dict]
    report: dict[str, list[dict]]
    tokenizer: Any
    pad_id: int
    regression: bool = False


def finetune(settings: FinetuneSettings) -> dict:
    """Run one fine-tuning job and return its (already written) run record."""
    problems = check_settings(settings) or check_kind(settings.method)  # the latter loads the method layer
    if problems:
        raise ConfigError("\n".join(problems))
    run = start(settings)
    pending: BaseException | None = None
    try:
        data = load_data(run)
        model = build_model(run, data)
        # the basis is not kept past apply_method: its matrices live on in the layers, the rest is freed
        model, optimizer = apply_method(run, model, estimate_basis(run, model, data), data)
        train(run, model, optimizer, data)
        evaluate(run, model, optimizer, data)
        if settings.save_model and run.record["status"] == "completed":
            save_model(run, model, data)
    except KeyboardInterrupt as exc:  # Ctrl-C or SIGTERM outside the training loop (data, basis, reporting)
        from sparsegrad.suite.interrupts import cause

        run.record.update(status="interrupted", error=f"interrupted ({cause()})")
        pending = exc
    except BaseException as exc:
        run.record.update(status="failed", error=f"{type(exc).__name__}: {exc}\n"
                          + "".join(traceback.format_exception(exc)[-6:]))
        pending = exc
    finally:
        write_error = write_record(run)
        if run.lease is not None:
            run.lease.release()
    if pending is not None:
        if write_error is not None:
            _print(f"[finetune] {write_error}")
        raise pending
    if write_error is not None:
        raise RecordWriteError(write_error, run.record)
    return run.record


# ------------------------------------------------------------------------------------------ steps


def start(settings: FinetuneSettings) -> Run:
    """The record's skeleton (status failed until a later step says otherwise), device and meter."""
    import torch

    from sparsegrad.suite.run import devices, measure, tasks
    from sparsegrad.suite.run import trainer as trainer_lib

    ts = settings.trainer
    out_dir = Path(settings.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if ts.threads:
        torch.set_num_threads(int(ts.threads))
    lease = devices.acquire(ts.device)  # concurrent runs of a node: one GPU each
    device = trainer_lib.resolve_device(lease.device if lease else ts.device)
    if device.type == "cuda" and device.index is not None:
        torch.cuda.set_device(device)  # nothing of this run lands on device 0 by default
    spec = tasks.get_task(settings.task.name)
    metric_name, higher = tasks.main_metric(spec, settings.task)
    meter = measure.MemoryMeter(device)
    record = record_lib.new_record(
        model=settings.model.name, method=settings.method.name, task=settings.task.name, seed=int(ts.seed),
        output_dir=str(out_dir), config=settings.resolved_config, environment=measure.environment(device),
        main_metric=metric_name, higher_is_better=higher, device_type=device.type, memory_how=meter.how,
        memory_gauge=meter.gauge, timing_warmup_steps=int(ts.timing_warmup_steps),
    )
    if lease is not None:
        record["environment"]["device_lease"] = lease.describe()
    name = f"{settings.model.name}-{settings.method.name}-{settings.task.name}-s{ts.seed}"
    return Run(settings, out_dir, device, meter, record, time.perf_counter(), spec=spec, name=name, lease=lease)


def load_data(run: Run) -> Data:
    """Splits arranged by the protocol, the tokenizer, every split as token ids."""
    from sparsegrad.suite.run import data as data_lib
    from sparsegrad.suite.run import models, tasks

    s, ts, spec = run.settings, run.trainer, run.spec
    seed_everything(ts.seed)
    raw = tasks.load_raw_splits(spec, s.task, cache_dir=s.data_cache)
    splits = tasks.arrange_splits(spec, s.task, raw, ts.protocol, ts.heldout_fraction, ts.heldout_max)
    warning = tasks.label_warning(spec, splits.train)
    if warning:
        _print(f"[finetune] warning: {warning}")
    run.record["main_metric"].update(
        selection_split=splits.selection_name, report_splits=list(splits.report),
        report_split=spec.test_split if spec.test_split in splits.report else spec.main_split,
    )
    models.check_compatible(s.model, spec)
    tokenizer = models.load_tokenizer(s.model, _texts_for_tokenizer(splits.train))
    models.check_compatible(s.model, spec, tokenizer)
    encode = data_lib.encode_chat if spec.kind == CAUSAL_LM else data_lib.encode_classification
    data = Data(splits.selection_name, encode(splits.train, tokenizer, s.task.max_length),
                encode(splits.selection, tokenizer, s.task.max_length),
                {k: encode(v, tokenizer, s.task.max_length) for k, v in splits.report.items()},
                tokenizer, int(tokenizer.pad_token_id), regression=spec.kind == "regression")
    if not data.train or not data.selection:
        raise ConfigError(f"{spec.name}: no usable examples after tokenisation (task.max_length={s.task.max_length})")
    return data


def build_model(run: Run, data: Data):
    """The pretrained (or tiny random) model with the head the task needs, on the run's device."""
    from sparsegrad.suite.run import models

    seed_everything(run.trainer.seed)
    return models.build_model(run.settings.model, run.spec, data.tokenizer).to(run.device)


def estimate_basis(run: Run, model, data: Data):
    """The transition basis from a few backward passes (no weight change), or None for other methods."""
    import torch

    from sparsegrad.suite.run import data as data_lib
    from sparsegrad.suite.run import methods

    ms, ts = run.settings.method, run.trainer
    run.meter.watch(model).start()  # memory is measured from here on: basis, training, evaluation
    if ms.kind not in methods.BASIS_KINDS:
        return None
    gen = torch.Generator().manual_seed(ts.seed + 1)
    idx_lists = data_lib.batch_indices(len(data.train), ts.batch_size, True, gen)
    batches = (data_lib.collate([data.train[i] for i in idx], data.pad_id, data.regression)
               for idx in idx_lists[: ms.basis_steps])
    with run.meter.phase("basis"):
        basis, seconds = methods.estimate_basis(model, ms, batches)
    run.record["basis"] = {"seconds": float(seconds), "peak_bytes": run.meter.peak("basis"),
                           "batches": int(getattr(basis, "stats", {}).get("steps", ms.basis_steps)),
                           "micro_batch": ms.basis_micro_batch, "orientation": ms.orientation or "hosvd"}
    return basis


def apply_method(run: Run, model, basis, data: Data):
    """The method wrapped around the target linears and its optimizer; (model, optimizer)."""
    from sparsegrad.suite.run import methods
    from sparsegrad.suite.run import trainer as trainer_lib
    from sparsegrad.suite.run.tracking import make_tracker

    s, ts = run.settings, run.trainer
    seed_everything(ts.seed)
    model = methods.apply(model, s.method, basis).to(run.device)
    total_steps = trainer_lib.planned_steps(len(data.train), ts)
    optimizer = methods.build_optimizer(
        model, lr=ts.lr, weight_decay=ts.weight_decay, schedule=ts.schedule,
        warmup_steps=trainer_lib.warmup_steps(ts, total_steps), total_steps=total_steps,
        max_grad_norm=ts.max_grad_norm,
    )
    run.record["parameters"] = methods.accounting(model, optimizer)
    _check_budget(run)
    run.tracker = make_tracker(s.logger, run.out_dir, s.resolved_config, run.name)
    run.record["logger"] = run.tracker.describe()
    run.meter.watch(model, optimizer)
    run.record["memory"]["baseline_bytes"] = run.meter.current_bytes()
    run.baseline_rss = run.meter.current_rss()
    return model, optimizer


def _check_budget(run: Run) -> None:
    """A count k the method layer had to cap at a matrix's size means dense training: refused unless allowed
    (catches models whose size the settings check could not read, e.g. a Hub id)."""
    ms, budget = run.settings.method, run.record["parameters"]["sparse_budget_per_matrix"]
    if ms.kind == "shira":  # peft sizes its mask r (in + out), which may fall short of k without any cap
        return
    if isinstance(ms.k, int) and not isinstance(ms.k, bool) and budget is not None and ms.k > budget \
            and not ms.allow_dense and ms.mode != "output":
        raise ConfigError(f"method.k={ms.k}: above the {budget} entries of the largest MLP matrix of "
                          f"{run.settings.model.name}, i.e. dense training; use method.k <= {budget} or a fraction, "
                          "or method.allow_dense=true if dense is meant")


def train(run: Run, model, optimizer, data: Data) -> None:
    """The training loop; its state (steps, losses, evaluations, best weights) lands in ``run.state``."""
    from sparsegrad.suite.run import trainer as trainer_lib

    ts, spec, record = run.trainer, run.spec, run.record
    eval_kwargs = {"batch_size": ts.eval_batch_size, "device": run.device, "precision": ts.precision,
                   "pad_token_id": data.pad_id}
    total_steps = trainer_lib.planned_steps(len(data.train), ts)
    run.state = trainer_lib.TrainState()
    _print(f"[finetune] {run.name}: {len(data.train)} train / {len(data.selection)} {data.selection_name} "
           f"examples, {total_steps} steps planned on {run.device}; output {run.out_dir}")
    try:
        trainer_lib.train(
            model, optimizer, data.train, spec, ts, device=run.device, pad_token_id=data.pad_id,
            evaluate_selection=lambda: trainer_lib.evaluate(model, data.selection, spec, **eval_kwargs),
            main_metric=record["main_metric"]["name"], higher_is_better=record["main_metric"]["higher_is_better"],
            total_steps=total_steps, meter=run.meter, tracker=run.tracker, state=run.state,
        )
    except BaseException:
        run.state.stop_reason = "failed"
        raise
    finally:
        record["evaluations"] = [
            {"step": ev["step"], "epoch": float(ev["epoch"]), "split": data.selection_name, "role": "selection",
             "checkpoint": "current", "metrics": ev["metrics"]}
            for ev in run.state.evaluations
        ]
    record["status"] = run.state.status


def evaluate(run: Run, model, optimizer, data: Data) -> None:
    """Accounting of the whole run; for a completed run the report splits at the final and the best
    checkpoint (restored) and the objective; for an interrupted one the objective seen so far."""
    from sparsegrad.suite.run import methods
    from sparsegrad.suite.run import trainer as trainer_lib

    state, record, ts = run.state, run.record, run.trainer
    metric, report_split = record["main_metric"]["name"], record["main_metric"]["report_split"]
    if state.step > 0 or state.status == "interrupted":
        record["parameters"] = methods.accounting(model, optimizer)  # before restoring: the whole run
    if state.status == "interrupted":
        if state.best_metrics is not None and ts.objective == "selection":
            record["objective"] = state.best_metrics.get(metric)
        return
    if state.status != "completed" or state.step == 0:
        return
    final_report = _report(run, model, data, "current")
    record["final"] = {"step": state.step, "selection": state.evaluations[-1]["metrics"] if state.evaluations else {},
                       "report": final_report, "score": final_report.get(report_split, {}).get(metric)}
    if state.best_snapshot is None:
        return
    trainer_lib.restore(model, state.best_snapshot)
    best_report = final_report if state.best_step == state.step else _report(run, model, data, "best")
    record["best"] = {"step": int(state.best_step), "selection": state.best_metrics or {}, "report": best_report,
                      "score": best_report.get(report_split, {}).get(metric)}
    best_examples = run.examples.get("current" if best_report is final_report else "best")
    record["examples"] = dict(best_examples, checkpoint="best") if best_examples else None
    chosen = state.best_metrics if ts.objective == "selection" else best_report.get(report_split, {})
    record["objective"] = chosen.get(metric)
    run.tracker.summary({"best/score": record["best"]["score"], "objective": record["objective"]})


def _report(run: Run, model, data: Data, checkpoint: str) -> dict:
    from sparsegrad.suite.run import examples as examples_lib
    from sparsegrad.suite.run import trainer as trainer_lib

    ts, state, results = run.trainer, run.state, {}
    for split, features in data.report.items():
        t0 = time.perf_counter()
        per_example: dict | None = {} if split == run.record["main_metric"]["report_split"] else None
        with run.meter.phase("eval"):
            results[split] = trainer_lib.evaluate(model, features, run.spec, batch_size=ts.eval_batch_size,
                                                  device=run.device, precision=ts.precision, pad_token_id=data.pad_id,
                                                  examples=per_example)
        state.eval_seconds += time.perf_counter() - t0
        if per_example:
            run.examples[checkpoint] = examples_lib.entry(run.spec.kind, split, checkpoint, **per_example)
        run.record["evaluations"].append({"step": state.step, "epoch": float(state.epoch), "split": split,
                                          "role": "report", "checkpoint": checkpoint, "metrics": results[split]})
        run.tracker.summary({f"{checkpoint}/{split}/{k}": v for k, v in results[split].items()})
    return results


def save_model(run: Run, model, data: Data) -> None:
    """A plain Hugging Face model with the method merged back, in <run dir>/model."""
    from sparsegrad.suite.run import methods

    merged = methods.merge(model)
    merged.save_pretrained(run.out_dir / "model")
    data.tokenizer.save_pretrained(run.out_dir / "model")


def write_record(run: Run) -> str | None:
    """Finish the record, write it, close the logger and print the outcome; a write problem is returned."""
    record, state = run.record, run.state
    run.meter.stop()
    if state is not None:
        record["training"].update(
            optimizer_steps=state.step, epochs=float(state.epoch), samples=state.samples, tokens=state.tokens,
            train_seconds=state.train_seconds, eval_seconds=state.eval_seconds, timed_steps=state.timed_steps,
            steps_per_second=(state.timed_steps / state.timed_seconds) if state.timed_seconds > 0 else None,
            samples_per_second=(state.timed_samples / state.timed_seconds) if state.timed_seconds > 0 else None,
            stop_reason=state.stop_reason, last_loss=state.last_loss, initial_loss=state.initial_loss,
        )
        if state.status == "diverged" and record["status"] != "failed":
            record["status"], record["error"] = "diverged", state.stop_reason
        if state.status == "interrupted":
            record["error"] = state.stop_reason
    record["memory"].update(run.meter.summary(record["memory"]["baseline_bytes"], run.baseline_rss))
    record["finished_at"] = _now()
    record["wall_seconds"] = time.perf_counter() - run.t_start
    if record["status"] == "completed" and record["best"] is None:
        record["status"], record["error"] = "failed", "training ended without an evaluated checkpoint"
    if record["status"] == "failed" and record["error"] is None:
        record["error"] = "failed"
    problem = None
    try:
        path = str(record_lib.write(record, run.out_dir))
    except OSError as exc:
        path, problem = None, _save_elsewhere(record, run.out_dir, exc)
    if run.tracker is not None:
        try:
            run.tracker.summary({"status": record["status"]})
            run.tracker.finish(exit_code=0 if record["status"] == "completed" else 1)
            hint = run.tracker.upload_hint()
            if hint:
                _print(f"[finetune] {hint}")
        except Exception as exc:  # logging must never hide the run's own outcome
            _print(f"[finetune] W&B finish failed: {exc}")
    if path is not None:
        _print(f"[finetune] record ({record['status']}) written to {path}")
    else:
        _print(summary_line(record, None))
    return problem


def _save_elsewhere(record: dict, out_dir: Path, exc: OSError) -> str:
    """The record to a fallback file (or, failing that, to stdout); returns the message that says where."""
    reason = f"could not write {out_dir / record_lib.RECORD_FILENAME}: {exc.strerror or exc}"
    fallback = Path(tempfile.gettempdir()) / "sparsegrad-records" / record["run_id"]
    try:
        where = record_lib.write(record, fallback, validate_first=False)
        return f"{reason}; the record was saved to {where} instead (move it into the run folder)"
    except OSError:
        print(json.dumps(record_lib._json_safe(record), default=str), flush=True)
        return f"{reason}, nor to {fallback}; the record was printed to standard output above"


def summary_line(record: dict, path: str | os.PathLike | None) -> str:
    """What happened, on one line: the score (or why there is none), time and where the record is."""
    where = f"record {path}" if path else "record NOT written (see below)"
    status = record["status"]
    if status == "diverged":
        lr = (record.get("config") or {}).get("trainer", {}).get("lr")
        return f"[finetune] diverged: {record['error']} (now trainer.lr={lr}); {where}"
    if status in ("failed", "interrupted"):
        return f"[finetune] {status}: {(record.get('error') or '').splitlines()[0] if record.get('error') else ''}; {where}"
    mm, best = record["main_metric"], record.get("best") or {}
    return (f"[finetune] {status}: {mm['name']} = {best.get('score')} on {mm['report_split']} (selection "
            f"{mm['selection_split']}: {record.get('objective')}); {record['wall_seconds']:.1f} s; {where}")


def objective_value(record: dict) -> float:
    """The float an Optuna sweep optimises: the record's objective, nan when the run has none (diverged, failed)."""
    value = record.get("objective")
    return float(value) if value is not None and math.isfinite(value) else math.nan


def default_output_dir() -> str:
    return os.path.join("outputs", "runs", datetime.now().strftime("%Y-%m-%d_%H-%M-%S"))
