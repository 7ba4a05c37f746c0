"""Optuna studies that many workers share: storage, trial budget, heartbeat, retry, best trial.

No Hydra here: the Optuna sweeper plugin (``hydra_plugins/sparsegrad_optuna_sweeper``) and the
``make reproduce-glue`` driver (:mod:`sparsegrad.suite.sweep.driver`) both build on these functions.

**The budget is a queue of tickets.** The worker that creates a study (study names are unique in every
Optuna storage, so exactly one worker wins) records the budget ``n_trials`` and enqueues that many empty
WAITING trials, one per slot. Every worker then claims WAITING trials one at a time (Optuna's
WAITING -> RUNNING switch is atomic in the RDB and journal storages) and samples the claimed trial's
setting only then, with a sampler seeded by ``seed + trial number``: two workers never sample with the
same seed and history, so no setting is drawn twice, and N workers together run exactly ``n_trials``.
A later run with a larger ``n_trials`` raises the budget and adds the missing tickets.

**A grid** (:func:`prepare_grid`, Optuna's ``GridSampler``): one ticket per grid point, numbered as
GridSampler numbers its points (``grid_id``, with the grid and its seed in the ticket's system
attributes), so whichever worker claims a ticket, its GridSampler gives it that point. A trial that
ran a point (completed, diverged or failed) holds it for good; a ticket given back by an interrupt or
a dead worker keeps its point; a slot refilled after its creator died gets a point no trial holds yet.
A grid that grows later gets tickets for its new points only (grow it from one worker): no value runs
twice.

**Missing tickets.** A creator (or a worker raising the budget) that dies between recording the budget
and queuing its last ticket leaves budget slots without a trial. Any worker that sees the same slots
missing for a while (:class:`Refill`: a live creator adds a ticket every few milliseconds) queues them
(:func:`refill`). Two workers may do so at the same moment and queue one slot twice; :func:`claim` then
lets only the lowest-numbered live trial of a slot run (trial creation is serialised per study in the
RDB storages, by a lock on the study row, and ordered by the log in the journal storage, so a trial
that sees itself also sees every lower-numbered one) and marks the other FAIL with the user attribute
``duplicate_ticket``: each slot runs once, whoever queued it.

**Heartbeat.** A worker writes the time into each trial it runs every ``interval`` seconds (a trial
system attribute, so it works on every storage, the journal file included). A RUNNING trial whose last
heartbeat (or start) is older than ``grace`` seconds belongs to a dead worker: any worker marks it FAIL
and re-queues its setting once (:func:`retry`, Optuna's retry attributes); a second death leaves it
FAIL. Workers exit only when no ticket is WAITING or RUNNING and no slot is missing, so a killed
worker's trial is retried by the others, or by the same worker restarted. Clocks of machines sharing a
study must agree to well within ``grace`` (NTP). A trial stopped by Ctrl-C or SIGTERM (a preempted
job) is failed and its setting queued again in the same slot (:func:`requeue`): counted once.

**Results that come too late.** A worker that was only paused (SIGSTOP, a swapping node, a network
partition) past the grace period finds its trial failed and retried when its run ends: Optuna cannot
take that result any more. :func:`record_duplicate_run` keeps it in the study (a study system
attribute, listed by :func:`duplicate_runs`) beside the run record the job wrote; the sweeper and the
driver name it on screen as a duplicate run of that setting.

Fault injection for the tests: ``SPARSEGRAD_TEST_KILL_AFTER_TICKETS=n`` makes the worker that creates a
study kill itself (SIGKILL) right after queuing its ``n``-th ticket.
"""

from __future__ import annotations

import math
import os
import random
import signal
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

