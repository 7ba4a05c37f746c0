"""Tasks: what each one is (schema, metrics, splits) and how its raw examples are loaded.

A task yields plain Python examples, one dict each:

* classification / regression: ``{"texts": (first, second_or_None), "label": int | float}``
* causal language modelling:   ``{"messages": [{"role": "user"|"assistant", "content": str}, ...]}``

Sources: the nine GLUE tasks and OpenAssistant-1 from the Hub or from local files per split
(``data_files``), and three offline tasks built from the asset cache (``make assets``).
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

from annotated_types import Ge

from sparsegrad.suite.errors import ConfigError, DataError, HubUnreachableError, hub_dataset_message

CLASSIFICATION, REGRESSION, CAUSAL_LM = "classification", "regression", "causal_lm"
OASST1_COLUMNS = ("message_id", "parent_id", "role", "text")
LOWER_IS_BETTER = {"loss", "perplexity"}


@dataclass(frozen=True)
class TaskSpec:
    """The fixed facts about a task; the Hydra task config only adds sizes and data locations."""

    name: str
    kind: str  # classification | regression | causal_lm
    source: str  # glue | oasst1 | movie_reviews | chatterbot
    metrics: tuple[str, ...]  # computed on every evaluation (plus "loss")
    main_metric: str
    text_fields: tuple[str, ...] = ()
    num_labels: int = 0  # 1 for regression, 0 for language modelling
    dev_splits: tuple[str, ...] = ("validation",)  # labelled splits reported (GLUE dev)
    test_split: str | None = None  # a labelled test split, when the task has one
    hub_config: str | None = None  # GLUE subset name
    train_examples: int | None = None  # the published training split's size (plans GPU time before a run)
    dev_examples: int | None = None  # the main dev split's size (the one evaluated during training)

    @property
    def higher_is_better(self) -> bool:
        return self.main_metric not in LOWER_IS_BETTER

    @property
    def main_split(self) -> str:
        return self.dev_splits[0]

    @property
    def columns(self) -> tuple[str, ...]:
        """The columns each file of the task's data (``task.data_files``) must have; () for built-in data."""
        return {"glue": (*self.text_fields, "label"), "oasst1": OASST1_COLUMNS}.get(self.source, ())


def _glue(name, fields, metrics, main, num_labels=2, dev=("validation",)):
    kind = REGRESSION if num_labels == 1 else CLASSIFICATION
    train, dev_main = GLUE_SIZES[name]
    return TaskSpec(name, kind, "glue", metrics, main, fields, num_labels, dev, None, name, train, dev_main)


# (train, main dev split) examples of each GLUE task as published (nyu-mll/glue; MNLI: validation_matched)
GLUE_SIZES = {"cola": (8551, 1043), "sst2": (67349, 872), "mrpc": (3668, 408), "stsb": (5749, 1500),
              "qqp": (363846, 40430), "mnli": (392702, 9815), "qnli": (104743, 5463), "rte": (2490, 277),
              "wnli": (635, 71)}


TASKS: dict[str, TaskSpec] = {
    t.name: t
    for t in (
        _glue("cola", ("sentence",), ("matthews_correlation", "accuracy"), "matthews_correlation"),
        _glue("sst2", ("sentence",), ("accuracy",), "accuracy"),
        _glue("mrpc", ("sentence1", "sentence2"), ("accuracy", "f1"), "accuracy"),
        _glue("stsb", ("sentence1", "sentence2"), ("pearson", "spearmanr"), "pearson", num_labels=1),
        _glue("qqp", ("question1", "question2"), ("accuracy", "f1"), "accuracy"),
        _glue("mnli", ("premise", "hypothesis"), ("accuracy",), "accuracy", num_labels=3,
              dev=("validation_matched", "validation_mismatched")),
        _glue("qnli", ("question", "sentence"), ("accuracy",), "accuracy"),
        _glue("rte", ("sentence1", "sentence2"), ("accuracy",), "accuracy"),
        _glue("wnli", ("sentence1", "sentence2"), ("accuracy",), "accuracy"),
        TaskSpec("oasst1", CAUSAL_LM, "oasst1", ("perplexity",), "loss"),
        TaskSpec("movie_sentiment", CLASSIFICATION, "movie_reviews", ("accuracy", "f1"), "accuracy",
                 ("sentence",), 2, ("validation",), "test"),
        TaskSpec("movie_score", REGRESSION, "movie_reviews", ("pearson", "spearmanr"), "pearson",
                 ("sentence",), 1, ("validation",), "test"),
        TaskSpec("chat", CAUSAL_LM, "chatterbot", ("perplexity",), "loss", (), 0, ("validation",), "test"),
    )
}

