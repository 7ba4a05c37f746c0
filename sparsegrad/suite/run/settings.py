"""From a composed config to checked settings, before anything heavy loads.

Each config group (conf/model, method, task, trainer, logger) maps onto a settings dataclass whose
field annotations say what is valid: the type, the range (``annotated_types`` ``Ge``/``Gt``/
``Interval``) and the choices (``Literal``). pydantic checks a resolved config against them; the
checks that need a look at the disk follow (data files, a local model folder and its config.json,
which gives the MLP matrix size that ``method.k`` must not exceed). Every problem is one line that
names the key, the bad value and what is valid, with the closest valid key for a typo; all problems
of a config are reported together. Neither torch nor transformers is imported here, so a bad config
fails in well under a second.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import os
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

from annotated_types import Ge, Gt, Interval

from sparsegrad.suite.errors import ConfigError, SuiteError
from sparsegrad.suite.run.methods import MethodSettings
from sparsegrad.suite.run.models import ModelSettings
from sparsegrad.suite.run.tasks import TaskSettings
from sparsegrad.suite.run.tracking import LoggerSettings

Count = Annotated[int, Ge(1)]


@dataclass
class TrainerSettings:
    """What the Hydra ``trainer`` group may change (see conf/trainer/default.yaml)."""

    seed: Annotated[int, Interval(ge=0, le=2**32 - 1)] = 42  # what NumPy's (and so transformers') seeding accepts
    epochs: Annotated[float, Gt(0)] = 3.0
    max_steps: Count | None = None  # optimizer steps; stops before the epochs run out
    batch_size: Count = 16  # per micro-batch
    eval_batch_size: Count = 64
    grad_accum: Count = 1
    lr: Annotated[float, Gt(0)] = 5e-5
    weight_decay: Annotated[float, Ge(0)] = 0.0
    schedule: Literal["linear", "constant"] = "linear"  # after warm-up
    warmup_steps: Annotated[int, Ge(0)] = 0
    warmup_ratio: Annotated[float, Interval(ge=0, lt=1)] = 0.0  # used when warmup_steps is 0
    max_grad_norm: Annotated[float, Ge(0)] | None = 1.0
    precision: Literal["fp32", "bf16"] = "fp32"  # bf16: autocast
    eval_every: Count | None = 50  # optimizer steps; None: once per epoch
    evals_per_epoch: Count | None = None  # evaluations per epoch, whatever the batch size (replaces eval_every)
    patience: Count | None = 5  # evaluations without improvement; None: never stop early
    stop_metric: Literal["main", "loss"] = "main"  # what early stopping watches on the selection split
    stop_window: Count = 1  # early stopping watches the mean of the last stop_window evaluations
    min_epochs: Annotated[float, Ge(0)] = 0.0  # epochs of training before early stopping may stop the run
    checkpoint: Literal["best", "final"] = "best"  # the checkpoint a run keeps: best on the selection split, or the last
    protocol: Literal["heldout", "official"] = "heldout"  # official: select and report on dev
    heldout_fraction: Annotated[float, Interval(gt=0, lt=1)] = 0.1
    heldout_max: Count | None = 2000
    objective: Literal["selection", "report"] = "selection"  # what finetune returns (and sweeps optimise)
    # Diverged: a non-finite loss, or a step loss above this multiple of the first step's (None: non-finite only).
    divergence_factor: Annotated[float, Gt(1)] | None = 100.0
    timing_warmup_steps: Annotated[int, Ge(0)] = 3
    device: str = "auto"  # auto | cpu | mps | cuda | cuda:N
    threads: Count | None = None  # torch CPU threads (None: torch's default)
    progress: bool = True
    log_every: Count = 10


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


GROUPS: dict[str, type] = {"model": ModelSettings, "method": MethodSettings, "task": TaskSettings,
                           "trainer": TrainerSettings, "logger": LoggerSettings}
PATHS_KEYS = ("output_root", "data_cache")
TOP_LEVEL_KEYS = ("seed", "save_model", "paths", *GROUPS)
# Config groups without a settings class: selected on the command line, never read by the run.
OTHER_GROUPS = ("experiment", "hparams_search", "profile", "hydra")
DATA_SUFFIXES = (".csv", ".tsv", ".json", ".jsonl", ".parquet")
DEVICE_PATTERN = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")
K_KINDS = ("meprop", "sparsegrad", "leading_block", "shira")  # methods whose k is a per-matrix budget


# ---------------------------------------------------------------------------------------- wording


def closest(name: str, valid) -> str | None:
    """The valid name a typo most likely meant (``lr_rate`` -> ``lr``, ``bach_size`` -> ``batch_size``), or None."""
    valid = list(valid)
    found = difflib.get_close_matches(name, valid, n=1, cutoff=0.6)
    if found:
        return found[0]
    # A valid name with something added or cut off: the longest one that starts the other.
    prefixed = [v for v in valid if len(min(v, name, key=len)) >= 2 and (name.startswith(v) or v.startswith(name))]
    return max(prefixed, key=len) if prefixed else None


def _show(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    return str(value)


def _bound(meta) -> str:
    parts = []
    for attr, sign in (("gt", ">"), ("ge", ">="), ("lt", "<"), ("le", "<=")):
        bound = getattr(meta, attr, None)
        if bound is not None:
            parts.append(f"{sign} {bound}" if isinstance(bound, int) else f"{sign} {bound:g}")
    return " and ".join(parts)


def describe(annotation) -> str:
    """What a field annotation admits, in words: 'null or an integer >= 1', 'one of fp32, bf16'."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        named = [describe(a) for a in args if a is not type(None)]
        text = " or ".join(named)
        return f"null or {text}" if type(None) in args else text
    if origin is Annotated:
        base, *meta = args
        bounds = " and ".join(b for b in (_bound(m) for m in meta) if b)
        return f"{describe(base)} {bounds}".strip()
    if origin is Literal:
        return "one of " + ", ".join(_show(a) for a in args)
    if origin in (dict, list):
        return {dict: "a mapping", list: "a list"}[origin]
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string",
            dict: "a mapping", list: "a list"}.get(annotation, getattr(annotation, "__name__", str(annotation)))


