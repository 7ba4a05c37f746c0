"""Fine-tune one model with one method on one task and write one run record.

    python -m experiments.finetune                                   # minilm x sparsegrad x movie_sentiment
    python -m experiments.finetune model=bert_base method=lora task=cola
    python -m experiments.finetune model=tiny_bert task=sst2 task.data_files='{train: tr.csv, validation: dev.csv}'
    python -m experiments.finetune model=smollm2 method=sparsegrad task=chat trainer.max_steps=50
    python -m experiments.finetune --multirun seed=1,2,3 method=full,lora,sparsegrad

Config groups (conf/): model, method, task, trainer, logger, paths. The run folder (Hydra's run
dir) holds record.json (the run record), config.yaml (the resolved config), Hydra's .hydra/ and,
with logger=wandb (the default, offline), wandb/. Returns the main metric for sweeps.
"""

from __future__ import annotations

import math
import re
import sys
from pathlib import Path

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"
CHOICE_GROUPS = ("model", "method", "task", "trainer", "logger", "paths")
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


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


def run_from_config(cfg, output_dir: str | Path) -> dict:
    """Run one job from a composed config (an OmegaConf DictConfig or a plain dict); return its record."""
    from omegaconf import DictConfig, OmegaConf

    from sparsegrad.suite.runner import finetune, settings_from_config

    if isinstance(cfg, DictConfig):
        resolved = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
    else:
        resolved = dict(cfg)
    resolved.pop("hydra", None)
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    OmegaConf.save(OmegaConf.create(resolved), output_dir / "config.yaml")
    settings = settings_from_config(resolved, str(output_dir))
    return finetune(settings)


def _fail(message: str, code: int = EXIT_USAGE):
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(code)


def _hydra_main():
    import hydra

    @hydra.main(config_path=str(CONF_DIR), config_name="config", version_base="1.3")
    def main(cfg) -> float:
        from hydra.core.hydra_config import HydraConfig

        from sparsegrad.suite.assets import AssetMissingError
        from sparsegrad.suite.errors import SuiteError
        from sparsegrad.suite.runner import objective_value

        output_dir = HydraConfig.get().runtime.output_dir
        try:
            record = run_from_config(cfg, output_dir)
        except (SuiteError, AssetMissingError) as exc:
            _fail(str(exc))
        except KeyboardInterrupt:
            _fail(f"interrupted; the run record is in {output_dir}/record.json", EXIT_INTERRUPTED)
        if record["status"] == "interrupted":
            _fail(f"interrupted; the run record is in {output_dir}/record.json", EXIT_INTERRUPTED)
        value = objective_value(record)
        best = record.get("best") or {}
        print(
            f"[finetune] {record['status']}: {record['main_metric']['name']} = {best.get('score')} on "
            f"{record['main_metric']['report_split']} (selection {record['main_metric']['selection_split']}: "
            f"{record.get('objective')}); {record['wall_seconds']:.1f} s; record {output_dir}/record.json",
            file=sys.stderr,
        )
        return value if not math.isnan(value) else float("nan")

    return main


def cli(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    message = check_choices(argv)
    if message:
        _fail(message)
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