GLUE_HUB_NAME = "nyu-mll/glue"
OASST1_HUB_NAME = "OpenAssistant/oasst1"


@dataclass
class TaskSettings:
    """What the Hydra ``task`` group may change. Sizes cap the number of examples (None: all)."""

    name: str
    data_files: dict[str, Any] | None = None
    max_length: Annotated[int, Ge(2)] = 128
    max_train_samples: Annotated[int, Ge(1)] | None = None
    max_selection_samples: Annotated[int, Ge(1)] | None = None
    max_report_samples: Annotated[int, Ge(1)] | None = None
    main_metric: str | None = None  # default: the task's
    direction: Literal["maximize", "minimize"] | None = None  # checked against the main metric
    languages: list[str] | None = None  # oasst1: keep threads whose root has one of these
    split_seed: int = 13  # the fixed seed of the offline tasks' train/validation/test split
    subsample_seed: int = 0  # which examples the max_*_samples caps keep (independent of the run seed)
    paper_eval_every: Annotated[int, Ge(1)] | None = None  # the authors' evaluation interval in steps at batch size 32
    extra: dict[str, Any] = field(default_factory=dict)


def get_task(name: str) -> TaskSpec:
    if name not in TASKS:
        raise ConfigError(f"Unknown task {name!r}. Valid tasks: {', '.join(TASKS)}.")
    return TASKS[name]


def main_metric(spec: TaskSpec, settings: TaskSettings) -> tuple[str, bool]:
    """The metric that selects checkpoints (and that sweeps optimise), and whether higher is better."""
    name = settings.main_metric or spec.main_metric
    valid = set(spec.metrics) | {"loss"}
    if name not in valid:
        raise ConfigError(f"task.main_metric={name!r} is not computed for {spec.name}; choose one of {sorted(valid)}.")
    higher = name not in LOWER_IS_BETTER
    if settings.direction is not None:
        expected = "maximize" if higher else "minimize"
        if settings.direction != expected:
            raise ConfigError(f"task.direction={settings.direction!r} contradicts the main metric {name!r} ({expected}).")
    return name, higher


# ---------------------------------------------------------------------------------------- loading


def load_raw_splits(spec: TaskSpec, settings: TaskSettings, cache_dir: str | None = None) -> dict[str, list[dict]]:
    """Every labelled split of the task as example dicts (see module docstring)."""
    if spec.source == "glue":
        tables = _load_tables(GLUE_HUB_NAME, spec.hub_config, settings.data_files, cache_dir)
        return {split: _glue_examples(spec, split, rows) for split, rows in tables.items() if _is_labelled(spec, split)}
    if spec.source == "oasst1":
        tables = _load_tables(OASST1_HUB_NAME, None, settings.data_files, cache_dir)
        return {split: oasst1_threads(rows, settings.languages) for split, rows in tables.items()}
    if spec.source == "movie_reviews":
        return _movie_splits(spec, settings)
    if spec.source == "chatterbot":
        return _chat_splits(settings)
    raise ConfigError(f"task {spec.name}: unknown source {spec.source!r}")


def _is_labelled(spec: TaskSpec, split: str) -> bool:
    return split == "train" or split in spec.dev_splits or split == spec.test_split