HEARTBEAT_ATTR = "sparsegrad:heartbeat"  # trial system attribute: time.time() of the last heartbeat
TICKET_ATTR = "sparsegrad:slot"  # trial system attribute: the budget slot a ticket fills
BUDGET_ATTR = "sparsegrad:budget"  # study system attribute: n_trials
INTERRUPTED_ATTR = "interrupted"  # user attribute of a trial stopped by Ctrl-C or SIGTERM (its slot is re-queued)
DUPLICATE_TICKET_ATTR = "duplicate_ticket"  # user attribute of a ticket that lost a concurrent refill (never run)
DUPLICATE_RUN_PREFIX = "sparsegrad:duplicate_run:"  # study system attribute + trial number: a result too late
KILL_AFTER_TICKETS_ENV = "SPARSEGRAD_TEST_KILL_AFTER_TICKETS"  # fault injection (tests): creator dies mid-queue
GRID_ATTR = "sparsegrad:grid"  # study system attribute: {"space": the grid, "seed": GridSampler's seed}
GRID_SEED_ATTR = "sparsegrad:grid_seed"  # trial system attribute: the GridSampler seed of a grid ticket
GRID_TRIAL_ATTRS = ("grid_id", "search_space", GRID_SEED_ATTR)  # what makes a ticket one grid point
HEARTBEAT_INTERVAL, GRACE_PERIOD = 10.0, 30.0  # seconds


class StudyError(Exception):
    """A storage or study problem the user can fix; one line."""


# ------------------------------------------------------------------------------------------ storage
SQLITE_HEADER = b"SQLite format 3\x00"


def is_journal(url: str) -> bool:
    """A journal file: a plain path (no ``scheme://``), the form optuna-dashboard reads as well; the older
    ``journal:///abs/path.log`` is still accepted here (optuna-dashboard refuses it)."""
    return url.startswith("journal:") or "://" not in url


def journal_path(url: str) -> Path:
    return Path(url.removeprefix("journal://")) if url.startswith("journal:") else Path(url)


def _head(path: Path, n: int) -> bytes:
    with open(path, "rb") as fh:
        return fh.read(n)


def dashboard_storage(url: str) -> str:
    """The same storage as optuna-dashboard wants it: a journal file as its plain path."""
    return str(journal_path(url)) if is_journal(url) else url


def upgrade_command(url: str) -> str:
    """The shell command that upgrades an old study database (Optuna's CLI of this environment)."""
    import sys

    cli = Path(sys.executable).parent / "optuna"
    return f"{cli if cli.exists() else 'optuna'} storage upgrade --storage '{url}'"


def repair_command(url: str | None, name: str) -> str:
    """The shell command that queues a study's missing slots and gives back its dead workers' trials."""
    return f"python -m scripts.repair_study --storage '{url}' --study '{name}'"


def open_storage(url: str | None, attempts: int = 40):
    """An Optuna storage for ``url``: a SQLAlchemy URL (sqlite:///..., postgresql://...), or a journal file
    given as its plain path (/shared/fs/study.log; also journal:///shared/fs/study.log): Optuna's
    JournalStorage, for machines that share a file system but no database server. None: in memory (one
    process only). optuna-dashboard takes the same string (:func:`dashboard_storage`).

    Workers started together on an empty database race to create its tables; the loser retries."""
    import optuna

    if url is None:
        return optuna.storages.InMemoryStorage()
    if is_journal(url):
        path = journal_path(url)
        if path.is_file() and _head(path, len(SQLITE_HEADER)) == SQLITE_HEADER:
            raise StudyError(f"{url} is an SQLite database, not a journal file; give it as sqlite:///{path.resolve()}")
        path.parent.mkdir(parents=True, exist_ok=True)
        from optuna.storages.journal import JournalFileBackend, JournalStorage

        return JournalStorage(JournalFileBackend(str(path)))
    kwargs: dict[str, Any] = {}
    if url.startswith("sqlite"):
        kwargs = {"connect_args": {"timeout": 120}}  # many workers on one file: wait for the lock
    last: Exception | None = None
    for attempt in range(attempts):
        try:
            return optuna.storages.RDBStorage(url, engine_kwargs=kwargs)
        except RuntimeError as exc:
            if "storage upgrade" in str(exc):
                raise StudyError(f"the study database {url} was written by an older Optuna; upgrade it once "
                                 f"(this cannot be undone) with: {upgrade_command(url)}") from None
            raise
        except ModuleNotFoundError as exc:
            raise StudyError(f"{url}: the database driver is missing ({exc}); for PostgreSQL install the "
                             f"extra: pip install -e '.[postgres]'") from None
        except Exception as exc:  # noqa: BLE001 - concurrent schema creation (duplicate table/type, locked)
            last = exc
            time.sleep(0.2 + random.random() * min(2.0, 0.2 * (attempt + 1)))
    raise StudyError(f"could not open the study storage {url}: {type(last).__name__}: {last}")


