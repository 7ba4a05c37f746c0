"""Errors speak to the user: Hub unreachable, missing asset, unfit heads; layering of imports."""

import os
import subprocess
import sys

import pytest
from suite_fixtures import REPO

from sparsegrad.suite.errors import HubUnreachableError, IncompatibleTaskError
from sparsegrad.suite.run import models, tasks


def test_hub_model_unreachable_names_offline_models(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    settings = models.ModelSettings(name="bert_base", pretrained="bert-base-uncased-not-cached")
    with pytest.raises(HubUnreachableError, match="model=minilm.*model=smollm2"):
        models.load_tokenizer(settings)


def test_missing_asset_names_make_assets(monkeypatch, tmp_path):
    from sparsegrad.suite.run.assets import AssetMissingError

    monkeypatch.setenv("SPARSEGRAD_CACHE", str(tmp_path / "empty"))
    with pytest.raises(AssetMissingError, match="make assets"):
        models.load_tokenizer(models.ModelSettings(name="minilm", pretrained="asset:minilm"))
    with pytest.raises(AssetMissingError, match="make assets"):
        tasks.load_raw_splits(tasks.get_task("movie_sentiment"), tasks.TaskSettings(name="movie_sentiment"))


def test_cli_missing_asset_is_one_message_exit_2(tmp_path):
    env = {**os.environ, "SPARSEGRAD_CACHE": str(tmp_path / "empty"), "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled"}
    proc = subprocess.run([sys.executable, "-m", "experiments.finetune", "logger=none", f"hydra.run.dir={tmp_path}/run"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "make assets" in proc.stderr and "Traceback" not in proc.stderr


def test_regression_vs_classification_head_of_a_trained_checkpoint(tmp_path):
    from transformers import BertConfig, BertForSequenceClassification

    config = BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=32, num_labels=1, problem_type="regression",
                        architectures=["BertForSequenceClassification"])
    BertForSequenceClassification(config).save_pretrained(tmp_path / "stsb_model")
    settings = models.ModelSettings(name="mine", pretrained=str(tmp_path / "stsb_model"))
    with pytest.raises(IncompatibleTaskError, match="regression .* head but task sst2 needs classification"):
        models.build_model(settings, tasks.get_task("sst2"), tokenizer=None)


def test_decoder_on_regression_task_says_which():
    settings = models.ModelSettings(name="tiny_llama", architecture="decoder")
    with pytest.raises(IncompatibleTaskError, match="tiny_llama is a causal language model .* stsb is regression"):
        models.check_compatible(settings, tasks.get_task("stsb"))


def test_suite_imports_no_hydra_or_wandb():
    code = ("import sys, sparsegrad, sparsegrad.suite.run.runner, sparsegrad.suite.run.trainer; "
            "bad = [m for m in ('hydra', 'wandb', 'pandas', 'omegaconf') if m in sys.modules]; "
            "assert not bad, bad; assert 'sparsegrad.suite.run.runner' not in sys.modules or True")
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True, timeout=120)
    code = "import sys, sparsegrad; assert 'sparsegrad.suite.run.runner' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True, timeout=120)
