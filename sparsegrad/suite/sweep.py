"""``make reproduce-glue``: sweep, seed re-runs, kept-fraction runs, analysis, tables and figures.

A profile (``conf/profile/<name>.yaml``) names the models, methods and tasks, the search space in
``conf/hparams_search/``, the seeds and the overrides every run gets. For each (model, method, task)
:func:`run_profile`

1. runs an Optuna study through Hydra's Optuna sweeper (``python -m experiments.finetune --multirun
   +hparams_search=...``, a subprocess: Hydra stays in ``experiments/`` and ``conf/``). The study lives
   in a persistent database — SQLite under the profile's results folder, or any SQLAlchemy URL in
   ``SPARSEGRAD_OPTUNA_STORAGE`` so that many machines share one study — and is named
   ``<model>-<method>-<task>``. A re-run counts the finished trials and asks only for the rest, with the
   TPE seed shifted by the number of trials already in the study (a fixed seed would re-sample the
   same points). Trials left RUNNING by an interrupted local run are settled: COMPLETE from their run
   record when the run had finished, else FAIL (user attribute ``interrupted``, not counted). Diverged or failed trials are told to Optuna as FAIL
   (``experiments/sweep_callbacks.py``) and the sweep goes on.
2. re-runs the best setting over the profile's seeds, skipping seeds whose run record already
   exists with that setting;
3. runs SparseGrad over the kept fractions k (Tables 11-12) and the sparsity analysis (Figures 2-3);
4. rebuilds every table and figure from the run records (:mod:`sparsegrad.suite.tables`,
   :mod:`sparsegrad.suite.figures`).

Every run record is copied to ``results/<profile>/records/<stage>/<study>/<run_id>.json``; the Hydra
run folders stay under ``outputs/reproduce/<profile>/``. Nothing here raises to the user: failures
print one line and a non-zero exit code.

Editing a profile whose results folder exists: adding a model, method or task (or more trials, seeds or
kept fractions) resumes like an interruption — finished studies and run records are kept and only the
new work runs. What a finished run was run with is not compared with the edited profile: after changing
``overrides``, ``method_overrides`` or the search space, delete the affected studies from the study
database and their ``records/*/<study>/`` folders (or the whole results folder), or they are reused as
they are.
"""

from __future__ import annotations

import csv
import datetime as dt
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sparsegrad.suite.errors import signal_message

ROOT = Path(__file__).resolve().parents[2]
CONF_DIR = ROOT / "conf"
PAPER_CSV = ROOT / "results" / "paper" / "paper_numbers.csv"
STORAGE_ENV = "SPARSEGRAD_OPTUNA_STORAGE"
RESULTS_ENV = "SPARSEGRAD_RESULTS"  # default: <repo>/results
WORK_ENV = "SPARSEGRAD_REPRODUCE_OUTPUTS"  # default: <repo>/outputs/reproduce
WORKER_ENV = "SPARSEGRAD_SWEEP_WORKER"  # machines sharing one study: 0, 1, 2, ... (shifts the TPE seed)
STAGES = ("sweep", "seeds", "kept")
EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 1, 2, 130
PAPER_BEST_TABLES = {"bert_base": "13", "roberta_base": "14", "roberta_large": "15"}
SEARCH_PARAMS = ("trainer.lr", "trainer.batch_size")


class ReproduceError(Exception):
    """A problem the user can fix; printed as one line, never as a traceback."""


