"""Shared test settings: never touch the Hub or W&B servers, keep torch on the machine's 2 cores."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def asset():
    """Path of an offline asset; a missing asset fails the test with the command that fetches it.
    Session-scoped (it holds no state) so that module-scoped fixtures can use it too."""
    from sparsegrad.suite.run.assets import AssetMissingError, asset_path

    def get(name):
        try:
            return asset_path(name)
        except AssetMissingError as exc:
            pytest.fail(str(exc))

    return get
