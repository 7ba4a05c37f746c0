"""``make reproduce-glue``: sweep, seed re-runs, kept-fraction runs, analysis, tables and figures.

For each (model, method, task) of a profile (:mod:`sparsegrad.suite.sweep.profiles`) :func:`run_profile`

1. runs an Optuna study through our Optuna sweeper (``python -m experiments.finetune --multirun
   +hparams_search=...``, a subprocess: Hydra stays in ``experiments/`` and ``conf/``): TPE over the
   profile's search space, or, for a profile with a stated grid (``sweep.grid``), Optuna's GridSampler
   over its learning rates x batch sizes (:meth:`Profile.grid`), one trial per point. The study lives
   in a persistent storage — SQLite under the profile's results folder, or any storage URL in
   ``SPARSEGRAD_OPTUNA_STORAGE`` (PostgreSQL, or a journal file on a shared file system) so that many
   workers and machines share one study — and is named ``<model>-<method>-<task>``. The budget
   ``n_trials`` is for the study in total: any number of drivers may run the same profile at once, and
   each trial runs once (:mod:`sparsegrad.suite.sweep.studies`). A trial whose worker died (no heartbeat) is
   settled from its run record if the run finished, else failed and retried once. Diverged or failed
   trials are told to Optuna as FAIL and the sweep goes on.
2. re-runs the best setting (one tie-break rule, shared with the tables) over the profile's seeds,
   skipping seeds whose run record already exists with that setting; two drivers never run the same
   seeds (a claim file per study, :class:`sparsegrad.suite.sweep.runrecords.Claim`);
3. runs SparseGrad over the kept fractions k (Tables 11-12) and the sparsity analysis (Figures 2-3);
4. rebuilds every table and figure from the run records (:mod:`sparsegrad.suite.report.tables`,
   :mod:`sparsegrad.suite.report.figures`).

Every run record of this results folder (and only those: :mod:`sparsegrad.suite.sweep.runrecords`) is copied
to ``results/<profile>/records/<stage>/<study>/<run_id>.json``; the Hydra run folders stay under
``outputs/reproduce/<profile>/``, one folder per run. ``--fresh`` ignores every earlier record and
study: it runs everything again into ``results/local/<profile>`` (an earlier one there is moved aside;
while a live driver works there, a fresh start joins its run instead).
Nothing here raises to the user: failures print one line and a non-zero exit code.

Longer than 500 lines because :class:`Driver` is one job, the stages above with the claims, subprocesses
and messages they share; the study state and progress helpers are in their own modules already.
"""

from __future__ import annotations

import contextlib
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# ruff: noqa: I001 - the re-exports below stay on few lines
from sparsegrad.suite.sweep.profiles import CONF_DIR, EXIT_FAILED, EXIT_INTERRUPTED, EXIT_USAGE, PAPER_CSV  # noqa: F401
from sparsegrad.suite.sweep.profiles import POLL_SECONDS, RESULTS_ENV, ROOT, STORAGE_ENV, WORK_ENV  # noqa: F401
from sparsegrad.suite.sweep.profiles import Layout, Profile, ReproduceError, _rel, available_profiles  # noqa: F401
from sparsegrad.suite.sweep.profiles import load_profile, paper_best_setting, resume_command, start_fresh  # noqa: F401
from sparsegrad.suite.sweep.profiles import enter_results, fresh_command, reuse_message, study_name  # noqa: F401
from sparsegrad.suite.sweep.runrecords import STAGES, Claim, best_sweep_records, describe_problems  # noqa: F401
from sparsegrad.suite.sweep.runrecords import done_seeds, finished_sweep_record, same_lr, setting  # noqa: F401
from sparsegrad.suite.sweep.runrecords import harvest as _harvest
from sparsegrad.suite.sweep.runrecords import load_records as _load_records
from sparsegrad.suite.sweep.runrecords import run_folder_stamp
from sparsegrad.suite import interrupts
from sparsegrad.suite.errors import signal_message
from sparsegrad.suite.sweep import launchers

CLUSTER_NEWS = "SLURM job(s)"  # the SLURM launcher's lines about jobs it cancelled (hydra_plugins/sparsegrad_launchers)


# ----------------------------------------------------------------------------------------- records
def harvest(layout: Layout) -> int:
    """Copy this results folder's finished run records from the work folder; returns new copies."""
    return _harvest(layout.work, layout.records, layout.identity["id"])[0]


