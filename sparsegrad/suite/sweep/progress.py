"""A profile's plan before it starts, and one progress bar with an ETA over its runs.

:func:`make_plan` counts the runs a profile still has to do (sweep trials, seed re-runs, kept-fraction
runs; what the run records under ``results/<profile>/records`` already hold is not counted again, so a
resumed profile plans only the rest) and estimates how long they take from measured speed:

    seconds per run = overhead + steps / (steps per second)

per (model, method), taken from this profile's own run records where it has some (their median
``steps_per_second``, ``optimizer_steps`` and the rest of ``wall_seconds`` as overhead), else from the
profile's ``plan`` section (numbers measured on 2 CPU cores, one thread per run; keyed by method, with
an optional ``default``). Runs launched ``jobs`` at a time divide the sum by ``jobs`` where the speed was
measured in this profile's records (their wall times already include the sharing of the cores), and by
``min(jobs, cores / threads per run)`` where it comes from the plan section (the speed of a run alone):
three one-thread runs at a time on 2 cores go no faster than two.

A profile with neither (``paper``, ``paper_best``) is planned in GPU-hours, per study and in total, from
the task sizes, its epochs and the paper's steps/s (:mod:`sparsegrad.suite.sweep.paper_speed`), with one
run per GPU of this machine at a time. For a SLURM launcher the plan gives no wall time from this
machine: the runs to do, how many this driver keeps in flight, the trials running now on any worker, and
the run time in all.

:class:`RunProgress` shows one tqdm bar over the planned runs. The driver's runs are Hydra subprocesses,
so the bar polls the work folder for new ``record.json`` files while the driver waits on each
subprocess (:meth:`RunProgress.wait`). Its ETA is the plan's (less the time elapsed) until a first
batch of ``jobs`` runs has finished (or the plan's time has passed), then the measured pace (elapsed / runs
done) times the runs left.
"""

from __future__ import annotations

import math
import os
import statistics
import subprocess
import sys
import time
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

DEFAULT_ESTIMATE = {"steps_per_second": 2.0, "steps_per_run": 100, "overhead_seconds": 30.0}


@dataclass
class PlannedStudy:
    model: str
    method: str
    task: str
    sweep: int  # trials to run
    seeds: int  # seed re-runs to run
    kept: int = 0  # kept-fraction runs to run
    seconds_per_run: float = 0.0
    source: str = ""  # where the estimate comes from
    measured: bool = False  # the estimate comes from this profile's records (wall times under sharing)
    gpu: bool = False  # the estimate is GPU time from the paper's speeds (sparsegrad.suite.sweep.paper_speed)

    @property
    def runs(self) -> int:
        return self.sweep + self.seeds + self.kept


