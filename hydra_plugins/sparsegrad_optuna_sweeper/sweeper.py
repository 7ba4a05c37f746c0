"""An Optuna sweeper for Hydra 1.3 (``hydra/sweeper=optuna``), on Hydra's documented Sweeper interface.

Hydra's own plugin (hydra-optuna-sweeper 1.3) pins Optuna below 3; its 1.4 line is a release candidate
without heartbeats. This one drives Optuna >= 5 and lets any number of workers share one study
(:mod:`sparsegrad.suite.sweep.studies`): the budget ``n_trials`` is for the study in total, each worker
claims queued trials, samples a claimed trial's setting with the seed ``sampler.seed + trial number``,
launches a batch of ``n_jobs`` through the configured Hydra launcher (basic, joblib, submitit), keeps
a heartbeat on its running trials and retries once the trial of a worker that died. A job that raises
or returns no finite number is told to Optuna as FAIL and the sweep goes on. Then it waits until no
trial of the study is queued or running and no budget slot is missing (a creator that died half-way:
whoever sees the slots missing queues them), and writes ``optimization_results.yaml`` in the sweep folder.
Ctrl-C or SIGTERM (a preempted or timed-out job) gives the running trials back: failed, their setting
queued again in the same budget slot; the same command resumes. A result that comes back after its trial
was failed for a missing heartbeat and retried is named on screen (WARNING) as a duplicate run.

    python -m experiments.finetune --multirun +hparams_search=lr_batch hydra.sweeper.n_trials=4
    python app.py --multirun hydra/sweeper=optuna 'x=tag(log, interval(1e-3, 1))' hydra.sweeper.storage=sqlite:///s.db

Search space (``params`` or sweep overrides on the command line): ``interval(a, b)`` a float (``int``
tag: an integer), ``tag(log, interval(a, b))`` on a log scale, ``choice(...)`` / ``a,b,c`` / ``range(...)``
categorical. ``sampler.kind``: ``tpe`` (default; ``n_trials`` trials) or ``grid`` (Optuna's GridSampler:
every combination of the categorical parameters once, ``n_trials`` ignored; an interrupted grid resumes
with the points left, a grown grid runs only its new points):

    python app.py --multirun hydra/sweeper=optuna hydra.sweeper.sampler.kind=grid 'lr=choice(1e-4, 1e-3)'
"""

# (no `from __future__ import annotations`: Hydra's plugin scanner runs this module before it is in
# sys.modules, where dataclasses look up string annotations)
import logging
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Optional  # noqa: UP035 - OmegaConf reads these annotations

from hydra.core.config_store import ConfigStore
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import ChoiceSweep, IntervalSweep, Override, RangeSweep
from hydra.core.plugins import Plugins
from hydra.core.utils import JobStatus
from hydra.plugins.sweeper import Sweeper
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, OmegaConf

log = logging.getLogger(__name__)
EXIT_INTERRUPTED = 130  # what an interrupted job exits with (experiments.finetune): the driver resumes later
EXIT_USAGE = 2  # a problem the user fixes (experiments.finetune's code for it): the driver stops with its line


@dataclass
class SamplerConf:
    kind: str = "tpe"  # tpe | grid (GridSampler over the choice(...) parameters)
    seed: Optional[int] = None  # noqa: UP045  # tpe: trial n samples with seed + n; grid: the order of the points
    n_startup_trials: int = 10  # random trials before TPE models the results
    constant_liar: bool = True  # running trials of other workers count as bad: workers spread out


@dataclass
class OptunaSweeperConf:
    _target_: str = "hydra_plugins.sparsegrad_optuna_sweeper.sweeper.OptunaSweeper"
    direction: str = "minimize"
    study_name: Optional[str] = None  # noqa: UP045
    storage: Optional[str] = None  # noqa: UP045 - SQLAlchemy URL, journal file (its plain path: /shared/fs/study.log), or null (in memory)
    n_trials: int = 20  # for the study in total, over every worker
    n_jobs: int = 1  # trials launched at once by this worker
    sampler: SamplerConf = field(default_factory=SamplerConf)
    heartbeat_interval: float = 10.0  # seconds between heartbeats of a running trial
    grace_period: float = 30.0  # a running trial without a heartbeat this long is failed and retried
    poll_interval: float = 2.0  # seconds between looks while other workers finish
    params: Dict[str, str] = field(default_factory=dict)  # noqa: UP006


