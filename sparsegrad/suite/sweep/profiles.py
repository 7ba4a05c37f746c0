"""Profiles of ``make reproduce-glue`` and where their results go.

A profile (``conf/profile/<name>.yaml``) names the models, methods and tasks, the search space in
``conf/hparams_search/``, the seeds and the overrides every run gets. Its results folder is
``results/<profile>`` (or ``$SPARSEGRAD_RESULTS/<profile>``); ``--fresh`` uses ``results/local/<profile>``
so that a new run on this machine never mixes with the committed records. No Hydra, no Optuna here.
"""

from __future__ import annotations

import csv
import datetime as dt
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[3]
CONF_DIR = ROOT / "conf"
PAPER_CSV = ROOT / "results" / "paper" / "paper_numbers.csv"
STORAGE_ENV = "SPARSEGRAD_OPTUNA_STORAGE"
RESULTS_ENV = "SPARSEGRAD_RESULTS"  # default: <repo>/results
WORK_ENV = "SPARSEGRAD_REPRODUCE_OUTPUTS"  # default: <repo>/outputs/reproduce
LOCAL = "local"  # --fresh: results/local/<profile>, outputs/reproduce/local/<profile>
POLL_SECONDS = 5.0  # how often a driver looks again at work another driver holds
DRIVERS = "drivers"  # results/<profile>/drivers/: a heartbeat file per live driver
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
    sweep: dict[str, Any] | None = None  # {search, n_trials, seed} (TPE) or {grid, batch_size, seed} (GridSampler)
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

    def grid(self, model: str, method: str) -> dict[str, list] | None:
        """The grid a study runs through Optuna's GridSampler, {"trainer.lr": [...], "trainer.batch_size": [...]},
        or None for a TPE study. ``sweep.grid`` is a list of learning rates, or a mapping from ``model/method``,
        a model, a method or ``default`` (looked up in that order) to one; ``sweep.batch_size`` one batch size
        or a list (default 16)."""
        sweep = self.sweep or {}
        lrs = sweep.get("grid")
        if not lrs or self.best_from != "sweep":
            return None
        if isinstance(lrs, dict):
            key = next((k for k in (f"{model}/{method}", model, method, "default") if k in lrs), None)
            if key is None:
                raise ReproduceError(f"profile {self.name!r}: sweep.grid has no entry for {model}/{method} "
                                     f"and no 'default'; its keys: {sorted(lrs)}")
            lrs = lrs[key]
        batch = sweep.get("batch_size", 16)
        batches = batch if isinstance(batch, list) else [batch]
        return {"trainer.lr": sorted(float(v) for v in lrs), "trainer.batch_size": sorted(int(b) for b in batches)}

    def grid_size(self, model: str, method: str) -> int:
        grid = self.grid(model, method) or {}
        return len(grid.get("trainer.lr", [])) * len(grid.get("trainer.batch_size", []))


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
    results: Path  # results/<profile>: records, tables, figures, optuna.db, run.json
    work: Path  # outputs/reproduce/<profile>: Hydra run folders and logs

    @classmethod
    def for_profile(cls, name: str, results_root: str | Path | None = None, fresh: bool = False) -> Layout:
        default_root = Path(os.environ.get(RESULTS_ENV) or ROOT / "results").resolve()
        work_root = Path(os.environ.get(WORK_ENV) or ROOT / "outputs" / "reproduce").resolve()
        root = default_root / LOCAL if fresh else Path(results_root or default_root).resolve()
        if root != default_root:  # another results root: its Hydra run folders apart too
            work_root = work_root / root.name
        return cls(root / name, work_root / name)

    @property
    def records(self) -> Path:
        return self.results / "records"

    @property
    def identity(self) -> dict:
        from sparsegrad.suite.sweep.runrecords import folder_identity

        return folder_identity(self.results)

    def storage(self) -> str:
        from sparsegrad.suite.sweep.studies import is_journal

        url = os.environ.get(STORAGE_ENV)
        if url and is_journal(url) and not url.startswith("journal:"):  # a journal file: its absolute path
            return str(Path(url).expanduser().resolve())
        return url or f"sqlite:///{self.results / 'optuna.db'}"

    def shared_storage(self) -> bool:
        return bool(os.environ.get(STORAGE_ENV))

    def optuna_name(self, model: str, method: str, task: str) -> str:
        """The study's name in the storage: a fresh start on a shared storage gets studies of its own."""
        name = study_name(model, method, task)
        if self.shared_storage() and self.identity.get("fresh"):
            name += f"@{self.identity['id']}"
        return name