def _unknown_key(key: str, name: str, valid, value: Any = None, shown: bool = False) -> str:
    """One line for a key no config has: the closest valid key, or every valid key when none is close."""
    guess = closest(name, valid)
    where = f"{key}={_show(value)}" if shown else key
    if guess:
        parent = key.rsplit(".", 1)[0] + "." if "." in key else ""
        return f"{where}: unknown key; did you mean {parent}{guess}?"
    return f"{where}: unknown key; valid keys: {', '.join(sorted(valid))}"


# ---------------------------------------------------------------------------------- field checks


def check_group(group: str, cls: type, values: dict) -> tuple[Any, list[str]]:
    """(the settings object or None, one line per problem) for one config group."""
    from pydantic import TypeAdapter, ValidationError

    names = [f.name for f in dataclasses.fields(cls)]
    problems = [_unknown_key(f"{group}.{k}", k, names, v, True) for k, v in values.items() if k not in names]
    known = {k: v for k, v in values.items() if k in names}
    hints = typing.get_type_hints(cls, include_extras=True)
    try:
        return TypeAdapter(cls).validate_python(known), problems
    except ValidationError as exc:
        seen = set()
        for error in exc.errors():
            name = str(error["loc"][0]) if error["loc"] else ""
            if name in seen:
                continue  # a union reports once per member: one line per key is enough
            seen.add(name)
            if error["type"] == "missing":
                problems.append(f"{group}.{name}: missing; it must be {describe(hints[name])}")
            elif name in hints:
                problems.append(f"{group}.{name}={_show(known.get(name))}: must be {describe(hints[name])}")
            else:
                problems.append(f"{group}: {error['msg']}")
    except SuiteError as exc:  # a check of the class itself (e.g. an unknown method kind)
        problems.append(str(exc))
    return None, problems