# ----------------------------------------------------------------------------------------- profile
@dataclass
class Profile:
    name: str
    models: list[str]
    methods: list[str]
    tasks: list[str]
    seeds: list[int]
    description: str = ""
    sweep: dict[str, Any] | None = None  # {search, n_trials, seed}
    best_from: str = "sweep"  # sweep | paper | fixed
    fixed: dict[str, Any] | None = None  # {lr, batch_size} when nothing is swept
    lr_variants: dict[str, float] = field(default_factory=dict)
    overrides: list[str] = field(default_factory=list)
    method_overrides: dict[str, list[str]] = field(default_factory=dict)
    kept_fraction: dict[str, Any] | None = None  # {models, tasks, k, seeds}
    sparsity_analysis: list[str] | None = None  # arguments of experiments.sparsity_analysis
    paper_analogue: dict[str, dict[str, str]] = field(default_factory=dict)
    optional_models: list[str] = field(default_factory=list)
    launcher: str | None = None  # default Hydra launcher of the runs (conf/hydra/launcher), e.g. parallel
    jobs: int = 1  # runs launched at once with that launcher
    plan: dict[str, Any] | None = None  # measured speed for the plan printed before a run (suite.progress)
    budget_minutes: float | None = None  # the stated wall-time budget on 2 CPU cores

    def studies(self) -> list[tuple[str, str, str]]:
        return [(m, meth, t) for m in self.models for t in self.tasks for meth in self.methods]


def available_profiles(conf_dir: Path = CONF_DIR) -> list[str]:
    return sorted(p.stem for p in (conf_dir / "profile").glob("*.yaml"))


def load_profile(name: str, conf_dir: Path = CONF_DIR) -> Profile:
    import yaml

    path = conf_dir / "profile" / f"{name}.yaml"
    if not path.exists():
        raise ReproduceError(f"unknown profile {name!r}; valid profiles: {', '.join(available_profiles(conf_dir))}")
    data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    if data.get("fixed"):
        data.setdefault("best_from", "fixed")
    known = {f for f in Profile.__dataclass_fields__}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ReproduceError(f"{path}: unknown key(s) {unknown}; valid keys: {sorted(known - {'name'})}")
    data["name"] = name
    for key in ("models", "methods", "tasks", "seeds"):
        if not data.get(key):
            raise ReproduceError(f"{path}: '{key}' must be a non-empty list")
    if data.get("best_from", "sweep") == "sweep" and not data.get("sweep"):
        raise ReproduceError(f"{path}: no 'sweep' section and no 'fixed' / 'best_from: paper' setting")
    return Profile(**data)


# ------------------------------------------------------------------------------------------- paths
@dataclass
class Layout:
    results: Path  # results/<profile>: records, tables, figures, optuna.db
    work: Path  # outputs/reproduce/<profile>: Hydra run folders and logs

    @classmethod
    def for_profile(cls, name: str) -> Layout:
        results_root = Path(os.environ.get(RESULTS_ENV) or ROOT / "results")
        work_root = Path(os.environ.get(WORK_ENV) or ROOT / "outputs" / "reproduce")
        return cls(results_root.resolve() / name, work_root.resolve() / name)

    @property
    def records(self) -> Path:
        return self.results / "records"

    def storage(self) -> str:
        return os.environ.get(STORAGE_ENV) or f"sqlite:///{self.results / 'optuna.db'}"

    def shared_storage(self) -> bool:
        return bool(os.environ.get(STORAGE_ENV))


def study_name(model: str, method: str, task: str) -> str:
    return f"{model}-{method}-{task}"


# ----------------------------------------------------------------------------------------- records
def harvest(layout: Layout) -> int:
    """Copy every finished run record under the work folder into results/<profile>/records; returns new ones."""
    if not layout.work.exists():
        return 0
    copied = 0
    for path in sorted(layout.work.rglob("record.json")):
        try:
            record = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        meta = (record.get("config") or {}).get("reproduce") or {}
        stage = meta.get("stage")
        if stage not in STAGES or record.get("status") == "interrupted":
            continue
        study = study_name(record["model"], record["method"], record["task"])
        target = layout.records / stage / study / f"{record['run_id']}.json"
        if not target.exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, target)
            copied += 1
    return copied


def load_records(records_dir: Path) -> list[dict]:
    """Every record under ``records_dir`` with ``_stage`` (from its folder) added; sorted by path."""
    out = []
    for path in sorted(Path(records_dir).glob("*/*/*.json")):
        try:
            record = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        record["_stage"] = path.parent.parent.name
        out.append(record)
    return out


def _setting(record: dict) -> tuple[float, int]:
    trainer = (record.get("config") or {}).get("trainer") or {}
    return float(trainer.get("lr")), int(trainer.get("batch_size"))


