"""Fine-tune one model with one method on one task and write one run record.

    python -m experiments.finetune                                   # minilm x sparsegrad x movie_sentiment
    python -m experiments.finetune model=bert_base method=lora task=cola
    python -m experiments.finetune model=tiny_bert task=sst2 task.data_files='{train: tr.csv, validation: dev.csv}'
    python -m experiments.finetune model=smollm2 method=sparsegrad task=chat trainer.max_steps=50
    python -m experiments.finetune --multirun seed=1,2,3 method=full,lora,sparsegrad

Config groups (conf/): model, method, task, trainer, logger, paths. The run folder (Hydra's run
dir) holds record.json (the run record), config.yaml (the resolved config), Hydra's .hydra/ and,
with logger=wandb (the default, offline), wandb/. Returns the main metric for sweeps (nan for a run
that diverged or has no objective).

The config is checked before anything heavy loads: unknown keys (with the closest valid one),
types, ranges and choices, data files and model folders, one line per problem, exit 2. Exit codes:
0 done, 2 a problem with the request or the environment, 3 a single run diverged, 130 interrupted
(Ctrl-C or SIGTERM: ``timeout``, SLURM's time limit or ``--signal``, preemption; the record says
``interrupted`` and a sweep gives its running trial back to the study).
"""

from __future__ import annotations

import math
import os
import re
import sys
from pathlib import Path

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"
CHOICE_GROUPS = ("model", "method", "task", "trainer", "logger", "paths")
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130
EXIT_DIVERGED = 3  # a single run that diverged (in a --multirun sweep its job returns nan instead)


def options(group: str) -> list[str]:
    """The valid names of a config group (its yaml files)."""
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))


def check_choices(argv: list[str]) -> str | None:
    """A one-paragraph message for the first unknown group option in ``argv``, or None."""
    pattern = re.compile(r"^[+~]?(" + "|".join(CHOICE_GROUPS) + r")=(.*)$")
    for arg in argv:
        match = pattern.match(arg)
        if not match:
            continue
        group, value = match.groups()
        if any(c in value for c in "()[]{}$*"):  # a sweep expression: let Hydra parse it
            continue
        valid = options(group)
        for name in (v.strip() for v in value.split(",")):
            if name and name not in valid:
                return (
                    f"Unknown {group} {name!r}. Valid {group} options: {', '.join(valid)}. "
                    f"Example: python -m experiments.finetune model=minilm method=sparsegrad task=movie_sentiment"
                )
    return None


OUTPUT_KEYS = ("hydra.run.dir", "hydra.sweep.dir", "paths.output_root")


def check_output_location(argv: list[str]) -> list[str]:
    """One line per run-folder location (from the command line, or the default output root) that cannot
    be written: Hydra itself writes there before the run starts."""
    values = {key: arg.split("=", 1)[1] for arg in argv for key in OUTPUT_KEYS if arg.startswith(key + "=")}
    if not values:
        values["paths.output_root"] = os.environ.get("SPARSEGRAD_OUTPUTS") or "outputs"
    problems = []
    for key, value in values.items():
        path = Path(os.path.expanduser(value.split("${", 1)[0] or "."))
        while not path.exists() and path != path.parent:
            path = path.parent
        if not path.is_dir():
            problems.append(f"{key}={value}: {path} is a file, not a folder; choose a writable folder with "
                            "paths.output_root=/some/folder")
        else:
            reason = _cannot_write_in(path)
            if reason:
                problems.append(f"{key}={value}: cannot write in {path} ({reason}); choose a writable folder with "
                                "paths.output_root=/some/folder")
    return problems


def _cannot_write_in(folder: Path) -> str | None:
    """Why nothing can be created in ``folder`` (tried with an empty temporary folder), or None."""
    import shutil
    import tempfile

    try:
        shutil.rmtree(tempfile.mkdtemp(prefix=".write-check-", dir=folder))
    except OSError as exc:
        return exc.strerror or str(exc)
    return None