def load_records(records_dir: Path) -> list[dict]:
    """Every readable record under ``records_dir`` with ``_stage`` added (see runrecords.load_records for
    the unreadable ones)."""
    return _load_records(records_dir).records


def _setting(record: dict) -> tuple[float, int]:
    lr, bs = setting(record)
    return float(lr), int(bs)


# --------------------------------------------------------------------------------------- optuna
def _task_direction(task: str) -> str:
    from sparsegrad.suite.run.tasks import get_task

    return "maximize" if get_task(task).higher_is_better else "minimize"


def study_state(storage: str, name: str, direction: str, n_trials: int | None = None, records: Sequence[dict] = (),
                grace: float | None = None, record_name: str | None = None, grid: dict | None = None,
                seed: int | None = None) -> dict:
    """Trial counts of a study. With ``n_trials`` the study is created (with that budget) if missing; with
    ``grid`` ({parameter: values}) it is a GridSampler study whose points nobody holds yet are queued.
    Trials left RUNNING by a dead worker (no heartbeat for ``grace`` s) are settled: COMPLETE with the
    run record's objective when the run had finished, else FAIL and queued again once."""
    import optuna

    from sparsegrad.suite.sweep import studies

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        store = studies.open_storage(storage)
        if grid is not None:
            study = studies.prepare_grid(store, name, direction, grid, seed)
        elif n_trials is not None:
            study = studies.prepare(store, name, direction, n_trials)
        else:
            study = optuna.load_study(study_name=name, storage=store)
    except studies.StudyError as exc:
        raise ReproduceError(str(exc)) from None

    def finished(frozen):
        done = finished_sweep_record(records, record_name or name, frozen.params)
        return None if done is None else float(done["objective"])

    settled = studies.fail_stale(study, studies.GRACE_PERIOD if grace is None else grace, finished)
    trials = study.get_trials(deepcopy=False)
    state = optuna.trial.TrialState
    counts = {s.name.lower(): sum(1 for t in trials if t.state == s) for s in state}
    interrupted = sum(1 for t in trials if t.user_attrs.get(studies.INTERRUPTED_ATTR))
    retried = sum(1 for t in trials if t.user_attrs.get("stale_heartbeat"))
    unrun = sum(1 for t in trials if studies.DUPLICATE_TICKET_ATTR in t.user_attrs)  # lost a refill race
    best = studies.best_trial(study)
    return {"total": len(trials), "counts": counts, "interrupted": interrupted, "settled": len(settled),
            "finished": counts["complete"] + counts["pruned"] + counts["fail"] - interrupted - retried - unrun,
            "running": counts["running"], "waiting": counts["waiting"], **studies.progress(study),
            "missing": len(studies.missing_slots(study, trials)), "duplicate_runs": studies.duplicate_runs(study),
            "best": None if best is None else {"number": best.number, "value": best.value, "params": dict(best.params)}}


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
    fresh: bool = False  # ignore every earlier record and study: run again into results/local/<profile>
    results: str | None = None  # another results root (results/local resumes a fresh start)