def _load_tables(hub_name: str, subset: str | None, data_files, cache_dir) -> dict[str, list[dict]]:
    import datasets

    if data_files:
        files = {str(k): ([str(p) for p in v] if isinstance(v, (list, tuple)) else str(v)) for k, v in dict(data_files).items()}
        for split, paths in files.items():
            for path in paths if isinstance(paths, list) else [paths]:
                if not Path(path).exists():
                    raise DataError(f"task.data_files[{split}]: no such file {path}")
        builder, kwargs = _builder_for(files)
        tables = {}
        for split, paths in files.items():  # one split at a time: files of one split never cast to another's columns
            try:
                tables[split] = datasets.load_dataset(builder, data_files={split: paths}, split=split,
                                                      cache_dir=cache_dir, **kwargs).to_list()
            except Exception as exc:  # a file the reader cannot parse: name the file, not the reader's internals
                cause = exc.__cause__ or exc.__context__ or exc
                text = " ".join(str(cause).split())[:300]
                raise DataError(f"task.data_files.{split}={paths}: could not be read as {builder}: "
                                f"{type(cause).__name__}: {text}") from None
        return tables
    try:
        dsd = datasets.load_dataset(hub_name, subset, cache_dir=cache_dir)
    except (ConnectionError, OSError, ValueError) as exc:  # offline mode raises ConnectionError
        raise HubUnreachableError(hub_dataset_message(hub_name + (f"/{subset}" if subset else ""), exc)) from exc
    except Exception as exc:  # datasets wraps network failures in several classes
        if "hub" in str(exc).lower() or "connect" in str(exc).lower() or "offline" in str(exc).lower():
            raise HubUnreachableError(hub_dataset_message(hub_name, exc)) from exc
        raise
    return {split: dsd[split].to_list() for split in dsd}


def _builder_for(files: dict) -> tuple[str, dict]:
    suffixes = set()
    for paths in files.values():
        for path in paths if isinstance(paths, list) else [paths]:
            suffixes.add(Path(path).suffix.lower())
    if len(suffixes) != 1:
        raise DataError(f"task.data_files: use one file format for all splits, got {sorted(suffixes)}")
    suffix = suffixes.pop()
    if suffix == ".csv":
        return "csv", {}
    if suffix == ".tsv":
        return "csv", {"delimiter": "\t"}
    if suffix in (".json", ".jsonl"):
        return "json", {}
    if suffix == ".parquet":
        return "parquet", {}
    raise DataError(f"task.data_files: unsupported file type {suffix!r} (use .csv, .tsv, .json, .jsonl or .parquet)")


def _glue_examples(spec: TaskSpec, split: str, rows: list[dict]) -> list[dict]:
    if not rows:
        raise DataError(f"{spec.name}/{split}: the split is empty")
    problem = missing_columns(spec, list(rows[0]))
    if problem:
        raise DataError(f"{spec.name}/{split}: {problem}")
    examples = []
    for i, row in enumerate(rows):
        texts = tuple("" if row[f] is None else str(row[f]) for f in spec.text_fields)
        label = check_label(spec, row["label"], f"{spec.name}/{split} row {i}")
        examples.append({"texts": texts if len(texts) == 2 else (texts[0], None), "label": label})
    return examples


def missing_columns(spec: TaskSpec, found: list[str]) -> str | None:
    """What is wrong with a table of columns ``found`` for the task, or None."""
    missing = [c for c in spec.columns if c not in found]
    if not missing:
        return None
    return (f"missing column(s) {', '.join(missing)}; {spec.name} needs the columns {', '.join(spec.columns)} "
            f"(found {', '.join(found) or 'none'})")


