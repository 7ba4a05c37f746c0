"""One fine-tuning run, end to end: data, model, method, training, evaluation, run record.

:func:`finetune` takes plain settings (no Hydra) and returns the run record; the Hydra entry point
``experiments/finetune.py`` builds the settings from the composed config with
:func:`settings_from_config`. The record is written on every exit path: completed, diverged,
interrupted (Ctrl-C) or failed (the exception is re-raised after writing).
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
import traceback
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sparsegrad.suite import record as record_lib
from sparsegrad.suite.errors import ConfigError
from sparsegrad.suite.methods import MethodSettings
from sparsegrad.suite.models import ModelSettings
from sparsegrad.suite.tasks import CAUSAL_LM, TaskSettings
from sparsegrad.suite.tracking import LoggerSettings
from sparsegrad.suite.trainer import TrainerSettings


@dataclass
class FinetuneSettings:
    model: ModelSettings
    method: MethodSettings
    task: TaskSettings
    trainer: TrainerSettings
    logger: LoggerSettings = field(default_factory=LoggerSettings)
    output_dir: str = "outputs/run"
    save_model: bool = False
    data_cache: str | None = None
    resolved_config: dict[str, Any] = field(default_factory=dict)


def _build(cls, values: dict, group: str):
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise ConfigError(f"unknown key(s) in the {group} config: {unknown}; valid keys: {sorted(names)}")
    return cls(**values)


def settings_from_config(cfg: dict, output_dir: str) -> FinetuneSettings:
    """Settings from a resolved config dict (the shape of conf/config.yaml)."""
    for group in ("model", "method", "task", "trainer"):
        if group not in cfg or not isinstance(cfg[group], dict):
            raise ConfigError(f"the config has no {group!r} group")
    logger = dict(cfg.get("logger") or {"name": "none"})
    trainer = dict(cfg["trainer"])
    if cfg.get("seed") is not None:
        trainer["seed"] = cfg["seed"]
    paths = cfg.get("paths") or {}
    return FinetuneSettings(
        model=_build(ModelSettings, dict(cfg["model"]), "model"),
        method=_build(MethodSettings, dict(cfg["method"]), "method"),
        task=_build(TaskSettings, dict(cfg["task"]), "task"),
        trainer=_build(TrainerSettings, trainer, "trainer"),
        logger=_build(LoggerSettings, logger, "logger"),
        output_dir=str(output_dir),
        save_model=bool(cfg.get("save_model", False)),
        data_cache=paths.get("data_cache"),
        resolved_config=cfg,
    )


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
    import sys

    print(message, file=sys.stderr, flush=True)


def finetune(settings: FinetuneSettings) -> dict:
    """Run one fine-tuning job and return its (already written) run record."""
    import torch

    from sparsegrad.suite import data as data_lib
    from sparsegrad.suite import measure, methods, models, tasks
    from sparsegrad.suite import trainer as trainer_lib
    from sparsegrad.suite.tracking import make_tracker

    t_start = time.perf_counter()
    ts = settings.trainer
    out_dir = Path(settings.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if ts.threads:
        torch.set_num_threads(int(ts.threads))
    device = trainer_lib.resolve_device(ts.device)
    spec = tasks.TASKS.get(settings.task.name)
    metric_name, higher = (spec.main_metric, spec.higher_is_better) if spec else ("", True)
    record: dict[str, Any] = {
        "schema_version": record_lib.SCHEMA_VERSION,
        "run_id": uuid.uuid4().hex[:12],
        "status": "failed",
        "error": None,
        "started_at": _now(),
        "finished_at": _now(),
        "wall_seconds": 0.0,
        "model": settings.model.name,
        "method": settings.method.name,
        "task": settings.task.name,
        "seed": int(ts.seed),
        "output_dir": str(out_dir),
        "config": settings.resolved_config,
        "environment": measure.environment(device),
        "parameters": {"total": 0, "trainable_dense": 0, "sparse_matrices": 0, "sparse_budget_per_matrix": None,
                       "sparse_budget_total": None, "updated_coordinates_union": None, "optimizer_state_bytes": None},
        "main_metric": {"name": metric_name, "higher_is_better": higher, "selection_split": "", "report_splits": [],
                        "report_split": ""},
        "evaluations": [],
        "best": None,
        "final": None,
        "objective": None,
        "training": {"optimizer_steps": 0, "epochs": 0.0, "samples": 0, "tokens": 0, "train_seconds": 0.0,
                     "eval_seconds": 0.0, "timed_steps": 0, "warmup_steps_excluded": int(ts.timing_warmup_steps),
                     "steps_per_second": None, "samples_per_second": None, "stop_reason": "not started",
                     "last_loss": None},
        "memory": {"device_type": device.type, "how": "", "baseline_bytes": None, "train_peak_bytes": None,
                   "eval_peak_bytes": None},
        "basis": None,
        "logger": None,
    }
    meter = measure.MemoryMeter(device)
    record["memory"]["how"] = meter.how
    tracker = None
    state = None
    pending: BaseException | None = None
    try:
        # ------------------------------------------------------------------ data and model
        spec = tasks.get_task(settings.task.name)
        metric_name, higher = tasks.main_metric(spec, settings.task)
        record["main_metric"].update(name=metric_name, higher_is_better=higher)
        seed_everything(ts.seed)
        raw = tasks.load_raw_splits(spec, settings.task, cache_dir=settings.data_cache)
        split_data = tasks.arrange_splits(spec, settings.task, raw, ts.protocol, ts.heldout_fraction, ts.heldout_max)
        record["main_metric"].update(
            selection_split=split_data.selection_name,
            report_splits=list(split_data.report),
            report_split=spec.test_split if spec.test_split in split_data.report else spec.main_split,
        )
        models.check_compatible(settings.model, spec)
        tokenizer = models.load_tokenizer(settings.model, _texts_for_tokenizer(split_data.train))
        models.check_compatible(settings.model, spec, tokenizer)
        max_len = settings.task.max_length

        def encode(examples):
            if spec.kind == CAUSAL_LM:
                return data_lib.encode_chat(examples, tokenizer, max_len)
            return data_lib.encode_classification(examples, tokenizer, max_len)

        train_features = encode(split_data.train)
        selection_features = encode(split_data.selection)
        report_features = {k: encode(v) for k, v in split_data.report.items()}
        if not train_features or not selection_features:
            raise ConfigError(f"{spec.name}: no usable examples after tokenisation (max_length={max_len})")
        pad_id = int(tokenizer.pad_token_id)
        seed_everything(ts.seed)
        model = models.build_model(settings.model, spec, tokenizer).to(device)

        # ------------------------------------------------------------------ method
        basis = None
        meter.start()
        if settings.method.kind in methods.BASIS_KINDS:
            gen = torch.Generator().manual_seed(ts.seed + 1)
            idx_lists = data_lib.batch_indices(len(train_features), ts.batch_size, True, gen)
            basis_batches = (data_lib.collate([train_features[i] for i in idx], pad_id, spec.kind == "regression")
                             for idx in idx_lists[: settings.method.basis_steps])
            with meter.phase("basis"):
                basis, seconds = methods.estimate_basis(model, settings.method, basis_batches)
            record["basis"] = {"seconds": float(seconds), "peak_bytes": meter.peak("basis"),
                               "batches": int(getattr(basis, "stats", {}).get("steps", settings.method.basis_steps)),
                               "micro_batch": settings.method.basis_micro_batch,
                               "orientation": settings.method.orientation or "hosvd"}
        seed_everything(ts.seed)
        model = methods.apply(model, settings.method, basis)
        model.to(device)
        total_steps = trainer_lib.planned_steps(len(train_features), ts)
        optimizer = methods.build_optimizer(
            model, lr=ts.lr, weight_decay=ts.weight_decay, schedule=ts.schedule,
            warmup_steps=trainer_lib.warmup_steps(ts, total_steps), total_steps=total_steps,
            max_grad_norm=ts.max_grad_norm,
        )
        record["parameters"] = methods.accounting(model, optimizer)

        # ------------------------------------------------------------------ tracking
        run_name = f"{settings.model.name}-{settings.method.name}-{settings.task.name}-s{ts.seed}"
        tracker = make_tracker(settings.logger, out_dir, settings.resolved_config, run_name)
        record["logger"] = tracker.describe()
        record["memory"]["baseline_bytes"] = meter.current_bytes()

        eval_kwargs = {"batch_size": ts.eval_batch_size, "device": device, "precision": ts.precision, "pad_token_id": pad_id}

        def evaluate_selection():
            return trainer_lib.evaluate(model, selection_features, spec, **eval_kwargs)

        # ------------------------------------------------------------------ training
        state = trainer_lib.TrainState()
        _print(f"[finetune] {run_name}: {len(train_features)} train / {len(selection_features)} "
               f"{split_data.selection_name} examples, {total_steps} steps planned on {device}; output {out_dir}")
        try:
            state = trainer_lib.train(
                model, optimizer, train_features, spec, ts, device=device, pad_token_id=pad_id,
                evaluate_selection=evaluate_selection, main_metric=metric_name, higher_is_better=higher,
                total_steps=total_steps, meter=meter, tracker=tracker, state=state,
            )
        except BaseException:
            state.stop_reason = "failed"
            raise
        finally:
            for ev in state.evaluations:
                ev.setdefault("split", split_data.selection_name)
            record["evaluations"] = [
                {"step": ev["step"], "epoch": float(ev["epoch"]), "split": split_data.selection_name,
                 "role": "selection", "checkpoint": "current", "metrics": ev["metrics"]}
                for ev in state.evaluations
            ]
        record["status"] = state.status

        # ------------------------------------------------------------------ reporting
        def report_all(checkpoint: str) -> dict:
            results = {}
            for split, feats in report_features.items():
                t0 = time.perf_counter()
                with meter.phase("eval"):
                    results[split] = trainer_lib.evaluate(model, feats, spec, **eval_kwargs)
                state.eval_seconds += time.perf_counter() - t0
                record["evaluations"].append({"step": state.step, "epoch": float(state.epoch), "split": split,
                                              "role": "report", "checkpoint": checkpoint, "metrics": results[split]})
                tracker.summary({f"{checkpoint}/{split}/{k}": v for k, v in results[split].items()})
            return results

        report_split = record["main_metric"]["report_split"]
        if state.status in ("completed", "diverged") and state.step > 0:
            final_selection = state.evaluations[-1]["metrics"] if state.evaluations else {}
            if state.status == "completed":
                final_report = report_all("current")
                record["final"] = {"step": state.step, "selection": final_selection, "report": final_report,
                                   "score": final_report.get(report_split, {}).get(metric_name)}
            record["parameters"] = methods.accounting(model, optimizer)  # before restoring: the whole run
            if state.best_snapshot is not None and state.status == "completed":
                trainer_lib.restore(model, state.best_snapshot)
                best_report = (record["final"]["report"] if state.best_step == state.step else report_all("best"))
                record["best"] = {"step": int(state.best_step), "selection": state.best_metrics or {},
                                  "report": best_report, "score": best_report.get(report_split, {}).get(metric_name)}
                chosen = state.best_metrics if ts.objective == "selection" else best_report.get(report_split, {})
                record["objective"] = chosen.get(metric_name)
                tracker.summary({"best/score": record["best"]["score"], "objective": record["objective"]})
        elif state.status == "interrupted":
            record["parameters"] = methods.accounting(model, optimizer)
            if state.best_metrics is not None and ts.objective == "selection":
                record["objective"] = state.best_metrics.get(metric_name)

        if settings.save_model and state.status == "completed":
            merged = methods.merge(model)
            merged.save_pretrained(out_dir / "model")
            tokenizer.save_pretrained(out_dir / "model")
    except KeyboardInterrupt as exc:  # Ctrl-C outside the training loop (data loading, basis, reporting)
        record["status"] = "interrupted"
        record["error"] = "interrupted (Ctrl-C)"
        pending = exc
    except BaseException as exc:
        record["status"] = "failed"
        record["error"] = f"{type(exc).__name__}: {exc}\n" + "".join(traceback.format_exception(exc)[-6:])
        pending = exc
    finally:
        meter.stop()
        if state is not None:
            record["training"].update(
                optimizer_steps=state.step, epochs=float(state.epoch), samples=state.samples, tokens=state.tokens,
                train_seconds=state.train_seconds, eval_seconds=state.eval_seconds, timed_steps=state.timed_steps,
                steps_per_second=(state.timed_steps / state.timed_seconds) if state.timed_seconds > 0 else None,
                samples_per_second=(state.timed_samples / state.timed_seconds) if state.timed_seconds > 0 else None,
                stop_reason=state.stop_reason, last_loss=state.last_loss,
            )
            if state.status == "diverged" and record["status"] != "failed":
                record["status"], record["error"] = "diverged", state.stop_reason
            if state.status == "interrupted":
                record["error"] = state.stop_reason
        record["memory"]["train_peak_bytes"] = meter.peak("train")
        record["memory"]["eval_peak_bytes"] = meter.peak("eval")
        record["finished_at"] = _now()
        record["wall_seconds"] = time.perf_counter() - t_start
        if record["status"] == "completed" and record["best"] is None:
            record["status"], record["error"] = "failed", "training ended without an evaluated checkpoint"
        if record["status"] == "failed" and record["error"] is None:
            record["error"] = "failed"
        path = record_lib.write(record, out_dir)
        if tracker is not None:
            try:
                tracker.summary({"status": record["status"]})
                tracker.finish(exit_code=0 if record["status"] == "completed" else 1)
            except Exception as exc:  # logging must never hide the run's own outcome
                _print(f"[finetune] W&B finish failed: {exc}")
        _print(f"[finetune] {record['status']}: record written to {path}")
    if pending is not None:
        raise pending
    return record


def objective_value(record: dict) -> float:
    """The float an Optuna sweep optimises: the record's objective, nan when the run has none."""
    value = record.get("objective")
    return float(value) if value is not None and math.isfinite(value) else math.nan


def default_output_dir() -> str:
    return os.path.join("outputs", "runs", datetime.now().strftime("%Y-%m-%d_%H-%M-%S"))