# ------------------------------------------------------------------------------------------- budget
def _get_or_create(storage, name: str, direction: str):
    """(study, created): exactly one of many concurrent callers gets created=True."""
    import optuna

    try:
        return optuna.create_study(study_name=name, storage=storage, direction=direction), True
    except optuna.exceptions.DuplicatedStudyError:
        return optuna.load_study(study_name=name, storage=storage), False


def _ticket(slot: int, params: dict | None = None, distributions: dict | None = None, **attrs: Any):
    """A WAITING trial for budget slot ``slot``; with ``params`` it runs that setting (a retry, a requeue)."""
    import optuna

    return optuna.trial.create_trial(state=optuna.trial.TrialState.WAITING, params=params,
                                     distributions=distributions, system_attrs={**attrs, TICKET_ATTR: slot})


def _grid_attrs(frozen) -> dict:
    """The grid point of a grid ticket (GridSampler's grid_id, its grid and seed); {} for other trials."""
    return {k: frozen.system_attrs[k] for k in GRID_TRIAL_ATTRS if k in frozen.system_attrs}


def _counted_legacy(trials) -> int:
    """Finished trials made without tickets (studies from before the queue); Ctrl-C'd ones do not count."""
    return sum(1 for t in trials if TICKET_ATTR not in t.system_attrs and t.state.is_finished()
               and not t.user_attrs.get(INTERRUPTED_ATTR))


def prepare(storage, name: str, direction: str, n_trials: int, wait_s: float = 60.0):
    """Open (or create) study ``name`` with a budget of ``n_trials`` trials in total over all workers."""
    study, created = _get_or_create(storage, name, direction)
    if created:
        study._storage.set_study_system_attr(study._study_id, BUDGET_ATTR, int(n_trials))
        die_after = int(os.environ.get(KILL_AFTER_TICKETS_ENV) or -1)
        for slot in range(n_trials):
            study.add_trial(_ticket(slot))
            if slot + 1 == die_after:
                os.kill(os.getpid(), signal.SIGKILL)
        return study
    deadline = time.time() + wait_s
    while True:  # the creator writes the budget right after creating the study
        attrs = study._storage.get_study_system_attrs(study._study_id)
        trials = study.get_trials(deepcopy=False)
        if BUDGET_ATTR in attrs or trials or time.time() > deadline:
            break
        time.sleep(0.2)
    budget = attrs.get(BUDGET_ATTR)
    if budget is None:  # a study from before the queue: its finished trials use up budget
        budget = _counted_legacy(trials)
        study._storage.set_study_system_attr(study._study_id, BUDGET_ATTR, int(budget))
    if n_trials > budget:  # a larger budget than before: its new slots get tickets
        study._storage.set_study_system_attr(study._study_id, BUDGET_ATTR, int(n_trials))
        refill(study)
    return study


def budget(study) -> int:
    return int(study._storage.get_study_system_attrs(study._study_id).get(BUDGET_ATTR, 0))


def missing_slots(study, trials=None) -> list[int]:
    """Budget slots without any trial (a creator or a budget-raiser that died before queuing them all).
    Tickets fill slots 0, 1, ...; finished trials from before the queue (no ticket) use up budget too."""
    trials = study.get_trials(deepcopy=False) if trials is None else trials
    present = {t.system_attrs[TICKET_ATTR] for t in trials if TICKET_ATTR in t.system_attrs}
    return sorted(set(range(budget(study) - _counted_legacy(trials))) - present)


def refill(study, slots: Iterable[int] | None = None) -> list[int]:
    """Queue a ticket for each missing budget slot (all of them, or those of ``slots`` still missing);
    returns the slots queued. In a grid study each gets a point no trial holds yet, in grid order, so two
    workers that refill at once queue the same point in the same slot. Safe to run in many workers at
    once: see :func:`claim`."""
    todo = missing_slots(study)
    if slots is not None:
        todo = sorted(set(todo) & set(slots))
    grid = study._storage.get_study_system_attrs(study._study_id).get(GRID_ATTR)
    free = iter(_free_points(study, grid["space"], grid["seed"]) if grid else [])
    for slot in todo:
        point = next(free, None) if grid else None
        if grid and point is None:
            break  # every point of the grid is held: nothing to queue
        study.add_trial(_ticket(slot, **(_grid_ticket(grid["space"], grid["seed"], point[0]) if grid else {})))
    return todo