ConfigStore.instance().store(group="hydra/sweeper", name="optuna", node=OptunaSweeperConf,
                             provider="sparsegrad_optuna_sweeper")


def distribution(override: Override):
    """The Optuna distribution of one sweep override."""
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    value = override.value()
    if isinstance(value, ChoiceSweep):
        return CategoricalDistribution(list(value.list))
    if isinstance(value, RangeSweep):
        return CategoricalDistribution(list(override.sweep_iterator()))
    if isinstance(value, IntervalSweep):
        log_scale = "log" in value.tags
        if "int" in value.tags:
            return IntDistribution(int(value.start), int(value.end), log=log_scale)
        return FloatDistribution(float(value.start), float(value.end), log=log_scale)
    raise ValueError(f"{override.input_line}: not a sweep (use choice(...), range(...) or interval(...))")


def suggest(trial, name: str, dist) -> Any:
    """Sample one parameter through Optuna's public suggest API (a retried trial keeps its setting)."""
    from optuna.distributions import CategoricalDistribution, IntDistribution

    if isinstance(dist, CategoricalDistribution):
        return trial.suggest_categorical(name, dist.choices)
    if isinstance(dist, IntDistribution):
        return trial.suggest_int(name, dist.low, dist.high, log=dist.log)
    return trial.suggest_float(name, dist.low, dist.high, log=dist.log)


def _is_interrupt(exc: BaseException) -> bool:
    """Ctrl-C or SIGTERM here, or in a job that stopped with the interrupted exit status."""
    return isinstance(exc, KeyboardInterrupt) or (isinstance(exc, SystemExit) and exc.code == EXIT_INTERRUPTED)


def _fmt(value: Any) -> str:
    return repr(value) if isinstance(value, float) else str(value)