def check_override_keys(argv: list[str]) -> list[str]:
    """Command-line overrides whose key no config group has (typos), each with the closest valid key."""
    problems = []
    pattern = re.compile(r"^[+~]{0,2}([A-Za-z_][\w.]*)=(.*)$")
    for arg in argv:
        match = pattern.match(arg)
        if not match:
            continue
        parts, value = match.group(1).split("."), match.group(2)
        top = parts[0]
        if top in OTHER_GROUPS:
            continue
        if top not in TOP_LEVEL_KEYS:
            if arg.startswith("+"):
                continue  # a new top-level node, added on purpose (e.g. the reproduction's bookkeeping)
            problems.append(_unknown_key(top, top, (*TOP_LEVEL_KEYS, *OTHER_GROUPS[:-1]), arg.split("=", 1)[1]
                                         if len(parts) == 1 else None, len(parts) == 1))
            continue
        if len(parts) < 2:
            continue
        valid = PATHS_KEYS if top == "paths" else ([f.name for f in dataclasses.fields(GROUPS[top])]
                                                    if top in GROUPS else ())
        if valid and parts[1] not in valid:
            problems.append(_unknown_key(f"{top}.{parts[1]}", parts[1], valid, value, len(parts) == 2))
    return problems


# ----------------------------------------------------------------------------------- disk checks


def check_k(method: MethodSettings, model: ModelSettings) -> list[str]:
    """k is a count >= 1 or a fraction in (0, 1], and a count does not exceed a matrix (unless dense is meant)."""
    if method.kind not in K_KINDS or (method.kind == "meprop" and method.mode == "output"):
        return []
    k = method.k
    valid = "a count >= 1 (entries per MLP matrix) or a fraction in (0, 1] (e.g. 0.05)"
    if k is None or isinstance(k, bool):
        return [f"method.k={_show(k)}: must be {valid}"]
    if isinstance(k, float) and not 0 < k <= 1:
        extra = f"; write method.k={int(k)} for a count" if k > 1 and k == int(k) else ""
        return [f"method.k={_show(k)}: must be {valid}{extra}"]
    if isinstance(k, int) and k < 1:
        return [f"method.k={k}: must be {valid}"]
    shape = mlp_matrix_shape(model)
    if isinstance(k, int) and shape is not None and k > shape[0] * shape[1] and not method.allow_dense:
        size = shape[0] * shape[1]
        return [f"method.k={k}: above the {size} entries of each MLP matrix of {model.name} "
                f"({shape[0]} x {shape[1]}), i.e. dense training; use method.k <= {size} or a fraction, "
                "or method.allow_dense=true if dense is meant"]
    return []


def mlp_matrix_shape(model: ModelSettings) -> tuple[int, int] | None:
    """(hidden, intermediate) from the model's config without loading weights; None when unknown."""
    config: dict = {}
    if model.random_init:
        config = dict(model.random_init)
    elif model.pretrained:
        folder = _local_folder(model.pretrained)
        if folder is None or not (folder / "config.json").is_file():
            return None
        try:
            config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
    config.update(model.config_overrides or {})
    hidden = config.get("hidden_size", config.get("n_embd"))
    inner = config.get("intermediate_size", config.get("n_inner"))
    if isinstance(hidden, int) and isinstance(inner, int):
        return hidden, inner
    return None


def _local_folder(location: str) -> Path | None:
    if location.startswith("asset:"):
        from sparsegrad.suite.run import assets

        name = location.split(":", 1)[1]
        return assets.cache_root() / assets.ASSETS[name].target if name in assets.ASSETS else None
    path = Path(os.path.expanduser(location))
    return path if path.exists() or looks_like_path(location) else None


def looks_like_path(location: str) -> bool:
    """A local path rather than a Hub id (``org/name``): absolute, relative with ./ or ../, or ~."""
    return location.startswith(("/", "./", "../", "~", "\\")) or bool(re.match(r"^[A-Za-z]:[\\/]", location))