class Refill:
    """Calls :func:`refill` once the same slots have been missing for ``settle`` seconds: a creator that is
    still queuing fills one every few milliseconds, a dead one none. Call it whenever the worker looks for
    work; returns the slots it queued."""

    def __init__(self, settle: float):
        self.settle = float(settle)
        self._seen: tuple | None = None
        self._since = 0.0

    def __call__(self, study) -> list[int]:
        missing = missing_slots(study)
        seen = tuple(missing)
        if not missing or seen != self._seen:
            self._seen, self._since = (seen if missing else None), time.time()
            return []
        if time.time() - self._since < self.settle:
            return []
        self._seen = None
        return refill(study, missing)


# --------------------------------------------------------------------------------------------- grid
def grid_sampler(space: dict[str, list], seed: int | None):
    """Optuna's GridSampler over ``space`` ({parameter: [values]}); ``seed`` fixes the order of its points."""
    import optuna

    return optuna.samplers.GridSampler({k: list(v) for k, v in space.items()}, seed=seed)


def grid_distributions(space: dict[str, list]) -> dict:
    """The distribution each grid parameter is suggested from: numbers as ranges over their values (on a log
    scale for positive floats), so that a grid that grows later stays one study (Optuna fixes a categorical
    parameter's choices for good); anything else categorical."""
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    def one(values: list):
        if all(isinstance(v, int) and not isinstance(v, bool) for v in values):
            return IntDistribution(min(values), max(values))
        if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
            return FloatDistribution(float(min(values)), float(max(values)), log=min(values) > 0)
        return CategoricalDistribution(list(values))

    return {k: one(list(v)) for k, v in space.items()}


def grid_points(space: dict[str, list], seed: int | None) -> list[dict]:
    """The grid's points in GridSampler's order: point i is what GridSampler gives the trial with grid_id i."""
    import optuna

    sampler, dists = grid_sampler(space, seed), grid_distributions(space)
    n = math.prod(len(v) for v in space.values())
    frozen = [optuna.trial.create_trial(state=optuna.trial.TrialState.WAITING, system_attrs={"grid_id": i})
              for i in range(n)]
    return [{k: sampler.sample_independent(None, f, k, d) for k, d in dists.items()} for f in frozen]


def _point_key(params: dict) -> tuple:
    return tuple(sorted((k, float(v) if isinstance(v, (int, float)) else v) for k, v in params.items()))


def _grid_ticket(space: dict[str, list], seed: int | None, grid_id: int) -> dict:
    return {"grid_id": grid_id, "search_space": {k: list(v) for k, v in space.items()}, GRID_SEED_ATTR: seed}


def _free_points(study, space: dict[str, list], seed: int | None) -> list[tuple[int, dict]]:
    """(grid_id, point) of the grid's points that no trial of the study holds, in grid order: a trial holds
    its parameters, a queued ticket the point of its grid_id; a trial given back by an interrupt holds
    none (its point was queued again) and neither does a duplicate ticket that never ran."""
    held, orders = set(), {}
    for t in study.get_trials(deepcopy=False):
        if t.user_attrs.get(INTERRUPTED_ATTR) or t.user_attrs.get(DUPLICATE_TICKET_ATTR) is not None:
            continue
        if t.params:
            held.add(_point_key(t.params))
        elif "grid_id" in t.system_attrs:
            grid, own_seed = t.system_attrs["search_space"], t.system_attrs.get(GRID_SEED_ATTR)
            key = (repr(sorted(grid.items())), own_seed)
            if key not in orders:
                orders[key] = grid_points(grid, own_seed)
            held.add(_point_key(orders[key][t.system_attrs["grid_id"]]))
    return [(i, p) for i, p in enumerate(grid_points(space, seed)) if _point_key(p) not in held]