def label_warning(spec: TaskSpec, train: list[dict]) -> str | None:
    """A warning when the training examples of a classification task miss a class of its head (a single
    class, most often: a filtered or sorted file), with the label counts; None when every class is there."""
    if spec.kind != CLASSIFICATION or not train:
        return None
    from collections import Counter

    counts = Counter(e["label"] for e in train)
    missing = [c for c in range(spec.num_labels) if c not in counts]
    if not missing:
        return None
    what = "a single class" if len(counts) == 1 else f"no example of label {', '.join(map(str, missing))}"
    shown = ", ".join(f"label {c}: {counts.get(c, 0)}" for c in range(spec.num_labels))
    return (f"the {spec.name} training data has {what} ({shown}; {len(train)} examples): the model cannot learn "
            f"to tell the {spec.num_labels} classes apart; check the labels of task.data_files.train "
            "(or task.max_train_samples)")


def check_label(spec: TaskSpec, value, where: str):
    """A label of the right type for the task's head, or a DataError that says what does not fit."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        raise DataError(f"{where}: missing label")
    if spec.kind == REGRESSION:
        try:
            return float(value)
        except (TypeError, ValueError):
            raise DataError(f"{where}: {spec.name} is a regression task (one output) but the label {value!r} is not a number") from None
    try:
        as_float = float(value)
    except (TypeError, ValueError):
        raise DataError(f"{where}: {spec.name} is a classification task with integer labels 0..{spec.num_labels - 1}, got {value!r}") from None
    if as_float != int(as_float):
        raise DataError(
            f"{where}: {spec.name} is a classification task ({spec.num_labels} classes) but the label {value!r} "
            "is a real number, as in a regression task; use a regression task such as stsb or movie_score."
        )
    label = int(as_float)
    if label == -1:
        raise DataError(f"{where}: label -1 means a hidden test label (GLUE test splits); only labelled splits can be used")
    if not 0 <= label < spec.num_labels:
        raise DataError(f"{where}: label {label} does not fit the {spec.num_labels}-class head of {spec.name}")
    return label


# ------------------------------------------------------------------------------------ oasst1 trees


def oasst1_threads(rows: list[dict], languages: list[str] | None = None) -> list[dict]:
    """Every root-to-leaf thread of the OpenAssistant message trees as a user/assistant conversation."""
    if rows and not set(OASST1_COLUMNS) <= set(rows[0]):
        raise DataError(f"oasst1: rows need the columns {', '.join(OASST1_COLUMNS)}, found {', '.join(rows[0])}")
    by_id = {r["message_id"]: r for r in rows}
    children: dict[str, list[str]] = {}
    roots = []
    for r in rows:
        parent = r.get("parent_id")
        if parent in (None, "") or (isinstance(parent, float) and math.isnan(parent)):
            roots.append(r["message_id"])
        elif parent in by_id:
            children.setdefault(parent, []).append(r["message_id"])
    role_map = {"prompter": "user", "assistant": "assistant", "user": "user"}
    threads = []
    for root in roots:
        if languages and by_id[root].get("lang") not in languages:
            continue
        stack = [(root, [root])]
        while stack:  # depth-first; children in file order for determinism
            node, path = stack.pop()
            kids = children.get(node, [])
            if not kids:
                messages = [{"role": role_map.get(by_id[m]["role"], by_id[m]["role"]), "content": str(by_id[m]["text"])} for m in path]
                if any(m["role"] == "assistant" for m in messages):
                    threads.append({"messages": messages})
                continue
            for kid in reversed(kids):
                stack.append((kid, path + [kid]))
    return threads


# ------------------------------------------------------------------------------- offline tasks


def _seeded_split(items: list, seed: int, n_validation: int, n_test: int) -> dict[str, list]:
    order = list(range(len(items)))
    random.Random(seed).shuffle(order)
    test = [items[i] for i in order[:n_test]]
    validation = [items[i] for i in order[n_test:n_test + n_validation]]
    train = [items[i] for i in order[n_test + n_validation:]]
    return {"train": train, "validation": validation, "test": test}


def _movie_splits(spec: TaskSpec, settings: TaskSettings) -> dict[str, list[dict]]:
    from sparsegrad.suite.run import assets

    rows = [r for r in assets.load_movie_reviews() if r[1] != 0.0]  # zero scores have no sentiment
    rows.sort(key=lambda r: r[0])  # the split must not depend on file order
    splits = _seeded_split(rows, settings.split_seed, n_validation=1000, n_test=1500)
    if spec.kind == CLASSIFICATION:
        return {k: [{"texts": (t, None), "label": int(s > 0)} for _, s, t in v] for k, v in splits.items()}
    return {k: [{"texts": (t, None), "label": float(s)} for _, s, t in v] for k, v in splits.items()}


def _chat_splits(settings: TaskSettings) -> dict[str, list[dict]]:
    from sparsegrad.suite.run import assets

    conversations = assets.load_chatterbot_conversations()
    examples = [
        {"messages": [{"role": "user" if i % 2 == 0 else "assistant", "content": turn} for i, turn in enumerate(conv)]}
        for conv in conversations
    ]
    return _seeded_split(examples, settings.split_seed, n_validation=200, n_test=200)


# ---------------------------------------------------------------------------------- protocol


@dataclass
class TaskData:
    """The splits one run uses: train on ``train``, select checkpoints on ``selection``, report ``report``."""

    train: list[dict]
    selection_name: str
    selection: list[dict]
    report: dict[str, list[dict]]


def arrange_splits(
    spec: TaskSpec,
    settings: TaskSettings,
    raw: dict[str, list[dict]],
    protocol: str = "heldout",
    heldout_fraction: float = 0.1,
    heldout_max: int | None = 2000,
) -> TaskData:
    """Choose the training, model-selection and reported splits.

    ``heldout`` (default): checkpoints are selected on a split the reported score never sees. GLUE
    test labels are hidden, so a held-out part of train selects and GLUE dev is reported; tasks with
    a labelled test split select on their validation split and report test.
    ``official`` (the authors' protocol): select and report on the dev split(s).
    """
    if protocol not in ("heldout", "official"):
        raise ConfigError(f"trainer.protocol={protocol!r}; choose heldout or official")
    for split in ("train", *spec.dev_splits):
        if split not in raw:
            raise DataError(
                f"{spec.name}: split {split!r} is missing (have {sorted(raw)}); with task.data_files give "
                f"files for train and {', '.join(spec.dev_splits)}."
            )
    train = _cap(raw["train"], settings.max_train_samples, settings.subsample_seed)
    if protocol == "official":
        report = {s: raw[s] for s in spec.dev_splits}
        selection_name = spec.main_split
        selection = report[selection_name]
    elif spec.test_split is not None and spec.test_split in raw:
        report = {spec.test_split: raw[spec.test_split]}
        selection_name, selection = spec.main_split, raw[spec.main_split]
    else:
        shuffled = list(raw["train"])
        random.Random(settings.split_seed).shuffle(shuffled)
        n_heldout = max(1, int(round(len(shuffled) * heldout_fraction)))
        if heldout_max:
            n_heldout = min(n_heldout, heldout_max)
        if n_heldout >= len(shuffled):
            raise DataError(f"{spec.name}: the training split ({len(shuffled)} examples) is too small to hold out a selection split")
        selection_name, selection = "heldout", shuffled[:n_heldout]
        train = _cap(shuffled[n_heldout:], settings.max_train_samples, settings.subsample_seed)
        report = {s: raw[s] for s in spec.dev_splits}
    selection = _cap(selection, settings.max_selection_samples, settings.subsample_seed)
    report = {k: _cap(v, settings.max_report_samples, settings.subsample_seed) for k, v in report.items()}
    if not train:
        raise DataError(f"{spec.name}: no training examples")
    return TaskData(train, selection_name, selection, report)


def _cap(examples: list, limit: int | None, seed: int) -> list:
    if limit is None or limit <= 0 or len(examples) <= limit:
        return examples
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    return [examples[i] for i in sorted(order[:limit])]