def check_pretrained(model: ModelSettings) -> list[str]:
    """A local model folder exists and holds config.json; an asset is in the cache."""
    problems = []
    for key in ("pretrained", "tokenizer"):
        location = getattr(model, key)
        if not location or model.random_init or (key == "tokenizer" and location == "train"):
            continue
        if location.startswith("asset:"):
            from sparsegrad.suite.run import assets

            name = location.split(":", 1)[1]
            if name not in assets.ASSETS:
                problems.append(f"model.{key}={location}: unknown asset; valid: "
                                + ", ".join(f"asset:{n}" for n in assets.ASSETS))
            elif not assets.is_ready(name):
                try:
                    assets.asset_path(name)
                except FileNotFoundError as exc:
                    problems.append(f"model.{key}={location}: {exc}")
            continue
        path = Path(os.path.expanduser(location))
        if not path.exists():
            if looks_like_path(location):
                problems.append(f"model.{key}={location}: the folder does not exist; give a local model folder "
                                "(with config.json), a Hub id such as bert-base-uncased, or asset:minilm")
        elif not path.is_dir():
            problems.append(f"model.{key}={location}: is a file; give the model's folder (with config.json)")
        elif key == "pretrained" and not (path / "config.json").is_file():
            problems.append(f"model.{key}={location}: the folder has no config.json, so it is not a saved "
                            "Hugging Face model")
    if not model.random_init and not model.pretrained:
        problems.append("model.pretrained=null: set a Hub id, a local folder or asset:<name> (or model.random_init)")
    return problems


def check_data_files(data_files, spec=None) -> list[str]:
    """Each task.data_files entry is a readable, non-empty file of a supported type, with the columns the
    task ``spec`` (a :class:`sparsegrad.suite.run.tasks.TaskSpec`) needs; one format for all."""
    if not data_files:
        return []
    problems, suffixes = [], set()
    for split, paths in dict(data_files).items():
        for raw in paths if isinstance(paths, (list, tuple)) else [paths]:
            key, path = f"task.data_files.{split}={raw}", Path(os.path.expanduser(str(raw)))
            if not path.exists():
                problems.append(f"{key}: no such file")
            elif path.is_dir():
                problems.append(f"{key}: is a directory; give one file per split ({', '.join(DATA_SUFFIXES)})")
            elif path.suffix.lower() not in DATA_SUFFIXES:
                problems.append(f"{key}: unsupported file type {path.suffix or '(none)'!r}; use {', '.join(DATA_SUFFIXES)}")
            else:
                suffixes.add(path.suffix.lower().replace(".tsv", ".csv").replace(".jsonl", ".json"))
                problem = _empty_file(path) or (_wrong_columns(path, spec) if spec is not None else None)
                if problem:
                    problems.append(f"{key}: {problem}")
    if len(suffixes) > 1:
        problems.append(f"task.data_files: use one file format for all splits, got {', '.join(sorted(suffixes))}")
    return problems


def _empty_file(path: Path) -> str | None:
    """Why a data file has no rows (empty, only a header, an empty JSON list), or None."""
    if path.stat().st_size == 0:
        return "the file is empty (0 bytes)"
    if path.suffix.lower() == ".parquet":
        return None
    try:
        with open(path, encoding="utf-8", errors="replace") as fh:
            head = [line for line in (fh.readline() for _ in range(64)) if line.strip()][:2]
    except OSError as exc:
        return f"cannot be read ({exc.strerror or exc})"
    if not head:
        return "the file holds only blank lines"
    if path.suffix.lower() in (".csv", ".tsv") and len(head) == 1:
        return "the file has a header line but no rows"
    if path.suffix.lower() in (".json", ".jsonl") and head[0].strip() in ("[]", "{}"):
        return "the file holds no records"
    return None


def file_columns(path: Path) -> list[str] | None:
    """The column names of a data file from its first line or record (parquet: its schema); None when the
    file does not say cheaply (a JSON array, a line that is not a JSON object)."""
    suffix = path.suffix.lower()
    try:
        if suffix == ".parquet":
            import pyarrow.parquet  # datasets' own reader; light next to torch

            return list(pyarrow.parquet.read_schema(path).names)
        with open(path, encoding="utf-8-sig", errors="replace", newline="") as fh:  # -sig: a BOM is no column name
            if suffix in (".csv", ".tsv"):
                import csv

                return next(csv.reader(fh, delimiter="\t" if suffix == ".tsv" else ","), None)
            first = next((line for line in fh if line.strip()), "")
    except (OSError, ValueError, ImportError):
        return None
    try:
        row = json.loads(first)
    except ValueError:
        return None
    return list(row) if isinstance(row, dict) else None