def prepare_grid(storage, name: str, direction: str, space: dict[str, list], seed: int | None = None,
                 wait_s: float = 60.0):
    """Open (or create) study ``name`` as a grid over ``space``: a ticket for each point no trial holds yet.

    The budget counts every ticket made; a grid that grows later raises it by its new points (do that from
    one worker). A creator that dies while queuing leaves slots that any worker refills (:class:`Refill`)."""
    study, created = _get_or_create(storage, name, direction)
    grid = {"space": {k: list(v) for k, v in space.items()}, "seed": seed}
    if created:
        study._storage.set_study_system_attr(study._study_id, GRID_ATTR, grid)
        study._storage.set_study_system_attr(study._study_id, BUDGET_ATTR, math.prod(len(v) for v in space.values()))
        die_after = int(os.environ.get(KILL_AFTER_TICKETS_ENV) or -1)
        for slot, _ in enumerate(grid_points(space, seed)):
            study.add_trial(_ticket(slot, **_grid_ticket(space, seed, slot)))
            if slot + 1 == die_after:
                os.kill(os.getpid(), signal.SIGKILL)
        return study
    deadline = time.time() + wait_s
    while True:  # the creator writes the grid and the budget right after creating the study
        attrs = study._storage.get_study_system_attrs(study._study_id)
        if GRID_ATTR in attrs or study.get_trials(deepcopy=False) or time.time() > deadline:
            break
        time.sleep(0.2)
    if attrs.get(GRID_ATTR) != grid:  # a new or grown grid: its points no trial holds get slots
        missing = len(missing_slots(study))
        study._storage.set_study_system_attr(study._study_id, GRID_ATTR, grid)
        free = len(_free_points(study, space, seed))
        if free > missing:
            study._storage.set_study_system_attr(study._study_id, BUDGET_ATTR, budget(study) + free - missing)
        refill(study)
    return study


def progress(study) -> dict[str, int]:
    """Budget, slots used, and WAITING / RUNNING tickets of a study."""
    from optuna.trial import TrialState

    trials = study.get_trials(deepcopy=False)
    slots = {t.system_attrs[TICKET_ATTR] for t in trials if TICKET_ATTR in t.system_attrs}
    return {"budget": budget(study), "slots": len(slots) + _counted_legacy(trials),
            "waiting": sum(1 for t in trials if t.state == TrialState.WAITING),
            "running": sum(1 for t in trials if t.state == TrialState.RUNNING)}


def claim(study, limit: int, into: list[int] | None = None) -> list[int]:
    """Switch up to ``limit`` WAITING trials to RUNNING for this worker; their trial ids (appended to
    ``into`` one by one, so that a caller interrupted half-way knows what it holds)."""
    import optuna
    from optuna.trial import TrialState

    mine: list[int] = [] if into is None else into
    for t in study.get_trials(deepcopy=False, states=(TrialState.WAITING,)):
        if len(mine) >= limit:
            break
        try:
            if study._storage.set_trial_state_values(t._trial_id, state=TrialState.RUNNING):
                mine.append(t._trial_id)  # first: an interrupt from here on gives it back (the sweeper's _abandon)
                if _lost_refill_race(study, t):
                    mine.remove(t._trial_id)
                    continue
                study._storage.set_trial_system_attr(t._trial_id, HEARTBEAT_ATTR, time.time())
        except optuna.exceptions.UpdateFinishedTrialError:
            continue
    return mine


def _lost_refill_race(study, ticket) -> bool:
    """True (and the ticket, just claimed, marked FAIL unrun) when a lower-numbered trial of the same slot
    is still live: two workers refilled the slot at once and the lower number is the one that runs."""
    from optuna.trial import TrialState

    slot = ticket.system_attrs.get(TICKET_ATTR)
    if slot is None:
        return False
    for t in study._storage.get_all_trials(study._study_id, deepcopy=False):
        if (t.number < ticket.number and t.system_attrs.get(TICKET_ATTR) == slot and t.state != TrialState.FAIL):
            study._storage.set_trial_user_attr(ticket._trial_id, DUPLICATE_TICKET_ATTR, t.number)
            study._storage.set_trial_state_values(ticket._trial_id, state=TrialState.FAIL)
            return True
    return False