@dataclass
class Plan:
    profile: str
    studies: list[PlannedStudy]
    jobs: int = 1
    done: int = 0  # runs already in the records (reused)
    notes: list[str] = field(default_factory=list)
    slots: int | None = None  # runs the cores can carry at once (cores / threads per run); None: jobs
    cluster: bool = False  # the runs are submitted to SLURM: the wall time is the queue's
    gpus: int = 0  # GPUs of this machine (local launchers), for plans in GPU-hours
    in_flight: int | None = None  # trials of these studies running now on any worker (cluster plans)

    @property
    def runs(self) -> int:
        return sum(s.runs for s in self.studies)

    @property
    def parallel(self) -> int:
        return max(1, min(self.jobs, self.slots or self.jobs))

    def _at_once(self, study: PlannedStudy) -> int:
        if self.cluster or study.measured:  # SLURM runs `jobs` at a time at best; records hold shared wall times
            return self.jobs
        if study.gpu:  # one run per GPU (sparsegrad.suite.run.devices)
            return max(1, min(self.jobs, self.gpus or 1))
        return self.parallel

    @property
    def seconds(self) -> float:
        return sum(s.runs * s.seconds_per_run / self._at_once(s) for s in self.studies)

    @property
    def gpu_hours(self) -> float:
        return sum(s.runs * s.seconds_per_run for s in self.studies if s.gpu) / 3600

    def describe(self) -> str:
        by_stage = (sum(s.sweep for s in self.studies), sum(s.seeds for s in self.studies),
                    sum(s.kept for s in self.studies))
        head = (f"plan: {self.runs} runs to do ({by_stage[0]} sweep trials, {by_stage[1]} seed re-runs, "
                f"{by_stage[2]} kept-fraction runs; {self.done} already in the records)")
        gpu = any(s.gpu and s.runs for s in self.studies)
        work = (f"{self.gpu_hours:,.0f} GPU-hours of training in all" if gpu else
                f"{fmt_duration(sum(s.runs * s.seconds_per_run for s in self.studies))} of runs in all")
        if self.cluster:
            flying = "" if self.in_flight is None else f"; {self.in_flight} trial(s) of these studies running now"
            head += (f", submitted to SLURM {self.jobs} at a time by this driver{flying}; {work}; the wall time "
                     "depends on the queue and on how many drivers share the studies")
        elif gpu:
            head += f", {self.jobs} at a time; {work}" + (
                f", about {fmt_duration(self.seconds)} on this machine's {self.gpus} GPU(s), one run per GPU"
                if self.gpus else "; this machine has no GPU")
        else:
            head += (f", {self.jobs} at a time{f' on {self.slots} cores' if self.slots and self.slots < self.jobs else ''}"
                     f"; expected {fmt_duration(self.seconds)}")
        lines = [head]
        per: dict[tuple[str, str], list[PlannedStudy]] = defaultdict(list)
        for s in self.studies:
            per[(s.model, s.method)].append(s)
        for (model, method), ss in sorted(per.items()):
            n = sum(s.runs for s in ss)
            if n and ss[0].gpu:  # per study: GPU-hours of each task
                tasks = ", ".join(f"{s.task} {s.runs} x {s.seconds_per_run / 3600:.1f} h" for s in ss if s.runs)
                lines.append(f"  {model} / {method}: {n} runs, {sum(s.runs * s.seconds_per_run for s in ss) / 3600:,.0f} "
                             f"GPU-h ({tasks})")
            elif n:
                lines.append(f"  {model} / {method}: {n} runs x ~{ss[0].seconds_per_run:.0f} s ({ss[0].source})")
        lines += [f"  {n}" for n in self.notes]
        return "\n".join(lines)


def fmt_duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


# ------------------------------------------------------------------------------------------ estimate
def measured_speed(records: Iterable[dict]) -> dict[tuple[str, str], dict[str, float]]:
    """(model, method) -> median steps/s, steps per run and overhead seconds of completed runs."""
    groups: dict[tuple[str, str], list[dict]] = defaultdict(list)
    for r in records:
        tr = r.get("training") or {}
        if r.get("status") == "completed" and tr.get("steps_per_second") and tr.get("optimizer_steps"):
            groups[(r["model"], r["method"])].append(r)
    out = {}
    for key, rs in groups.items():
        sps = statistics.median(float(r["training"]["steps_per_second"]) for r in rs)
        steps = statistics.median(float(r["training"]["optimizer_steps"]) for r in rs)
        overhead = statistics.median(max(0.0, float(r.get("wall_seconds") or 0.0)
                                         - float(r["training"]["optimizer_steps"]) / float(r["training"]["steps_per_second"]))
                                     for r in rs)
        out[key] = {"steps_per_second": sps, "steps_per_run": steps, "overhead_seconds": overhead, "runs": len(rs)}
    return out


def _profile_estimate(section: dict | None, method: str) -> dict[str, float]:
    section = section or {}
    est = dict(DEFAULT_ESTIMATE)
    for key in ("steps_per_second", "steps_per_run", "overhead_seconds"):
        value = section.get(key)
        if isinstance(value, dict):
            value = value.get(method, value.get("default"))
        if value is not None:
            est[key] = float(value)
    return est


def seconds_per_run(est: dict[str, float]) -> float:
    return est["overhead_seconds"] + est["steps_per_run"] / max(est["steps_per_second"], 1e-9)


def threads_per_run(overrides: Iterable[str]) -> int:
    """``trainer.threads=N`` among a profile's overrides (1 when it is not set there)."""
    for o in overrides or ():
        key, _, value = str(o).partition("=")
        if key.lstrip("+~") == "trainer.threads" and value.strip().isdigit():
            return max(1, int(value))
    return 1