class Driver:
    def __init__(self, profile: Profile, layout: Layout, options: Options):
        self.profile, self.layout, self.opt = profile, layout, options
        self.failures: list[str] = []
        self.commands: list[list[str]] = []
        self.current: subprocess.Popen | None = None  # the running Hydra subprocess
        self.progress = None  # a sparsegrad.suite.sweep.progress.RunProgress while a profile runs
        self.reported: set[Path] = set()  # unreadable records already reported
        self.reported_duplicates: set[tuple[str, int]] = set()  # (study, trial) duplicate runs already named

    # ------------------------------------------------------------------ helpers
    def say(self, message: str) -> None:
        if not self.opt.quiet:
            line = f"[reproduce {self.profile.name}] {message}"
            self.progress.write(line) if self.progress is not None else print(line, flush=True)

    def harvest(self) -> list[dict]:
        """Harvest this folder's new records (reporting unreadable ones once); the records loaded."""
        _, problems = _harvest(self.layout.work, self.layout.records, self.layout.identity["id"])
        loaded = _load_records(self.layout.records)
        new = [p for p in [*problems, *loaded.problems] if p.path not in self.reported]
        for line in describe_problems(new, "not used"):
            self.say(line)
        self.reported |= {p.path for p in new}
        return loaded.records

    def base_overrides(self, model: str, method: str, task: str, stage: str) -> list[str]:
        p = self.profile
        over = [f"model={model}", f"method={method}", f"task={task}", *p.overrides,
                *p.method_overrides.get(method, []),
                f"+reproduce.profile={p.name}", f"+reproduce.stage={stage}",
                f"+reproduce.study={study_name(model, method, task)}"]
        if not self.opt.dry_run:
            over.append(f"+reproduce.results_id={self.layout.identity['id']}")
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
            start = log.tell()
            try:
                with interrupts.deferred():  # a SIGTERM now still finds the child to pass it on to
                    self.current = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
                self.progress.wait(self.current) if self.progress is not None else self.current.wait()
            except KeyboardInterrupt:
                # Ctrl-C reaches the child too (same process group); a SIGTERM (kill, timeout, SLURM) reached
                # only this process: pass it on. Either way the child writes its records, gives its trials
                # back and cancels the cluster jobs it submitted before it exits.
                interrupts.pass_on(self.current)
                self._repeat_cluster_news(log_path, start)
                raise
            proc, self.current = self.current, None
        seconds = time.perf_counter() - t0
        self.harvest()
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

    def _repeat_cluster_news(self, log_path: Path, start: int) -> None:
        """Show on screen what the SLURM launcher logged about the jobs it cancelled (the log is a file)."""
        try:
            with open(log_path, encoding="utf-8", errors="replace") as log:
                log.seek(start)
                news = [ln.split("] ", 1)[-1].strip() for ln in log if CLUSTER_NEWS in ln]
        except OSError:
            return
        for line in news:
            self.say(line)

    # ------------------------------------------------------------------ stages
    def sweep(self, model: str, method: str, task: str) -> dict | None:
        """Run the study's trials (with any other worker on it); return {lr, batch_size} of its best trial."""
        sweep = self.profile.sweep or {}
        name = study_name(model, method, task)
        direction = _task_direction(task)
        storage = self.layout.storage()
        grid, seed = self.profile.grid(model, method), int(sweep.get("seed", 34))
        n_trials = self.profile.grid_size(model, method) if grid else int(sweep.get("n_trials", 10))
        oname = name if self.opt.dry_run else self.layout.optuna_name(model, method, task)
        state = None
        if not self.opt.dry_run:
            self.layout.results.mkdir(parents=True, exist_ok=True)
            state = study_state(storage, oname, direction, n_trials, self.harvest(), record_name=name, grid=grid,
                                seed=seed)
            if state["settled"]:
                self.say(f"sweep {name}: {state['settled']} trial(s) of a dead worker settled (finished ones from "
                         f"their run record, the others queued again)")
        if state is None or state["waiting"] or state["running"] or state["missing"] or \
                (not grid and state["slots"] < n_trials):
            space = [f"{k}=choice({', '.join(repr(v) for v in values)})" for k, values in (grid or {}).items()]
            over = [f"+hparams_search={sweep.get('search', 'lr_grid' if grid else 'lr_batch')}",
                    *self.base_overrides(model, method, task, "sweep"), *space,
                    *(["hydra.sweeper.sampler.kind=grid"] if grid else []),
                    f"hydra.sweeper.storage={storage}", f"hydra.sweeper.study_name={oname}",
                    f"hydra.sweeper.n_trials={n_trials}", f"hydra.sweeper.direction={direction}",
                    f"hydra.sweeper.sampler.seed={seed}",
                    f"hydra.sweep.dir={self.layout.work / 'sweep' / name / run_folder_stamp()}",
                    *self.launcher_overrides(sweep=True)]
            left = n_trials if state is None else state["waiting"] + state["running"] + state["missing"]
            what = f"grid points ({' x '.join(str(len(v)) for v in grid.values())})" if grid else "trial(s)"
            self.say(f"sweep {name}: {left} of {n_trials} {what} to run (shared by every worker on this study)")
            self.run(over, f"sweep {name}", f"sweep-{name}")
        else:
            self.say(f"sweep {name}: all {n_trials} trials done")
        if self.opt.dry_run:
            return {"lr": float("nan"), "batch_size": 0}
        records = self.harvest()
        state = study_state(storage, oname, direction, records=records, record_name=name)
        self.name_duplicate_runs(state, oname)
        best = best_sweep_records(records).get((model, method, task))
        if best is not None:  # the tables show this very record as the best trial
            lr, bs = _setting(best)
            return {"lr": lr, "batch_size": bs}
        if state["best"] is None:
            self.failures.append(f"sweep {name}: no completed trial")
            return None
        params = state["best"]["params"]
        return {"lr": float(params["trainer.lr"]), "batch_size": int(params["trainer.batch_size"])}

    def name_duplicate_runs(self, state: dict, study: str) -> None:
        """Say each result of the study that came too late for Optuna (a duplicate run of its setting), once."""
        from sparsegrad.suite.sweep.studies import describe_duplicate_run

        for kept in state["duplicate_runs"]:
            if (study, kept["trial"]) not in self.reported_duplicates:
                self.reported_duplicates.add((study, kept["trial"]))
                self.say(f"WARNING: duplicate run: {describe_duplicate_run(kept, study)}")

    def best_setting(self, model: str, method: str, task: str) -> dict | None:
        p = self.profile
        if p.best_from == "sweep":
            return self.sweep(model, method, task)
        if p.best_from == "paper":
            return paper_best_setting(model, task)
        fixed = dict(p.fixed or {})
        if self.opt.lr is not None:
            fixed["lr"] = self.opt.lr
        return {"lr": float(fixed["lr"]), "batch_size": int(fixed["batch_size"])}

    @contextlib.contextmanager
    def held(self, key: str):
        """Hold the claim on ``key`` for the block; yields False when another driver holds it (a dry run
        claims nothing and yields True)."""
        claim = None if self.opt.dry_run else self.claim(key)
        try:
            yield claim is not None or self.opt.dry_run
        finally:
            if claim is not None:
                claim.release()

    def claim(self, key: str) -> Claim | None:
        """A claim on a unit of work shared with other drivers of this results folder, or None if held."""
        if self.opt.dry_run:
            return Claim(self.layout.work / "dry-run-claims", key)  # never acquired
        claim = Claim(self.layout.results / "claims", key)
        if claim.acquire():
            if claim.taken_from:
                self.say(f"{key}: taken over from a driver that is gone ({claim.taken_from})")
            return claim
        self.say(f"{key}: being run by another driver ({claim.holder() or '?'}); back to it when that ends")
        return None

    def seeds(self, model: str, method: str, task: str, setting: dict) -> bool:
        """Run the missing seeds of the best setting; False when another driver holds them."""
        name = study_name(model, method, task)
        lr, bs = setting["lr"], setting["batch_size"]
        with self.held(f"seeds-{name}") as ours:
            if not ours:
                return False
            records = [] if self.opt.dry_run else self.harvest()
            todo = [s for s in self.profile.seeds if s not in done_seeds(records, "seeds", model, method, task, lr, bs)]
            if not todo:
                self.say(f"seeds {name}: all {len(self.profile.seeds)} seed runs done (lr {lr:.3g}, batch {bs})")
                return True
            over = self.setting_overrides(model, method, task, "seeds", name, lr, bs,
                                          f"seed={','.join(str(s) for s in todo)}")  # fmt: skip
            self.say(f"seeds {name}: seeds {todo} at lr {lr:.3g}, batch {bs}")
            self.run(over, f"seeds {name}", f"seeds-{name}")
            return True

    def setting_overrides(self, model: str, method: str, task: str, stage: str, name: str, lr: float, bs: int,
                          *extra: str) -> list[str]:  # fmt: skip
        """The overrides of a multirun at one fixed setting (lr, batch size): seed or kept-fraction runs."""
        return [*self.base_overrides(model, method, task, stage), f"trainer.lr={lr!r}", f"trainer.batch_size={bs}",
                *extra, f"hydra.sweep.dir={self.layout.work / stage / name / run_folder_stamp()}",
                *self.launcher_overrides(sweep=False)]  # fmt: skip

    def kept_one(self, model: str, task: str, setting: dict) -> bool:
        """The kept-fraction runs of one (model, task); False when another driver holds them."""
        kf = self.profile.kept_fraction or {}
        lr, bs = setting["lr"], setting["batch_size"]
        name = study_name(model, "sparsegrad", task)
        with self.held(f"kept-{name}") as ours:
            if not ours:
                return False
            records = [] if self.opt.dry_run else self.harvest()
            todo = []
            for k in kf["k"]:
                done = done_seeds(records, "kept", model, "sparsegrad", task, lr, bs, float(k))
                todo += [(k, s) for s in kf.get("seeds", self.profile.seeds) if s not in done]
            if not todo:
                self.say(f"kept fraction {name}: all runs done")
                return True
            by_seeds: dict[tuple[int, ...], list] = {}
            for k in sorted({k for k, _ in todo}):
                by_seeds.setdefault(tuple(s for kk, s in todo if kk == k), []).append(k)
            for seeds, ks in by_seeds.items():  # one multirun per seed set: k x seeds
                over = self.setting_overrides(model, "sparsegrad", task, "kept", name, lr, bs,
                                              f"method.k={','.join(map(str, ks))}",
                                              f"seed={','.join(map(str, seeds))}")  # fmt: skip
                shares = ", ".join(f"{100 * float(k):.2g}%" for k in ks)
                self.say(f"kept fraction {name}: k = {', '.join(map(str, ks))} ({shares} kept), seeds {list(seeds)}")
                self.run(over, f"kept {name}", f"kept-{name}")
            return True

    def analysis(self) -> bool:
        """The sparsity analysis (Figures 2-3); False when another driver runs it."""
        args = self.profile.sparsity_analysis
        if args is None:
            return True
        out = self.layout.results / "analysis" / "sparsity.json"
        if out.exists():
            self.say(f"sparsity analysis: {out.relative_to(self.layout.results.parent)} exists")
            return True
        with self.held("sparsity-analysis") as ours:
            if not ours:
                return False
            self._analysis(args, out)
        return True

    def _analysis(self, args: list, out: Path) -> None:
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
            proc = None
            try:
                with interrupts.deferred():
                    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
                proc.wait()
            except KeyboardInterrupt:
                interrupts.pass_on(proc)
                raise
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
        pending: list[tuple] = []  # work another driver holds: done (or taken over) at the end
        studies = [(m, meth, t) for m in self.models() for t in self.profile.tasks for meth in self.profile.methods]
        for model, method, task in studies:
            setting = self.best_setting(model, method, task)
            if setting is None:
                continue
            settings[(model, method, task)] = setting
            if not self.seeds(model, method, task, setting):
                pending.append((self.seeds, model, method, task, setting))
        kf = self.profile.kept_fraction or {}
        for model in [m for m in kf.get("models", []) if m in self.models()]:
            for task in kf.get("tasks", []):
                setting = settings.get((model, "sparsegrad", task))
                if setting is not None and not self.kept_one(model, task, setting):
                    pending.append((self.kept_one, model, task, setting))
        if not self.analysis():
            pending.append((self.analysis,))
        while pending:  # another driver is on these: wait until it ends (or dies: its claim goes stale)
            time.sleep(POLL_SECONDS)
            pending = [job for job in pending if not job[0](*job[1:])]


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
def build_outputs(profile: Profile, layout: Layout, quiet: bool = False) -> tuple[int, int]:
    """Tables and figures from the records under results/<profile>/records; returns (files written,
    records that could not be read — each reported by name)."""
    from sparsegrad.suite.report import figures, tables

    loaded = _load_records(layout.records)
    records = loaded.records
    written = tables.write_all(records, layout.results, profile_name=profile.name,
                               analogue=profile.paper_analogue, bench_dir=ROOT / "results" / "bench")
    written += figures.write_all(records, layout.results, analysis=layout.results / "analysis" / "sparsity.json")
    for line in describe_problems(loaded.problems):
        print(f"[reproduce {profile.name}] {line}", flush=True)
    if not quiet:
        print(f"[reproduce {profile.name}] {len(records)} run records -> {len(written)} table/figure files in "
              f"{_rel(layout.results)}", flush=True)
    return len(written), len(loaded.problems)