def requeue(study, frozen) -> None:
    """Put a trial stopped by Ctrl-C or SIGTERM (a preempted job) back in the queue: a ticket of the same
    slot with the same setting (when it had one), so the budget counts it once; the trial says FAIL."""
    slot = frozen.system_attrs.get(TICKET_ATTR)
    if slot is not None:
        study.add_trial(_ticket(slot, frozen.params or None, frozen.distributions or None,
                                failed_trial=frozen.number, **_grid_attrs(frozen)))  # a grid ticket keeps its point


def retry(study, failed, max_retry: int = 1) -> bool:
    """Queue the setting of a failed trial again, at most ``max_retry`` times per original trial. The
    system attributes ``failed_trial`` and ``retry_history`` follow Optuna's own retry callback
    (``RetryHeartbeatStaleTrialCallback.retry_history`` reads them); user attributes are not copied."""
    import optuna

    history = [*failed.system_attrs.get("retry_history", []), failed.number]
    if len(history) > max_retry:
        return False
    attrs = {"failed_trial": history[0], "retry_history": history, **_grid_attrs(failed)}
    if TICKET_ATTR in failed.system_attrs:
        attrs[TICKET_ATTR] = failed.system_attrs[TICKET_ATTR]
    study.add_trial(optuna.trial.create_trial(state=optuna.trial.TrialState.WAITING, params=failed.params,
                                              distributions=failed.distributions, system_attrs=attrs))
    return True


def record_duplicate_run(study, number: int, value: float, output_dir: str | None) -> dict:
    """Keep the result of trial ``number`` that finished after it had been failed (no heartbeat) and, at
    most once, retried: Optuna takes no result for a finished trial. Returns what is kept (the setting,
    the value, the retry's number or None, the run folder) as a study system attribute."""
    frozen = study._storage.get_trial(study._storage.get_trial_id_from_study_id_trial_number(study._study_id,
                                                                                             number))
    retries = [t.number for t in study.get_trials(deepcopy=False)
               if t.system_attrs.get("failed_trial") == number and t.number != number]
    kept = {"trial": number, "params": dict(frozen.params), "value": float(value),
            "retried_as": retries[0] if retries else None, "output_dir": output_dir}
    study._storage.set_study_system_attr(study._study_id, f"{DUPLICATE_RUN_PREFIX}{number}", kept)
    return kept


def duplicate_runs(study) -> list[dict]:
    """Every result kept by :func:`record_duplicate_run`, by trial number."""
    attrs = study._storage.get_study_system_attrs(study._study_id)
    return sorted((v for k, v in attrs.items() if k.startswith(DUPLICATE_RUN_PREFIX)), key=lambda d: d["trial"])


def describe_duplicate_run(kept: dict, study_name: str) -> str:
    """One line naming a duplicate run of a setting."""
    setting = " ".join(f"{k}={v!r}" if isinstance(v, float) else f"{k}={v}" for k, v in kept["params"].items())
    retry = (f"its setting was queued again as trial {kept['retried_as']}, whose result the study keeps"
             if kept["retried_as"] is not None else "its setting was not retried (second death)")
    where = f"; its output stays in {kept['output_dir']}" if kept.get("output_dir") else ""
    return (f"study {study_name!r}: trial {kept['trial']} ({setting}) finished with {kept['value']:.6g} after it "
            f"had been failed for a missing heartbeat; {retry}. It is a duplicate run of that setting, kept "
            f"beside the study (not counted in the budget){where}")