class OptunaSweeper(Sweeper):
    def __init__(self, **conf: Any) -> None:
        self.conf = OmegaConf.merge(OmegaConf.structured(OptunaSweeperConf), conf)
        self.config: DictConfig | None = None
        self.launcher = None
        self.hydra_context: HydraContext | None = None

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        self.config, self.hydra_context = config, hydra_context
        self.launcher = Plugins.instance().instantiate_launcher(
            hydra_context=hydra_context, task_function=task_function, config=config)

    def _space(self, arguments: list[str]) -> tuple[dict[str, Any], list[str]]:
        parser = OverridesParser.create()
        space: dict[str, Any] = {}
        for key, spec in self.conf.params.items():
            space[key] = distribution(parser.parse_override(f"{key}={spec}"))
        fixed = []
        for override in parser.parse_overrides(arguments):
            if override.is_sweep_override():
                space[override.get_key_element()] = distribution(override)
            else:
                fixed.append(override.input_line)
        return space, fixed

    def _sampler(self, frozen, space: dict[str, Any]):
        """The sampler of one claimed trial and the distributions it suggests: a grid ticket's own GridSampler
        (its grid and seed are in the ticket), else TPE seeded with seed + trial number."""
        import optuna

        from sparsegrad.suite.sweep import studies

        if "grid_id" in frozen.system_attrs:
            grid = frozen.system_attrs["search_space"]
            sampler = studies.grid_sampler(grid, frozen.system_attrs.get(studies.GRID_SEED_ATTR))
            return sampler, studies.grid_distributions(grid)
        s = self.conf.sampler
        return optuna.samplers.TPESampler(seed=None if s.seed is None else int(s.seed) + frozen.number,
                                          n_startup_trials=s.n_startup_trials, constant_liar=s.constant_liar), space

    def _grid(self, space: dict[str, Any]) -> dict[str, list] | None:
        """{parameter: values} of a grid sweep (None for TPE); every parameter must be a choice(...)."""
        from optuna.distributions import CategoricalDistribution

        from sparsegrad.suite.sweep import studies

        kind = str(self.conf.sampler.kind)
        if kind not in ("tpe", "grid"):
            raise studies.StudyError(f"hydra.sweeper.sampler.kind={kind!r}: choose tpe or grid")
        if kind == "tpe":
            return None
        ranges = sorted(k for k, d in space.items() if not isinstance(d, CategoricalDistribution))
        if ranges:
            raise studies.StudyError(f"a grid sweep needs choice(...) values; {', '.join(ranges)} is a range: "
                                     f"write e.g. {ranges[0]}='choice(1e-4, 3e-4, 1e-3)'")
        return {k: list(d.choices) for k, d in space.items()}

    def sweep(self, arguments: list[str]) -> list:
        import optuna

        from sparsegrad.suite import interrupts
        from sparsegrad.suite.sweep import studies

        interrupts.install()  # SIGTERM (timeout, SLURM, preemption) gives the trials back as Ctrl-C does
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        c = self.conf
        space, fixed = self._space(list(arguments))
        name = c.study_name or "optuna"
        try:
            grid = self._grid(space)
            storage = studies.open_storage(c.storage)
            if grid is not None:
                study = studies.prepare_grid(storage, name, c.direction, grid, c.sampler.seed)
            else:
                study = studies.prepare(storage, name, c.direction, int(c.n_trials))
        except studies.StudyError as exc:  # one line (an old database, a missing driver, a bad grid), no traceback
            print(f"error: {exc}", file=sys.stderr, flush=True)
            raise SystemExit(EXIT_USAGE) from None
        except KeyboardInterrupt as exc:  # the missing tickets are queued by the next worker that looks
            raise SystemExit(EXIT_INTERRUPTED) from exc
        budget = f"a grid of {math.prod(len(v) for v in grid.values())} points" if grid else f"{c.n_trials} trials"
        log.info(f"Optuna study {name!r} ({c.storage or 'in memory'}): {budget} in total, "
                 f"{c.n_jobs} at a time here; search space {space}")
        returns: list = []
        job_idx = 0
        refill = studies.Refill(c.grace_period)

        def settle_stale() -> None:
            for number in studies.fail_stale(study, c.grace_period):
                log.warning(f"trial {number}: no heartbeat for {c.grace_period:.0f} s (its worker died): "
                            f"marked FAIL, its setting queued again once")

        with studies.Heartbeat(storage, c.heartbeat_interval, on_beat=settle_stale) as heartbeat:
            while True:
                trial_ids: list[int] = []
                try:  # from the claim on: trials this worker holds are never left RUNNING by an interrupt
                    settle_stale()
                    studies.claim(study, int(c.n_jobs), into=trial_ids)
                    if trial_ids:
                        returns.append(self._run_batch(study, trial_ids, space, fixed, heartbeat, job_idx))
                    elif self._done_or_refilled(study, refill, c):
                        break
                    else:
                        time.sleep(c.poll_interval)
                except BaseException as exc:  # Ctrl-C, SIGTERM, a job's sys.exit, a launcher failure
                    given_back = self._abandon(study, trial_ids, exc, heartbeat)
                    if _is_interrupt(exc):
                        log.warning(f"interrupted by {interrupts.cause()}: "
                                    + (f"trial(s) {', '.join(map(str, given_back))} given back to study {name!r} "
                                       "(failed, their setting queued again in the same budget slot)"
                                       if given_back else f"no trial of study {name!r} was running here")
                                    + "; run the same command to resume")
                        raise SystemExit(EXIT_INTERRUPTED) from exc
                    if isinstance(exc, studies.StudyError):  # one line with the repair command, no traceback
                        print(f"error: {exc}", file=sys.stderr, flush=True)
                        raise SystemExit(EXIT_USAGE) from None
                    raise
                job_idx += len(trial_ids)
        self._write_results(study)
        return returns

    @staticmethod
    def _done_or_refilled(study, refill, c) -> bool:
        """True when the study's budget is spent; otherwise queue slots that stay missing (their creator
        died) and say so. A slot that cannot be queued stops the worker with the command that repairs it."""
        from sparsegrad.suite.sweep import studies

        state = studies.progress(study)
        if state["waiting"] == 0 and state["running"] == 0 and state["slots"] >= state["budget"]:
            return True
        try:
            queued = refill(study)
        except Exception as exc:  # noqa: BLE001 - the storage refused: say what to run, do not wait forever
            raise studies.StudyError(
                f"study {study.study_name!r}: budget slots {studies.missing_slots(study)} have no trial and "
                f"could not be queued ({type(exc).__name__}: {exc}); repair it with: "
                f"{studies.repair_command(c.storage, study.study_name)}") from None
        if queued:
            log.warning(f"study {study.study_name!r}: budget slots {queued} of {state['budget']} had no trial "
                        f"for {c.grace_period:.0f} s (the worker that queued the budget died): queued them")
        return False

    def _run_batch(self, study, trial_ids, space, fixed, heartbeat, job_idx):
        import optuna


        trials, batch = [], []
        for trial_id in trial_ids:
            heartbeat.add(trial_id)
            frozen = study._storage.get_trial(trial_id)
            number = frozen.number
            sampler, trial_space = self._sampler(frozen, space)
            view = optuna.load_study(study_name=study.study_name, storage=study._storage, sampler=sampler)
            trial = optuna.Trial(view, trial_id)
            params = {key: suggest(trial, key, dist) for key, dist in trial_space.items()}
            trials.append(trial)
            batch.append([*fixed, *(f"{k}={_fmt(v)}" for k, v in params.items())])
            log.info(f"trial {number}: {' '.join(batch[-1][len(fixed):])}")
        self.validate_batch_is_legal(batch)
        results = self.launcher.launch(batch, initial_job_idx=job_idx)
        for trial, ret in zip(trials, results):
            heartbeat.remove(trial._trial_id)
            value, reason = None, None
            if ret.status == JobStatus.COMPLETED:
                try:
                    value = float(ret.return_value)
                except (TypeError, ValueError):
                    reason = f"objective {ret.return_value!r} is not a number"
                if value is not None and not math.isfinite(value):
                    value, reason = None, f"objective {ret.return_value!r} (a diverged run)"
            else:
                reason = f"{type(ret._return_value).__name__}: {ret._return_value}"[:500]
            if value is None:
                try:  # a trial failed meanwhile (no heartbeat) takes no attribute; its failure is told anyway
                    study._storage.set_trial_user_attr(trial._trial_id, "fail_reason", reason)
                except optuna.exceptions.UpdateFinishedTrialError:
                    pass
                study.tell(trial, state=optuna.trial.TrialState.FAIL, skip_if_finished=True)
                log.warning(f"trial {trial.number} failed: {reason}")
                continue
            study.tell(trial, value, skip_if_finished=True)
            if study._storage.get_trial(trial._trial_id).state != optuna.trial.TrialState.COMPLETE:
                self._keep_duplicate(study, trial.number, value, ret)
        return results

    @staticmethod
    def _keep_duplicate(study, number: int, value: float, ret) -> None:
        """A result Optuna cannot take (the trial was failed for a missing heartbeat, and retried): kept
        in the study beside the job's own output, and named on screen."""
        from sparsegrad.suite.sweep import studies

        try:
            output_dir = str(ret.hydra_cfg.hydra.runtime.output_dir)
        except Exception:  # noqa: BLE001 - a launcher that returns no Hydra config
            output_dir = ret.working_dir
        if output_dir and (Path(output_dir) / "record.json").exists():
            output_dir = str(Path(output_dir) / "record.json")
        kept = studies.record_duplicate_run(study, number, value, output_dir)
        log.warning(f"WARNING: duplicate run: {studies.describe_duplicate_run(kept, study.study_name)}")

    @staticmethod
    def _abandon(study, trial_ids, exc, heartbeat) -> list[int]:
        """Trials this worker still holds get no result: FAIL, not counted (user attribute), their setting
        queued again in the same slot. Returns the numbers of the trials given back."""
        import optuna

        from sparsegrad.suite import interrupts
        from sparsegrad.suite.sweep import studies

        why = (f"interrupted by {interrupts.cause()}" if _is_interrupt(exc)
               else f"{type(exc).__name__}: {exc}"[:500] or "stopped")
        given_back = []
        for trial_id in trial_ids:
            heartbeat.remove(trial_id)
            try:
                if study._storage.get_trial(trial_id).state != optuna.trial.TrialState.RUNNING:
                    continue
                study._storage.set_trial_user_attr(trial_id, studies.INTERRUPTED_ATTR, why)
                number = study._storage.get_trial_number_from_id(trial_id)
                studies.requeue(study, study.tell(number, state=optuna.trial.TrialState.FAIL, skip_if_finished=True))
                given_back.append(number)
            except Exception as err:  # noqa: BLE001 - the heartbeat will give the trial back instead
                log.warning(f"trial id {trial_id}: could not be given back ({err}); retried after the grace period")
        return given_back

    def _write_results(self, study) -> None:
        from sparsegrad.suite.sweep import studies

        best = studies.best_trial(study)
        out = {"name": "optuna", "study": study.study_name,
               "best_params": dict(best.params) if best else None, "best_value": best.value if best else None}
        sweep_dir = Path(str(self.config.hydra.sweep.dir))
        sweep_dir.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(OmegaConf.create(out), sweep_dir / "optimization_results.yaml")
        log.info(f"best: {out['best_params']} -> {out['best_value']}")
