"""Packaging rules: the method layer stays light, the asset cache is configurable."""

import subprocess
import sys

import pytest


def test_import_sparsegrad_pulls_no_hydra_wandb_or_pandas():
    code = (
        "import sys, sparsegrad\n"
        "bad = [m for m in ('hydra', 'omegaconf', 'wandb', 'pandas', 'optuna') if m in sys.modules]\n"
        "print(','.join(bad))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "", f"import sparsegrad imported {out.stdout.strip()}"


def test_missing_asset_names_make_assets(tmp_path, monkeypatch):
    from sparsegrad.suite.run.assets import AssetMissingError, asset_path, cache_root

    monkeypatch.setenv("SPARSEGRAD_CACHE", str(tmp_path))
    assert cache_root() == tmp_path
    with pytest.raises(AssetMissingError, match="make assets"):
        asset_path("minilm")
    with pytest.raises(KeyError, match="valid names"):
        asset_path("bert")


def test_reproduce_glue_never_tracebacks():
    out = subprocess.run(
        [sys.executable, "-m", "scripts.reproduce_glue", "--profile", "smoke", "--help"], capture_output=True, text=True
    )
    assert out.returncode == 0 and "Traceback" not in out.stderr