# ---------------------------------------------------------------------------------------- heartbeat
class Heartbeat:
    """A daemon thread that writes the time into every trial this worker runs, every ``interval`` s, and
    then calls ``on_beat`` (the sweeper fails stale trials there, so a dead worker's trial is settled
    within ``grace + interval`` seconds even while every live worker is busy with a long trial)."""

    def __init__(self, storage, interval: float = HEARTBEAT_INTERVAL, on_beat: Callable[[], Any] | None = None):
        self.storage, self.interval, self.on_beat = storage, float(interval), on_beat
        self.trial_ids: set[int] = set()
        self._lock, self._stop = threading.Lock(), threading.Event()
        self._thread = threading.Thread(target=self._loop, name="optuna-heartbeat", daemon=True)

    def __enter__(self) -> Heartbeat:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def add(self, trial_id: int) -> None:
        with self._lock:
            self.trial_ids.add(trial_id)

    def remove(self, trial_id: int) -> None:
        with self._lock:
            self.trial_ids.discard(trial_id)

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            with self._lock:
                ids = sorted(self.trial_ids)
            for trial_id in ids:
                try:
                    self.storage.set_trial_system_attr(trial_id, HEARTBEAT_ATTR, time.time())
                except Exception:  # noqa: BLE001 - finished meanwhile, or the database blinked: next beat
                    pass
            if self.on_beat is not None:
                try:
                    self.on_beat()
                except Exception:  # noqa: BLE001 - the next beat tries again
                    pass


def last_sign_of_life(frozen) -> float:
    start = frozen.datetime_start.timestamp() if frozen.datetime_start else 0.0
    return max(float(frozen.system_attrs.get(HEARTBEAT_ATTR, 0.0)), start)


def fail_stale(study, grace: float = GRACE_PERIOD, finished: Callable[[Any], float | None] | None = None,
               max_retry: int = 1) -> list[int]:
    """Mark RUNNING trials without a heartbeat for ``grace`` seconds FAIL and re-queue their setting once.
    ``finished(frozen)`` may return the objective of a run that ended before its worker died: that trial
    is told COMPLETE instead. Returns the numbers of the trials settled here."""
    import optuna
    from optuna.trial import TrialState

    now, settled = time.time(), []
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        if now - last_sign_of_life(t) < grace:
            continue
        value = finished(t) if finished is not None else None
        try:
            if value is not None:
                study._storage.set_trial_user_attr(t._trial_id, "recovered_from_record", True)
                study.tell(t.number, value)
            else:  # the attribute first: a finished trial takes none
                study._storage.set_trial_user_attr(t._trial_id, "stale_heartbeat", True)
                if not study._storage.set_trial_state_values(t._trial_id, state=TrialState.FAIL):
                    continue
                retry(study, study._storage.get_trial(t._trial_id), max_retry)
            settled.append(t.number)
        except (optuna.exceptions.UpdateFinishedTrialError, RuntimeError, ValueError):
            continue  # another worker settled it first
    return settled


# --------------------------------------------------------------------------------------- best trial
def tie_break_key(value: float, started: str, higher: bool) -> tuple:
    """Sort key of the best-trial rule shared by the driver and the tables: the best objective; among
    equal objectives the trial that started first (then the name, ``started`` ties): the same choice
    on every machine and run, never file order, and the one Optuna itself makes within one study."""
    return (-value if higher else value, started)


def pick_best(candidates: Iterable[tuple[float | None, str, Any]], higher: bool) -> Any:
    """The payload of the best (objective, started, payload) candidate, or None."""
    best = None
    for value, started, payload in candidates:
        if value is None or not math.isfinite(float(value)):
            continue
        key = tie_break_key(float(value), started, higher)
        if best is None or key < best[0]:
            best = (key, payload)
    return None if best is None else best[1]


def best_trial(study):
    """The study's best COMPLETE trial under :func:`tie_break_key`."""
    from optuna.study import StudyDirection
    from optuna.trial import TrialState

    higher = study.direction == StudyDirection.MAXIMIZE
    trials = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    return pick_best(((t.value, f"{t.datetime_start.isoformat() if t.datetime_start else ''}|{t.number:09d}", t)
                      for t in trials), higher)


def running_trials(url: str, names: Iterable[str]) -> int:
    """Trials of the named studies running now in the storage at ``url``, on any worker (0 for a storage not
    written yet: a SQLite file or journal that does not exist is not created)."""
    import optuna

    local = url.removeprefix("sqlite:///") if url.startswith("sqlite:///") else url.removeprefix("journal://")
    if (url.startswith("sqlite:///") or is_journal(url)) and not Path(local).exists():
        return 0
    storage = open_storage(url)
    running = 0
    for name in names:
        try:
            study_id = storage.get_study_id_from_name(name)
        except KeyError:  # not created yet
            continue
        running += len(storage.get_all_trials(study_id, deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)))
    return running
