"""Fixture data for the suite tests: GLUE- and oasst1-format files with GLUE's exact columns."""

from __future__ import annotations

import csv
import json
import random
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
CONF_DIR = REPO / "conf"

GLUE_SCHEMAS = {
    # task: (text columns, label kind, validation splits)
    "cola": (("sentence",), "binary", ("validation",)),
    "sst2": (("sentence",), "binary", ("validation",)),
    "mrpc": (("sentence1", "sentence2"), "binary", ("validation",)),
    "stsb": (("sentence1", "sentence2"), "float", ("validation",)),
    "qqp": (("question1", "question2"), "binary", ("validation",)),
    "mnli": (("premise", "hypothesis"), "three", ("validation_matched", "validation_mismatched")),
    "qnli": (("question", "sentence"), "binary", ("validation",)),
    "rte": (("sentence1", "sentence2"), "binary", ("validation",)),
    "wnli": (("sentence1", "sentence2"), "binary", ("validation",)),
}

GOOD = ["good", "great", "lovely", "fine", "superb", "warm"]
BAD = ["bad", "awful", "poor", "dull", "weak", "cold"]
NOUNS = ["film", "movie", "story", "plot", "cast", "score", "ending", "script"]


def _sentence(rng: random.Random, label: int) -> str:
    word = rng.choice(GOOD if label else BAD)
    return f"the {rng.choice(NOUNS)} was {word} and the {rng.choice(NOUNS)} felt {rng.choice(GOOD + BAD)}"


def glue_rows(task: str, n: int, seed: int) -> list[dict]:
    """``n`` rows of a GLUE task with its exact columns; the label is learnable from a keyword."""
    fields, kind, _ = GLUE_SCHEMAS[task]
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        if kind == "float":
            label = round(rng.uniform(0.0, 5.0), 2)
            cls = int(label > 2.5)
        elif kind == "three":
            label = cls = rng.randrange(3)
        else:
            label = cls = rng.randrange(2)
        row = {fields[0]: _sentence(rng, cls % 2)}
        if len(fields) == 2:
            row[fields[1]] = _sentence(rng, int(cls == 1))
        row["label"] = label
        rows.append(row)
    return rows


def write_csv(path: Path, rows: list[dict]) -> Path:
    with open(path, "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


def oasst1_rows(n_trees: int, seed: int, prefix: str) -> list[dict]:
    """Message trees in oasst1's columns: a prompter root, assistant replies, some branching."""
    rng = random.Random(seed)
    rows = []
    for t in range(n_trees):
        root = f"{prefix}-{t}-0"
        rows.append({"message_id": root, "parent_id": None, "role": "prompter", "lang": "en",
                     "text": f"can you describe the {rng.choice(NOUNS)}?"})
        for a in range(2):  # two alternative assistant answers: two threads
            aid = f"{prefix}-{t}-a{a}"
            rows.append({"message_id": aid, "parent_id": root, "role": "assistant", "lang": "en",
                         "text": f"the {rng.choice(NOUNS)} was {rng.choice(GOOD + BAD)}."})
            if a == 0:
                pid = f"{prefix}-{t}-p{a}"
                rows.append({"message_id": pid, "parent_id": aid, "role": "prompter", "lang": "en",
                             "text": "why do you say so?"})
                rows.append({"message_id": f"{prefix}-{t}-q{a}", "parent_id": pid, "role": "assistant",
                             "lang": "en", "text": f"because it felt {rng.choice(GOOD + BAD)}."})
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    with open(path, "w", encoding="utf-8") as fh:
        for row in rows:
            fh.write(json.dumps(row) + "\n")
    return path


def data_files_override(files: dict) -> str:
    """A Hydra override string for task.data_files."""
    inner = ", ".join(f"{split}: '{path}'" for split, path in files.items())
    return f"task.data_files={{{inner}}}"