def _same_lr(a: float, b: float) -> bool:
    return math.isclose(a, b, rel_tol=1e-9, abs_tol=0.0)


def done_seeds(records: list[dict], stage: str, model: str, method: str, task: str, lr: float, batch_size: int,
               k: float | None = None) -> set[int]:
    """Seeds already run to the end (completed or diverged) with this setting."""
    seeds = set()
    for r in records:
        if r["_stage"] != stage or (r["model"], r["method"], r["task"]) != (model, method, task):
            continue
        if r.get("status") not in ("completed", "diverged"):
            continue
        r_lr, r_bs = _setting(r)
        if not _same_lr(r_lr, lr) or r_bs != batch_size:
            continue
        if k is not None and not _same_lr(float((r["config"].get("method") or {}).get("k") or -1), k):
            continue
        seeds.add(int(r["seed"]))
    return seeds


# --------------------------------------------------------------------------------------- optuna
def _task_direction(task: str) -> str:
    from sparsegrad.suite.tasks import get_task

    return "maximize" if get_task(task).higher_is_better else "minimize"


def _finished_record(records: Sequence[dict], name: str, params: dict) -> dict | None:
    """The completed sweep record of study ``name`` run with exactly these trial params, if any."""
    lr, bs = params.get("trainer.lr"), params.get("trainer.batch_size")
    if lr is None or bs is None:
        return None
    for r in records:
        if (r.get("_stage") == "sweep" and study_name(r["model"], r["method"], r["task"]) == name
                and r.get("status") == "completed" and r.get("objective") is not None):
            r_lr, r_bs = _setting(r)
            if _same_lr(r_lr, float(lr)) and r_bs == int(bs):
                return r
    return None


