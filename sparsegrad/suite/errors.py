"""Errors that speak to the user: the entry point prints their message (no traceback) and exits 2."""

from __future__ import annotations

OFFLINE_MODELS = "model=minilm (BERT encoder) or model=smollm2 (LLaMA chat decoder)"
OFFLINE_TASKS = "task=movie_sentiment, task=movie_score or task=chat"


class SuiteError(Exception):
    """A problem with the user's request or environment, explained in the message."""


class ConfigError(SuiteError):
    """An unknown name or an inconsistent combination of settings."""


class HubUnreachableError(SuiteError):
    """A model or data set had to come from the Hugging Face Hub, and the Hub could not be reached."""


class IncompatibleTaskError(ConfigError):
    """The task's labels do not fit the model's head (e.g. a causal LM on a classification task)."""


class DataError(SuiteError):
    """Task data is malformed: missing columns, labels of the wrong type, empty splits."""


def hub_model_message(name: str, cause: BaseException) -> str:
    return (
        f"Could not load the model {name!r}: the Hugging Face Hub is unreachable (or offline mode is on: "
        f"HF_HUB_OFFLINE={_env('HF_HUB_OFFLINE')}) and it is not in the local Hugging Face cache. "
        f"Use an offline model instead ({OFFLINE_MODELS}; fetch them with `make assets`), or point "
        f"model.pretrained=/path/to/a/local/model/folder. Cause: {type(cause).__name__}: {_first_line(cause)}"
    )


def hub_dataset_message(name: str, cause: BaseException) -> str:
    return (
        f"Could not load the data set {name!r}: the Hugging Face Hub is unreachable (or offline mode is on: "
        f"HF_DATASETS_OFFLINE={_env('HF_DATASETS_OFFLINE')}). Use an offline task ({OFFLINE_TASKS}; "
        "fetch them with `make assets`), or give local files per split, e.g. "
        "task.data_files='{train: /data/train.csv, validation: /data/dev.csv}' (csv, json or jsonl). "
        f"Cause: {type(cause).__name__}: {_first_line(cause)}"
    )


def _env(name: str) -> str:
    import os

    return os.environ.get(name, "unset")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:300] if text else ""