def make_plan(profile, records: Sequence[dict], jobs: int = 1, models: Sequence[str] | None = None,
              cores: int | None = None, launcher: str | None = None, gpus: int | None = None,
              in_flight: int | None = None) -> Plan:
    """The runs ``profile`` (a :class:`sparsegrad.suite.sweep.driver.Profile`) still has to do, with their duration.

    ``cores``: the CPU cores the runs share (default: this machine's). ``launcher``: a SLURM launcher makes a
    cluster plan (runs, ``in_flight`` trials, run time in all; no wall time). ``gpus``: this machine's GPUs
    (default: counted when a study is planned from the paper's GPU speeds).
    """
    from sparsegrad.suite.sweep import launchers

    models = list(models or profile.models)
    speed = measured_speed(records)
    section = getattr(profile, "plan", None)
    overrides = list(getattr(profile, "overrides", None) or ())
    n_trials = int((profile.sweep or {}).get("n_trials", 0)) if profile.best_from == "sweep" else 0
    kf = profile.kept_fraction or {}
    studies = []
    done = 0
    for model in models:
        for task in profile.tasks:
            for method in profile.methods:
                mine = [r for r in records if (r.get("model"), r.get("method"), r.get("task")) == (model, method, task)]
                trials = sum(1 for r in mine if r.get("_stage") == "sweep")
                seeds = {int(r["seed"]) for r in mine if r.get("_stage") == "seeds"
                         and r.get("status") in ("completed", "diverged")}
                kept_done = sum(1 for r in mine if r.get("_stage") == "kept")
                kept_total = 0
                if method == "sparsegrad" and model in kf.get("models", []) and task in kf.get("tasks", []):
                    kept_total = len(kf.get("k", [])) * len(kf.get("seeds", profile.seeds))
                todo_seeds = len([s for s in profile.seeds if s not in seeds])
                if profile.grid(model, method):  # a grid study: one trial per point
                    n_trials = profile.grid_size(model, method)
                done += min(trials, n_trials) + len(profile.seeds) - todo_seeds + min(kept_done, kept_total)
                seconds, source, on_gpu = _run_seconds(profile, speed, section, overrides, model, method, task)
                studies.append(PlannedStudy(model, method, task, max(0, n_trials - trials), todo_seeds,
                                            max(0, kept_total - kept_done), seconds, source,
                                            measured=(model, method) in speed, gpu=on_gpu))
    notes = []
    if section and section.get("measured"):
        notes.append(f"speeds measured: {section['measured']}")
    cluster = launchers.is_cluster(launcher)
    if any(s.gpu and s.runs for s in studies):
        notes += _gpu_notes(profile, overrides, cluster)
        if gpus is None and not cluster:
            from sparsegrad.suite.run import devices

            gpus = len(devices.visible())
    slots = max(1, (cores or os.cpu_count() or 1) // threads_per_run(overrides))
    return Plan(profile.name, studies, max(1, int(jobs)), done, notes, slots=slots, cluster=cluster,
                gpus=int(gpus or 0), in_flight=in_flight)


def _run_seconds(profile, speed: dict, section: dict | None, overrides: list[str], model: str, method: str,
                 task: str) -> tuple[float, str, bool]:
    """(seconds per run, where that comes from, whether it is GPU time from the paper's speeds): this profile's
    records first, then its plan section, then the paper's speeds (GLUE), then a default guess."""
    from sparsegrad.suite.sweep import paper_speed

    if (model, method) in speed:
        return seconds_per_run(speed[(model, method)]), f"measured in {speed[(model, method)]['runs']} run records", False
    if not section:
        run = paper_speed.estimate(model, method, task, paper_speed.trainer_config(overrides, task),
                                   _batch_size(profile, model, task))
        if run is not None:
            return run.seconds, run.source, True
    return seconds_per_run(_profile_estimate(section, method)), "profile plan section" if section else "default guess", False


def _batch_size(profile, model: str, task: str) -> int | None:
    """The batch size the runs of a study use where the profile fixes it (None: the trainer's)."""
    from sparsegrad.suite.sweep.profiles import ReproduceError, paper_best_setting

    if profile.best_from == "paper":
        try:
            return paper_best_setting(model, task)["batch_size"]
        except ReproduceError:
            return None
    return (profile.fixed or {}).get("batch_size") if profile.best_from == "fixed" else None


def _gpu_notes(profile, overrides: list[str], cluster: bool) -> list[str]:
    """What a plan from the paper's speeds assumes, and the cheaper or faster ways to the same tables."""
    from sparsegrad.suite.sweep import paper_speed
    from sparsegrad.suite.sweep.profiles import CONF_DIR, load_profile

    trainer = paper_speed.trainer_config(overrides)
    sweep = profile.best_from == "sweep"
    notes = [f"GPU time from the task sizes and the paper's steps/s for RoBERTa-base on one GPU (Tables 3 and 7; "
             f"sparsegrad/suite/sweep/paper_speed.py): {trainer.get('epochs')} epochs"
             + (f" at batch {trainer.get('batch_size')}" if sweep else " at the batch size of each setting")
             + ", evaluations included; these are upper bounds: early stopping (patience "
             f"{trainer.get('patience')}) may end a run after a few epochs"
             + ("; a sweep trial at batch 8 or 16 takes up to 4x or 2x the steps" if sweep else "")]
    best = f"{profile.name}_best"
    if sweep and (CONF_DIR / "profile" / f"{best}.yaml").exists():
        other = make_plan(load_profile(best), [], gpus=0)
        notes.append(f"without the sweep: make reproduce-glue PROFILE={best} runs the paper's best settings "
                     f"({other.runs} runs, {other.gpu_hours:,.0f} GPU-hours)")
    if not cluster:
        notes.append(f"on a cluster: make reproduce-glue PROFILE={profile.name} LAUNCHER=slurm JOBS=8, with every "
                     "driver on one SPARSEGRAD_OPTUNA_STORAGE (README, \"Many workers, one study\")")
    return notes


# ------------------------------------------------------------------------------------------ progress
class RunProgress:
    """One progress bar over a plan's runs, fed by the run records that appear under ``work_dir``."""

    def __init__(self, plan: Plan, work_dir: Path, file=None, poll_seconds: float = 2.0):
        from tqdm.auto import tqdm

        self.plan = plan
        self.work_dir = Path(work_dir)
        self.poll_seconds = poll_seconds
        self.seen = set(self._records())
        self.started = time.perf_counter()
        self.bar = tqdm(total=plan.runs, desc=f"{plan.profile}", unit="run", file=file or sys.stderr,
                        dynamic_ncols=True, mininterval=5.0, bar_format="{desc}: {n_fmt}/{total_fmt} runs |{bar}| {elapsed}{postfix}")
        self._show_eta()

    def _records(self) -> list[Path]:
        return list(self.work_dir.rglob("record.json")) if self.work_dir.exists() else []

    def eta_seconds(self) -> float:
        done, total = self.bar.n, self.plan.runs
        if total <= 0:
            return 0.0
        elapsed = time.perf_counter() - self.started
        if done < self.plan.jobs:  # runs finish a batch at a time: one run of a batch says little of the pace
            if elapsed < self.plan.seconds:
                return self.plan.seconds - elapsed
            if done == 0:
                return math.nan  # past the plan, and no run finished yet: unknown
        return elapsed / done * max(0, total - done)

    def _show_eta(self) -> None:
        left, eta = self.plan.runs - self.bar.n, self.eta_seconds()
        if math.isnan(eta):
            text = "ETA unknown (past the plan)"
        else:  # to 10 s under 90 s: a log file is not given a new line every poll
            text = f"ETA {fmt_duration(eta if eta >= 90 else 10 * math.ceil(eta / 10))}"
        text = text if left > 0 else "done"
        now = time.perf_counter()
        # redraw on news, else every 30 s: a log file gets a line per change, a terminal a ticking clock
        if text != getattr(self, "_shown", None) or now - getattr(self, "_drawn", 0.0) >= 30:
            self._shown, self._drawn = text, now
            self.bar.set_postfix_str(text, refresh=True)

    def poll(self) -> int:
        """Count the runs finished since the last poll; returns how many."""
        new = [p for p in self._records() if p not in self.seen]
        self.seen.update(new)
        step = min(len(new), max(0, self.plan.runs - self.bar.n))
        if step:
            self.bar.update(step)
        self._show_eta()
        return len(new)

    def wait(self, proc: subprocess.Popen) -> int:
        """Wait for ``proc`` like ``proc.wait()``, moving the bar as its runs finish."""
        try:
            while True:
                try:
                    return proc.wait(timeout=self.poll_seconds)
                except subprocess.TimeoutExpired:
                    self.poll()
        finally:
            self.poll()

    def write(self, message: str) -> None:
        self.bar.write(message)

    def close(self) -> None:
        self.poll()
        self.bar.close()


def describe_budget(plan: Plan, budget_minutes: Any) -> str | None:
    """A warning line when the plan exceeds the profile's stated budget."""
    if budget_minutes is None:
        return None
    if plan.seconds > 60 * float(budget_minutes):
        return (f"note: the plan ({fmt_duration(plan.seconds)}) exceeds this profile's budget of {budget_minutes} min "
                "on 2 CPU cores (the machine may be busier or slower than where it was measured)")
    return None