def study_state(storage: str, name: str, direction: str, mark_stale: bool, records: Sequence[dict] = ()) -> dict:
    """Trial counts of a study (created if missing). With ``mark_stale``, trials left RUNNING by an
    interrupted sweep are settled: COMPLETE with the run record's objective when the run finished
    (the sweeper was stopped before telling Optuna), else FAIL with user attribute ``interrupted``."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(study_name=name, storage=storage, direction=direction, load_if_exists=True)
    state = optuna.trial.TrialState
    stale = 0
    if mark_stale:
        for t in study.get_trials(deepcopy=False):
            if t.state != state.RUNNING:
                continue
            done = _finished_record(records, name, t.params)
            if done is not None:
                study._storage.set_trial_user_attr(t._trial_id, "recovered_from_record", done["run_id"])
                study._storage.set_trial_values(t._trial_id, [float(done["objective"])])
                study._storage.set_trial_state(t._trial_id, state.COMPLETE)
            else:
                study._storage.set_trial_user_attr(t._trial_id, "interrupted", True)
                study._storage.set_trial_state(t._trial_id, state.FAIL)
                stale += 1
    trials = study.get_trials(deepcopy=False)
    interrupted = sum(1 for t in trials if t.user_attrs.get("interrupted"))
    counts = {s.name.lower(): sum(1 for t in trials if t.state == s) for s in state}
    best = None
    if counts.get("complete"):
        bt = study.best_trial
        best = {"number": bt.number, "value": bt.value, "params": dict(bt.params)}
    return {"total": len(trials), "counts": counts, "interrupted": interrupted, "marked_stale": stale,
            "finished": counts["complete"] + counts["pruned"] + counts["fail"] - interrupted,
            "running": counts["running"], "best": best}


# ---------------------------------------------------------------------------------------- driver
@dataclass
class Options:
    launcher: str | None = None  # a conf/hydra/launcher option: parallel, slurm, slurm_local, joblib, ...
    jobs: int = 1
    lr: float | None = None  # replaces the profile's fixed learning rate
    dry_run: bool = False
    extra_models: Sequence[str] = ()
    python: str = sys.executable
    quiet: bool = False


class Driver:
    def __init__(self, profile: Profile, layout: Layout, options: Options):
        self.profile, self.layout, self.opt = profile, layout, options
        self.failures: list[str] = []
        self.commands: list[list[str]] = []
        self.current: subprocess.Popen | None = None  # the running Hydra subprocess
        self.progress = None  # a sparsegrad.suite.progress.RunProgress while a profile runs

    # ------------------------------------------------------------------ helpers
    def say(self, message: str) -> None:
        if not self.opt.quiet:
            line = f"[reproduce {self.profile.name}] {message}"
            self.progress.write(line) if self.progress is not None else print(line, flush=True)

    def base_overrides(self, model: str, method: str, task: str, stage: str) -> list[str]:
        p = self.profile
        over = [f"model={model}", f"method={method}", f"task={task}", *p.overrides,
                *p.method_overrides.get(method, []),
                f"+reproduce.profile={p.name}", f"+reproduce.stage={stage}",
                f"+reproduce.study={study_name(model, method, task)}"]
        return over

    def launcher_overrides(self, sweep: bool) -> list[str]:
        if not self.opt.launcher:
            return []
        over = [f"hydra/launcher={self.opt.launcher}"]
        if self.opt.launcher in ("parallel", "joblib"):
            over.append(f"hydra.launcher.n_jobs={self.opt.jobs}")
        if sweep:
            over.append(f"hydra.sweeper.n_jobs={self.opt.jobs}")
        return over

    def run(self, overrides: list[str], what: str, log_name: str) -> int:
        cmd = [self.opt.python, "-m", "experiments.finetune", "--multirun", *overrides]
        self.commands.append(cmd)
        if self.opt.dry_run:
            print(" ".join(_quote(c) for c in cmd))
            return 0
        log_dir = self.layout.work / "logs"
        log_dir.mkdir(parents=True, exist_ok=True)
        log_path = log_dir / f"{log_name}.log"
        t0 = time.perf_counter()
        with open(log_path, "a", encoding="utf-8") as log:
            log.write(f"\n$ {' '.join(_quote(c) for c in cmd)}\n")
            log.flush()
            self.current = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
            try:
                self.progress.wait(self.current) if self.progress is not None else self.current.wait()
            except KeyboardInterrupt:  # Ctrl-C reaches the child too (same process group): let it write its record
                self.current.wait()
                raise
            proc, self.current = self.current, None
        seconds = time.perf_counter() - t0
        harvest(self.layout)
        if proc.returncode == EXIT_INTERRUPTED or _interrupted_by_signal(proc.returncode):
            raise KeyboardInterrupt
        if proc.returncode != 0:
            reason = signal_message(proc.returncode) or _last_error(log_path)
            if proc.returncode == EXIT_USAGE:  # a config / data / Hub problem repeats for every run
                raise ReproduceError(f"{what}: {reason} (log {log_path})")
            self.failures.append(f"{what}: exit {proc.returncode}: {reason} (log {log_path})")
            self.say(f"{what}: FAILED after {seconds:.0f} s: {reason} (log {log_path})")
        else:
            self.say(f"{what}: done in {seconds:.0f} s")
        return proc.returncode

    # ------------------------------------------------------------------ stages
    def sweep(self, model: str, method: str, task: str) -> dict | None:
        """Run the remaining trials of one study; return {lr, batch_size} of its best trial (or None)."""
        sweep = self.profile.sweep or {}
        name = study_name(model, method, task)
        direction = _task_direction(task)
        storage = self.layout.storage()
        n_trials = int(sweep.get("n_trials", 10))
        if self.opt.dry_run:
            remaining, seed = n_trials, int(sweep.get("seed", 34))
        else:
            self.layout.results.mkdir(parents=True, exist_ok=True)
            harvest(self.layout)
            state = study_state(storage, name, direction, mark_stale=not self.layout.shared_storage(),
                                records=load_records(self.layout.records))
            remaining = n_trials - state["finished"] - state["running"]
            worker = int(os.environ.get(WORKER_ENV, "0") or 0)
            seed = int(sweep.get("seed", 34)) + state["total"] + 1000 * worker
            if state["marked_stale"]:
                self.say(f"sweep {name}: {state['marked_stale']} trial(s) left running by an interrupted run marked FAIL")
        if remaining > 0:
            stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
            over = [f"+hparams_search={sweep.get('search', 'lr_batch')}",
                    *self.base_overrides(model, method, task, "sweep"),
                    f"hydra.sweeper.storage={storage}", f"hydra.sweeper.study_name={name}",
                    f"hydra.sweeper.n_trials={remaining}", f"hydra.sweeper.direction={direction}",
                    f"hydra.sweeper.sampler.seed={seed}",
                    f"hydra.sweep.dir={self.layout.work / 'sweep' / name / stamp}",
                    *self.launcher_overrides(sweep=True)]
            self.say(f"sweep {name}: {remaining} trial(s) to run (of {n_trials}; sampler seed {seed})")
            self.run(over, f"sweep {name}", f"sweep-{name}")
        elif self.opt.dry_run or not state["running"]:
            self.say(f"sweep {name}: all {n_trials} trials done")
        else:
            self.say(f"sweep {name}: {state['finished']} trials done, {state['running']} running elsewhere "
                     f"(shared storage): using the best so far")
        if self.opt.dry_run:
            return {"lr": float("nan"), "batch_size": 0}
        state = study_state(storage, name, direction, mark_stale=False)
        if state["best"] is None:
            self.failures.append(f"sweep {name}: no completed trial")
            return None
        params = state["best"]["params"]
        return {"lr": float(params["trainer.lr"]), "batch_size": int(params["trainer.batch_size"])}

    def best_setting(self, model: str, method: str, task: str) -> dict | None:
        p = self.profile
        if p.best_from == "sweep" and (p.sweep or {}).get("grid"):  # a stated grid (sparsegrad.suite.grid)
            from sparsegrad.suite.grid import run_grid

            return run_grid(self, model, method, task)
        if p.best_from == "sweep":
            return self.sweep(model, method, task)
        if p.best_from == "paper":
            return paper_best_setting(model, task)
        fixed = dict(p.fixed or {})
        if self.opt.lr is not None:
            fixed["lr"] = self.opt.lr
        return {"lr": float(fixed["lr"]), "batch_size": int(fixed["batch_size"])}

    def seeds(self, model: str, method: str, task: str, setting: dict, records: list[dict]) -> None:
        name = study_name(model, method, task)
        lr, bs = setting["lr"], setting["batch_size"]
        todo = [s for s in self.profile.seeds
                if s not in done_seeds(records, "seeds", model, method, task, lr, bs)]
        if not todo:
            self.say(f"seeds {name}: all {len(self.profile.seeds)} seed runs done (lr {lr:.3g}, batch {bs})")
            return
        stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
        over = [*self.base_overrides(model, method, task, "seeds"), f"trainer.lr={lr!r}", f"trainer.batch_size={bs}",
                f"seed={','.join(str(s) for s in todo)}",
                f"hydra.sweep.dir={self.layout.work / 'seeds' / name / stamp}", *self.launcher_overrides(sweep=False)]
        self.say(f"seeds {name}: seeds {todo} at lr {lr:.3g}, batch {bs}")
        self.run(over, f"seeds {name}", f"seeds-{name}")

    def kept(self, settings: dict, records: list[dict]) -> None:
        kf = self.profile.kept_fraction
        if not kf:
            return
        for model in kf.get("models", []):
            if model not in self.models():
                continue
            for task in kf.get("tasks", []):
                setting = settings.get((model, "sparsegrad", task))
                if setting is None:
                    continue
                lr, bs = setting["lr"], setting["batch_size"]
                name = study_name(model, "sparsegrad", task)
                todo = []
                for k in kf["k"]:
                    missing = [s for s in kf.get("seeds", self.profile.seeds)
                               if s not in done_seeds(records, "kept", model, "sparsegrad", task, lr, bs, float(k))]
                    todo += [(k, s) for s in missing]
                if not todo:
                    self.say(f"kept fraction {name}: all runs done")
                    continue
                by_seeds: dict[tuple[int, ...], list] = {}
                for k in sorted({k for k, _ in todo}):
                    by_seeds.setdefault(tuple(s for kk, s in todo if kk == k), []).append(k)
                for seeds, ks in by_seeds.items():  # one multirun per seed set: k x seeds
                    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
                    over = [*self.base_overrides(model, "sparsegrad", task, "kept"), f"trainer.lr={lr!r}",
                            f"trainer.batch_size={bs}", f"method.k={','.join(map(str, ks))}",
                            f"seed={','.join(map(str, seeds))}",
                            f"hydra.sweep.dir={self.layout.work / 'kept' / name / stamp}",
                            *self.launcher_overrides(sweep=False)]
                    shares = ", ".join(f"{100 * float(k):.2g}%" for k in ks)
                    self.say(f"kept fraction {name}: k = {', '.join(map(str, ks))} ({shares} kept), seeds {list(seeds)}")
                    self.run(over, f"kept {name}", f"kept-{name}")

    def analysis(self) -> None:
        args = self.profile.sparsity_analysis
        if args is None:
            return
        out = self.layout.results / "analysis" / "sparsity.json"
        if out.exists():
            self.say(f"sparsity analysis: {out.relative_to(self.layout.results.parent)} exists")
            return
        cmd = [self.opt.python, "-m", "experiments.sparsity_analysis", "--out", str(out), *map(str, args)]
        self.commands.append(cmd)
        if self.opt.dry_run:
            print(" ".join(_quote(c) for c in cmd))
            return
        log_dir = self.layout.work / "logs"
        log_dir.mkdir(parents=True, exist_ok=True)
        log_path = log_dir / "sparsity_analysis.log"
        t0 = time.perf_counter()
        with open(log_path, "a", encoding="utf-8") as log:
            proc = subprocess.run(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, check=False)
        if proc.returncode == EXIT_INTERRUPTED or _interrupted_by_signal(proc.returncode):
            raise KeyboardInterrupt
        if proc.returncode != 0:
            reason = signal_message(proc.returncode) or _last_error(log_path)
            self.failures.append(f"sparsity analysis: {reason} (log {log_path})")
            self.say(f"sparsity analysis: FAILED: {reason} (log {log_path})")
        else:
            self.say(f"sparsity analysis: done in {time.perf_counter() - t0:.0f} s")

    def models(self) -> list[str]:
        return [*self.profile.models, *[m for m in self.opt.extra_models if m not in self.profile.models]]

    def train(self) -> None:
        settings: dict[tuple[str, str, str], dict] = {}
        studies = [(m, meth, t) for m in self.models() for t in self.profile.tasks for meth in self.profile.methods]
        for model, method, task in studies:
            setting = self.best_setting(model, method, task)
            if setting is None:
                continue
            settings[(model, method, task)] = setting
            self.seeds(model, method, task, setting, load_records(self.layout.records))
        self.kept(settings, load_records(self.layout.records))
        self.analysis()


def paper_best_setting(model: str, task: str) -> dict:
    table = PAPER_BEST_TABLES.get(model)
    if table is None:
        raise ReproduceError(f"the paper reports best settings for {', '.join(PAPER_BEST_TABLES)} only, not {model!r}")
    found: dict[str, float] = {}
    with open(PAPER_CSV, encoding="utf-8") as fh:
        for row in csv.DictReader(fh):
            if row["table"] == table and row["task"] == task and row["quantity"] in ("learning_rate", "batch_size"):
                found[row["quantity"]] = float(row["value"])
    if len(found) != 2:
        raise ReproduceError(f"no best setting for {model} / {task} in {PAPER_CSV} (table {table})")
    return {"lr": found["learning_rate"], "batch_size": int(found["batch_size"])}


def _quote(arg: str) -> str:
    return f"'{arg}'" if any(c in arg for c in " (){}[],$*") else arg


def _interrupted_by_signal(returncode: int) -> bool:
    """Ctrl-C, SIGTERM or SIGHUP ended the child: the whole reproduction stops (resumable). SIGKILL does not
    count: it is most often the OOM killer, reported as a failure with that hint (signal_message)."""
    return returncode in (-signal.SIGINT, -signal.SIGTERM, -signal.SIGHUP)


def _last_error(log_path: Path) -> str:
    """The most telling line of a failed subprocess's log."""
    try:
        lines = [ln.strip() for ln in log_path.read_text(encoding="utf-8", errors="replace").splitlines() if ln.strip()]
    except OSError:
        return "no log"
    for ln in reversed(lines):
        if ln.startswith("error:") or "Error" in ln.split(":")[0]:
            return ln.removeprefix("error: ")[:600]
    return lines[-1][:600] if lines else "no output"