def _wrong_columns(path: Path, spec) -> str | None:
    from sparsegrad.suite.run.tasks import missing_columns

    found = file_columns(path)
    return None if found is None else missing_columns(spec, found)


def check_device(device: str) -> list[str]:
    """A GPU device that this torch build or this machine cannot have; read without importing torch (the
    device's presence is checked where torch is loaded: sparsegrad.suite.run.trainer.resolve_device)."""
    import importlib.util
    import sys

    if device.startswith("mps") and sys.platform != "darwin":
        return [f"trainer.device={device}: Apple's MPS exists on macOS only; use trainer.device=auto or cpu"]
    if not device.startswith("cuda"):
        return []
    spec = importlib.util.find_spec("torch")
    version = Path(spec.submodule_search_locations[0]) / "version.py" if spec and spec.submodule_search_locations else None
    try:
        text = version.read_text(encoding="utf-8") if version else ""
    except OSError:
        return []
    built = dict(re.findall(r"^(__version__|cuda|hip)\s*(?::[^=]*)?=\s*'?([^'\n]*)'?\s*$", text, re.M))
    if built and built.get("cuda", "None") == "None" and built.get("hip", "None") == "None":
        return [f"trainer.device={device}: this torch ({built.get('__version__', '?')}) is built for the CPU only, "
                "without CUDA; use trainer.device=auto (the CPU here) or cpu, or install a CUDA build of torch"]
    return []


def check_settings(settings: FinetuneSettings) -> list[str]:
    """The checks across fields and on disk, for settings that passed the field checks."""
    return _cross_checks(settings.model, settings.method, settings.task, settings.trainer)


def _cross_checks(model, method, task, trainer) -> list[str]:
    """Each check whose groups were built (None: that group had field problems, already reported)."""
    from sparsegrad.suite.run import tasks

    problems = []
    if task is not None:
        try:
            tasks.main_metric(tasks.get_task(task.name), task)
        except SuiteError as exc:
            problems.append(str(exc))
        spec = tasks.TASKS.get(task.name)
        problems += check_data_files(task.data_files, spec)
    if trainer is not None and not DEVICE_PATTERN.match(trainer.device):
        problems.append(f"trainer.device={trainer.device}: must be one of auto, cpu, mps, cuda, cuda:N")
    elif trainer is not None:
        problems += check_device(trainer.device)
    if model is not None:
        problems += check_pretrained(model)
    if method is not None and model is not None:
        problems += check_k(method, model)
    return problems


# ---------------------------------------------------------------------------------------- entry


def settings_from_config(cfg: dict, output_dir: str, check_files: bool = True) -> FinetuneSettings:
    """Checked settings from a resolved config dict (the shape of conf/config.yaml).

    Raises :class:`ConfigError` listing every problem, one line each. ``check_files=False`` checks the
    fields only, without a look at the disk (data files, model folders, assets): for configs meant for
    another machine.
    """
    problems = [f"the config has no {g!r} group" for g in ("model", "method", "task", "trainer")
                if not isinstance(cfg.get(g), dict)]
    if problems:
        raise ConfigError("\n".join(problems))
    trainer = dict(cfg["trainer"])
    if cfg.get("seed") is not None:
        trainer["seed"] = cfg["seed"]
    values = {"model": cfg["model"], "method": cfg["method"], "task": cfg["task"], "trainer": trainer,
              "logger": dict(cfg.get("logger") or {"name": "none"})}
    built = {}
    for group, cls in GROUPS.items():
        built[group], found = check_group(group, cls, dict(values[group]))
        problems += found
    if cfg.get("seed") is not None:  # the run's seed is the top-level key (trainer.seed follows it)
        problems = [f"seed={line.removeprefix('trainer.seed=')}" if line.startswith("trainer.seed=") else line
                    for line in problems]
    if check_files:
        problems += _cross_checks(built["model"], built["method"], built["task"], built["trainer"])
    if problems:
        raise ConfigError("\n".join(problems))
    paths = cfg.get("paths") or {}
    return FinetuneSettings(**built, output_dir=str(output_dir), save_model=bool(cfg.get("save_model", False)),
                            data_cache=paths.get("data_cache"), resolved_config=cfg)
