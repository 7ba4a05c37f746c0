"""Experiment logging: Weights & Biases (offline by default) or nothing.

The mode is always passed explicitly to ``wandb.init`` (offline, online or disabled), so W&B never
prompts for a login and never blocks on the network; offline runs land in ``<run dir>/wandb`` and
``wandb sync <run dir>/wandb/offline-run-*`` uploads them later. ``wandb`` is imported only here
and only when a W&B logger is configured.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal


@dataclass
class LoggerSettings:
    name: Literal["wandb", "none"] = "none"
    mode: Literal["offline", "online", "disabled"] = "offline"
    project: str = "sparsegrad"
    entity: str | None = None
    group: str | None = None
    tags: list[str] = field(default_factory=list)
    run_name: str | None = None


class NullTracker:
    name = "none"

    def log(self, metrics: dict[str, Any], step: int) -> None:
        pass

    def summary(self, values: dict[str, Any]) -> None:
        pass

    def finish(self, exit_code: int = 0) -> None:
        pass

    def describe(self) -> dict | None:
        return None

    def upload_hint(self) -> str | None:
        return None


class WandbTracker:
    name = "wandb"

    def __init__(self, settings: LoggerSettings, run_dir: Path, config: dict, run_name: str):
        import os

        import wandb

        if settings.mode not in ("offline", "online", "disabled"):
            raise ValueError(f"logger.mode={settings.mode!r}; choose offline, online or disabled")
        self.mode = settings.mode
        self.dir = Path(run_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        os.environ.setdefault("WANDB_SILENT", "true")
        self.run = wandb.init(
            mode=settings.mode,
            dir=str(self.dir),
            project=settings.project,
            entity=settings.entity,
            group=settings.group,
            tags=list(settings.tags or []),
            name=settings.run_name or run_name,
            config=config,
            settings=wandb.Settings(silent=True, console="off", x_disable_stats=True),
        )

    def log(self, metrics: dict[str, Any], step: int) -> None:
        self.run.log(metrics, step=step)

    def summary(self, values: dict[str, Any]) -> None:
        for key, value in values.items():
            self.run.summary[key] = value

    def finish(self, exit_code: int = 0) -> None:
        self.run.finish(exit_code=exit_code)

    def describe(self) -> dict:
        return {"name": "wandb", "mode": self.mode, "dir": str(self.dir / "wandb"), "run_id": self.run.id}

    def upload_hint(self) -> str | None:
        """Where an offline run went and the command that uploads it (None for online or disabled runs)."""
        if self.mode != "offline":
            return None
        found = sorted((self.dir / "wandb").glob(f"offline-run-*-{self.run.id}"))
        where = found[-1] if found else self.dir / "wandb" / "offline-run-*"
        return f"W&B offline run saved in {where}; upload it with: wandb sync {where}"


def make_tracker(settings: LoggerSettings, run_dir: Path, config: dict, run_name: str):
    if settings.name in (None, "none") or settings.mode == "disabled":
        return NullTracker()
    if settings.name == "wandb":
        return WandbTracker(settings, run_dir, config, run_name)
    raise ValueError(f"logger.name={settings.name!r}; choose wandb or none")