def study_name(model: str, method: str, task: str) -> str:
    return f"{model}-{method}-{task}"


def start_fresh(layout: Layout) -> list[str]:
    """Move an earlier ``results/local/<profile>`` (and its run folders) aside; returns what moved. Call it
    through :func:`enter_results`, which never moves a folder a live driver works in."""
    from sparsegrad.suite.sweep.runrecords import folder_identity

    moved = []
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    for folder in (layout.results, layout.work):
        if folder.exists() and any(folder.iterdir()):
            target, n = folder.with_name(f"{folder.name}.before-{stamp}"), 1
            while target.exists():  # two fresh starts in one second
                n += 1
                target = folder.with_name(f"{folder.name}.before-{stamp}-{n}")
            folder.rename(target)
            moved.append(_rel(target))
    folder_identity(layout.results, fresh=True)
    return moved


@dataclass
class Entry:
    """A driver's presence in a results folder (:func:`enter_results`); ``release()`` when it ends."""

    presence: Any  # a sparsegrad.suite.sweep.runrecords.Claim, kept fresh by its heartbeat
    run_id: str
    moved: list[str] = field(default_factory=list)  # what a fresh start moved aside
    joined: list[str] = field(default_factory=list)  # the live drivers of the run this one joined

    def release(self) -> None:
        self.presence.release()

    def fresh_message(self, profile: str, layout: Layout) -> str:
        if self.joined:
            return (f"fresh start: another driver ({'; '.join(self.joined)}) is running the fresh run {self.run_id} "
                    f"in {_rel(layout.results)}: joining it (nothing moved aside, the work is shared). To start "
                    f"again from scratch, stop that driver first, then run {fresh_command(profile)}")
        return ("fresh start: every earlier record and study of the profile is ignored"
                + (f"; moved aside: {', '.join(self.moved)}" if self.moved else ""))


def live_drivers(results: Path) -> list[str]:
    """The drivers working in ``results`` now ("<host> pid <pid> since <time>" each)."""
    from sparsegrad.suite.sweep.runrecords import Claim

    live = []
    for path in sorted((results / DRIVERS).glob("*.claim")):
        claim = Claim(path.parent, path.name.removesuffix(".claim"))
        if not claim.stale():
            live.append(claim.holder() or path.stem)
    return live


def enter_results(layout: Layout, fresh: bool = False) -> Entry:
    """Register this driver in its results folder (a heartbeat file under ``drivers/``). With ``fresh``,
    first move an earlier folder aside (:func:`start_fresh`), unless a live driver works in it: then join
    its run, as two drivers of one folder share the work. A lock file beside the folder makes the look,
    the move and the registration one step, so two fresh starts at once never both move."""
    import fcntl
    import secrets
    import socket

    from sparsegrad.suite.sweep.runrecords import Claim, folder_identity

    layout.results.parent.mkdir(parents=True, exist_ok=True)
    with open(layout.results.parent / f".{layout.results.name}.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, or when this process dies
        live = live_drivers(layout.results)
        moved = start_fresh(layout) if fresh and not live else []
        run_id = folder_identity(layout.results, fresh=fresh)["id"]
        presence = Claim(layout.results / DRIVERS, f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(2)}")
        presence.acquire()
    return Entry(presence, run_id, moved, live if fresh else [])


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


def _rel(path: Path) -> str:
    try:
        return str(path.relative_to(ROOT))
    except ValueError:
        return str(path)


def fresh_command(profile: str) -> str:
    return f"make reproduce-glue PROFILE={profile} FRESH=1"


def resume_command(profile: str, layout: Layout) -> str:
    default = Layout.for_profile(profile)
    if layout.results == default.results:
        return f"make reproduce-glue PROFILE={profile}"
    return f"make reproduce-glue PROFILE={profile} RESULTS={_rel(layout.results.parent)}"


def reuse_message(prof: Profile, layout: Layout, n_reused: int, todo: int) -> str:
    where = _rel(layout.results)
    left = "nothing left to run: only the tables are rebuilt" if todo == 0 else f"{todo} run(s) to do"
    return (f"{n_reused} run record(s) reused from {where} (committed with the repository or from an earlier run), "
            f"{left}. To run everything again from scratch on this machine, into "
            f"{_rel(Layout.for_profile(prof.name, fresh=True).results)}: {fresh_command(prof.name)}")
