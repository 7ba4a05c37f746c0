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
        f"Could not load the model {name!r}: {_hub_state('HF_HUB_OFFLINE')} and it is not in the local "
        "Hugging Face cache. "
        f"Use an offline model instead ({OFFLINE_MODELS}; fetch them with `make assets`), or point "
        f"model.pretrained=/path/to/a/local/model/folder. Cause: {type(cause).__name__}: {_first_line(cause)}"
    )


def hub_dataset_message(name: str, cause: BaseException) -> str:
    return (
        f"Could not load the data set {name!r}: {_hub_state('HF_DATASETS_OFFLINE', 'HF_HUB_OFFLINE')}. "
        f"Use an offline task ({OFFLINE_TASKS}; "
        "fetch them with `make assets`), or give local files per split, e.g. "
        "task.data_files='{train: /data/train.csv, validation: /data/dev.csv}' (csv, json or jsonl). "
        f"Cause: {type(cause).__name__}: {_first_line(cause)}"
    )


def _hub_state(*variables: str) -> str:
    """Why the Hub was not asked or did not answer: offline mode (and which variable) or no connection."""
    import os

    for name in variables:
        if os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on"):
            return f"offline mode is on ({name}={os.environ[name]}), so the Hugging Face Hub was not asked"
    state = ", ".join(f"{n}={os.environ[n]}" if n in os.environ else f"{n} unset" for n in variables)
    return f"the Hugging Face Hub could not be reached (offline mode is off: {state})"


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:300] if text else ""


def signal_message(returncode: int) -> str | None:
    """What a child's negative return code (killed by a signal) means, in words; None for a normal exit."""
    import signal

    if returncode >= 0:
        return None
    try:
        name = signal.Signals(-returncode).name
    except ValueError:
        name = f"signal {-returncode}"
    if name == "SIGKILL":
        return ("killed by SIGKILL; the likely cause is the system running out of memory (the OOM killer: see "
                "`dmesg` or `journalctl -k`); try a smaller trainer.batch_size or fewer parallel jobs")
    if name in ("SIGINT", "SIGTERM", "SIGHUP"):
        return f"stopped by {name} (interrupted)"
    return f"killed by {name}"