def run_from_config(cfg, output_dir: str | Path) -> dict:
    """Run one job from a composed config (an OmegaConf DictConfig or a plain dict); return its record.

    The config is checked first (every problem at once, as a ConfigError) before anything heavy loads.
    """
    from sparsegrad.suite.errors import SuiteError
    from sparsegrad.suite.run.runner import finetune, settings_from_config

    resolved = resolve(cfg)
    settings = settings_from_config(resolved, str(output_dir))
    output_dir = Path(output_dir)
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
        (output_dir / "config.yaml").write_text(_yaml(resolved), encoding="utf-8")
    except OSError as exc:
        raise SuiteError(f"cannot write to the run folder {output_dir}: {exc.strerror or exc}; choose a writable "
                         "place with paths.output_root=/some/folder (or hydra.run.dir=...)") from None
    return finetune(settings)


def resolve(cfg) -> dict:
    """A plain dict of the config, interpolations resolved, without Hydra's own node."""
    from omegaconf import DictConfig, OmegaConf

    if isinstance(cfg, DictConfig):
        resolved = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
    else:
        resolved = dict(cfg)
    resolved.pop("hydra", None)
    return resolved


def _yaml(resolved: dict) -> str:
    from omegaconf import OmegaConf

    return OmegaConf.to_yaml(OmegaConf.create(resolved))


def _fail(message: str, code: int = EXIT_USAGE):
    for line in str(message).splitlines() or [""]:
        print(f"error: {line}", file=sys.stderr)
    raise SystemExit(code)


def _hydra_main():
    import hydra

    @hydra.main(config_path=str(CONF_DIR), config_name="config", version_base="1.3")
    def main(cfg) -> float:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        from sparsegrad.suite import interrupts
        from sparsegrad.suite.errors import SuiteError
        from sparsegrad.suite.run.assets import AssetMissingError
        from sparsegrad.suite.run.runner import objective_value, summary_line

        if "SUBMITIT_FOLDER" not in os.environ:  # submitit's job handles SIGTERM and its pre-timeout signal itself
            interrupts.install()  # also in a process of the joblib launcher's own
        hydra_cfg = HydraConfig.get()
        output_dir = hydra_cfg.runtime.output_dir

        def interrupted():
            where = Path(output_dir) / "record.json"
            _fail(f"interrupted by {interrupts.cause()}; " + (f"the run record (status interrupted) is in {where}"
                  if where.exists() else "it stopped before the run started (no run record)"), EXIT_INTERRUPTED)

        try:
            record = run_from_config(cfg, output_dir)
        except (SuiteError, AssetMissingError) as exc:  # incl. RecordWriteError (its summary is on screen already)
            _fail(str(exc))
        except KeyboardInterrupt:
            interrupted()
        if record["status"] == "interrupted":
            interrupted()
        print(summary_line(record, f"{output_dir}/record.json"), file=sys.stderr)
        if record["status"] == "diverged" and hydra_cfg.mode != RunMode.MULTIRUN:
            raise SystemExit(EXIT_DIVERGED)  # a sweep goes on: its job returns nan, which the sweep records as failed
        value = objective_value(record)
        return value if not math.isnan(value) else float("nan")

    return main


def cli(argv: list[str] | None = None) -> None:
    from sparsegrad.suite import interrupts

    interrupts.install()  # SIGTERM as Ctrl-C: a record that says interrupted, trials given back
    argv = sys.argv[1:] if argv is None else argv
    message = check_choices(argv)
    if message:
        _fail(message)
    from sparsegrad.suite.run.settings import check_override_keys

    problems = check_override_keys(argv) + check_output_location(argv)
    if problems:
        _fail("\n".join(problems))
    main = _hydra_main()
    try:
        main()
    except Exception as exc:  # Hydra composition errors (bad override keys, missing values)
        from hydra.errors import HydraException
        from omegaconf.errors import OmegaConfBaseException

        if isinstance(exc, (HydraException, OmegaConfBaseException)):
            _fail(f"{type(exc).__name__}: {exc}")
        raise


if __name__ == "__main__":
    cli()