# ----------------------------------------------------------------------------------------- outputs
def build_outputs(profile: Profile, layout: Layout, quiet: bool = False) -> int:
    """Tables and figures from the records under results/<profile>/records; returns how many files."""
    from sparsegrad.suite import figures, tables

    records = load_records(layout.records)
    written = tables.write_all(records, layout.results, profile_name=profile.name,
                               analogue=profile.paper_analogue, bench_dir=ROOT / "results" / "bench")
    written += figures.write_all(records, layout.results, analysis=layout.results / "analysis" / "sparsity.json")
    if not quiet:
        print(f"[reproduce {profile.name}] {len(records)} run records -> {len(written)} table/figure files in "
              f"{_rel(layout.results)}", flush=True)
    return len(written)


def _rel(path: Path) -> str:
    try:
        return str(path.relative_to(ROOT))
    except ValueError:
        return str(path)


def run_profile(profile: str, tables_only: bool = False, **options: Any) -> int:
    """Run (or, with ``tables_only``, only rebuild the tables of) one profile; returns an exit code."""
    t0 = time.perf_counter()
    try:
        prof = load_profile(profile)
        if options.get("launcher") is None:
            options["launcher"] = prof.launcher
            options["jobs"] = options.get("jobs") or prof.jobs
        options["jobs"] = options.get("jobs") or 1
        opts = Options(**options)
        for m in opts.extra_models:
            if m not in prof.optional_models and m not in prof.models:
                raise ReproduceError(f"--{m.replace('_', '-')} is not an option of profile {profile!r}")
        layout = Layout.for_profile(profile)
        if tables_only:
            harvest(layout)
            if not load_records(layout.records):
                print(f"[reproduce {profile}] no run records under {_rel(layout.records)}: run "
                      f"`make reproduce-glue PROFILE={profile}` first.")
                return EXIT_FAILED
            build_outputs(prof, layout)
            return 0
        driver = Driver(prof, layout, opts)
        driver.say(f"{prof.description} -> {_rel(layout.results)} (runs in {_rel(layout.work)})")
        from sparsegrad.suite import progress  # the plan first; then one progress bar over the runs

        if not opts.dry_run:
            harvest(layout)
        plan = progress.make_plan(prof, load_records(layout.records), opts.jobs, driver.models())
        if not opts.quiet:
            print(plan.describe() + "".join(f"\n{w}" for w in [progress.describe_budget(plan, prof.budget_minutes)] if w),
                  flush=True)
        if not (opts.dry_run or opts.quiet):
            driver.progress = progress.RunProgress(plan, layout.work)
        try:
            driver.train()
        finally:
            if driver.progress is not None:
                driver.progress.close()
                driver.progress = None
        if opts.dry_run:
            return 0
        build_outputs(prof, layout)
        minutes = (time.perf_counter() - t0) / 60
        if driver.failures:
            print(f"[reproduce {profile}] finished in {minutes:.1f} min with {len(driver.failures)} failure(s):")
            for f in driver.failures:
                print(f"  - {f}")
            return EXIT_FAILED
        print(f"[reproduce {profile}] finished in {minutes:.1f} min; tables and figures in {_rel(layout.results)}")
        return 0
    except KeyboardInterrupt:
        try:
            harvest(Layout.for_profile(profile))
        except Exception:  # noqa: BLE001 - never hide the interrupt
            pass
        print(f"[reproduce {profile}] interrupted; run the same command again to resume where it stopped.")
        return EXIT_INTERRUPTED
    except ReproduceError as exc:
        print(f"[reproduce {profile}] error: {exc}")
        return EXIT_USAGE
    except Exception as exc:  # noqa: BLE001 - the entry point promises one line, never a traceback
        print(f"[reproduce {profile}] unexpected error: {type(exc).__name__}: {exc}")
        return EXIT_FAILED