def run_profile(profile: str, tables_only: bool = False, **options: Any) -> int:
    """Run (or, with ``tables_only``, only rebuild the tables of) one profile; returns an exit code."""
    t0 = time.perf_counter()
    layout = entry = None
    try:
        prof = load_profile(profile)
        if options.get("launcher") is None:
            options["launcher"] = prof.launcher
            options["jobs"] = options.get("jobs") or prof.jobs
        options["jobs"] = options.get("jobs") or 1
        opts = Options(**options)
        launchers.check(opts.launcher, submitting=not opts.dry_run)
        for m in opts.extra_models:
            if m not in prof.optional_models and m not in prof.models:
                raise ReproduceError(f"--{m.replace('_', '-')} is not an option of profile {profile!r}")
        if opts.fresh and (tables_only or opts.results):
            raise ReproduceError("--fresh starts a new run into results/local: it goes with neither --tables-only "
                                 "nor --results")
        layout = Layout.for_profile(profile, results_root=opts.results, fresh=opts.fresh)
        if tables_only:
            if (layout.results / "run.json").exists():  # records of an interrupted run into this folder
                harvest(layout)
            if not _load_records(layout.records).records:
                print(f"[reproduce {profile}] no run records under {_rel(layout.records)}: run "
                      f"`make reproduce-glue PROFILE={profile}` first.")
                return EXIT_FAILED
            return EXIT_FAILED if build_outputs(prof, layout)[1] else 0
        driver = Driver(prof, layout, opts)
        if not opts.dry_run:  # a live driver's folder is joined, never moved aside, by a fresh start
            entry = enter_results(layout, fresh=opts.fresh)
            if opts.fresh:
                driver.say(entry.fresh_message(profile, layout))
        driver.say(f"{prof.description} -> {_rel(layout.results)} (runs in {_rel(layout.work)})")
        if prof.best_from == "sweep" and not opts.dry_run:
            from sparsegrad.suite.sweep.studies import dashboard_storage

            driver.say(f"watch the studies live: optuna-dashboard {dashboard_storage(layout.storage())}")
        from sparsegrad.suite.sweep import progress  # the plan first; then one progress bar over the runs

        records = []
        if not opts.dry_run:
            records = driver.harvest()
        elif not opts.fresh:  # a dry run copies nothing, but plans only what the records do not hold yet
            records = load_records(layout.records)
        in_flight = None
        if launchers.is_cluster(opts.launcher) and prof.best_from == "sweep" and not opts.dry_run:
            from sparsegrad.suite.sweep import studies as shared

            names = [layout.optuna_name(m, meth, t) for m in driver.models() for t in prof.tasks for meth in prof.methods]
            in_flight = shared.running_trials(layout.storage(), names)
        plan = progress.make_plan(prof, records, opts.jobs, driver.models(), launcher=opts.launcher, in_flight=in_flight)
        if records:
            driver.say(reuse_message(prof, layout, len(records), plan.runs))
        if not opts.quiet:
            budget = None if plan.cluster else progress.describe_budget(plan, prof.budget_minutes)
            print(plan.describe() + (f"\n{budget}" if budget else ""), flush=True)
        if not (opts.dry_run or opts.quiet):
            driver.progress = progress.RunProgress(plan, layout.work)
        try:
            with interrupts.catching(signal.SIGTERM, signal.SIGHUP):  # stop as Ctrl-C does, resumable
                driver.train()
        finally:
            if driver.progress is not None:
                driver.progress.close()
                driver.progress = None
        if opts.dry_run:
            return 0
        _, unreadable = build_outputs(prof, layout)
        minutes = (time.perf_counter() - t0) / 60
        if unreadable:
            driver.failures.append(f"{unreadable} run record(s) could not be read (listed above)")
        if driver.failures:
            print(f"[reproduce {profile}] finished in {minutes:.1f} min with {len(driver.failures)} failure(s):")
            for f in driver.failures:
                print(f"  - {f}")
            return EXIT_FAILED
        print(f"[reproduce {profile}] finished in {minutes:.1f} min; tables and figures in {_rel(layout.results)}")
        return 0
    except KeyboardInterrupt:
        try:
            if layout is not None:
                harvest(layout)
        except Exception:  # noqa: BLE001 - never hide the interrupt
            pass
        again = resume_command(profile, layout) if layout is not None else "the same command"
        if layout is not None and options.get("launcher") and options["launcher"] != prof.launcher:
            again += f" LAUNCHER={options['launcher']}" + (f" JOBS={options['jobs']}" if options.get("jobs") else "")
        print(f"[reproduce {profile}] interrupted by {interrupts.cause()}; its run records are kept, its claims and "
              f"trials given back; run `{again}` to resume where it stopped.", flush=True)
        return EXIT_INTERRUPTED
    except ReproduceError as exc:
        print(f"[reproduce {profile}] error: {exc}")
        return EXIT_USAGE
    except Exception as exc:  # noqa: BLE001 - the entry point promises one line, never a traceback
        print(f"[reproduce {profile}] unexpected error: {type(exc).__name__}: {exc}")
        return EXIT_FAILED
    finally:
        if entry is not None:
            entry.release()
