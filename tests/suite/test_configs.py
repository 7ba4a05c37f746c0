"""Every model x method x task composes from the real conf/ and converts to plain settings."""

import subprocess
import sys

import pytest
from omegaconf import OmegaConf
from suite_fixtures import CONF_DIR, REPO

from experiments.finetune import check_choices, options
from sparsegrad.suite.errors import IncompatibleTaskError
from sparsegrad.suite.run.models import check_compatible
from sparsegrad.suite.run.runner import settings_from_config
from sparsegrad.suite.run.tasks import TASKS, get_task

MODELS = options("model")
METHODS = options("method")
TASK_NAMES = options("task")


def test_config_groups_list_the_spec():
    assert set(MODELS) == {"bert_base", "roberta_base", "roberta_large", "llama2_7b", "minilm", "smollm2",
                           "tiny_bert", "tiny_roberta", "tiny_llama", "minilm_mlp", "tiny_bert_mlp"}
    assert set(METHODS) == {"full", "lora", "lora_authors", "meprop", "meprop_adamw", "meprop_output", "sparsegrad",
                            "sparsegrad_official", "leading_block", "shira"}
    assert set(TASK_NAMES) == set(TASKS)


def _check(cfg, model, method, task, tmp_path):
    resolved = OmegaConf.to_container(cfg, resolve=True)
    settings = settings_from_config(resolved, str(tmp_path), check_files=False)
    assert settings.model.name == model and settings.method.name == method and settings.task.name == task
    spec = get_task(task)
    assert resolved["task"]["direction"] == ("maximize" if spec.higher_is_better else "minimize")
    if settings.method.kind in ("sparsegrad", "meprop", "leading_block", "shira"):
        assert settings.method.k == settings.model.sparse_k > 0
    if settings.method.kind == "lora":
        assert settings.method.rank == settings.model.lora_rank
    assert settings.method.target_patterns == settings.model.mlp_targets
    return settings


def test_every_model_method_pair_and_every_task_composes(compose, tmp_path):
    """Only model and method interpolate into each other; tasks are independent of both."""
    models = {}
    for model in MODELS:
        for method in METHODS:
            models[model] = _check(compose([f"model={model}", f"method={method}"]), model, method,
                                   "movie_sentiment", tmp_path).model
    for task in TASK_NAMES:
        _check(compose([f"task={task}"]), "minilm", "sparsegrad", task, tmp_path)
    # model x task: the pairs that cannot train are refused with a message, the others pass
    for name, model in models.items():
        for task in TASK_NAMES:
            spec = get_task(task)
            if (model.architecture == "decoder") == (spec.kind == "causal_lm"):
                check_compatible(model, spec)
            else:
                with pytest.raises(IncompatibleTaskError, match=name):
                    check_compatible(model, spec)


@pytest.mark.slow
@pytest.mark.parametrize("model", MODELS)
def test_full_product_composes(compose, model, tmp_path):
    for method in METHODS:
        for task in TASK_NAMES:
            _check(compose([f"model={model}", f"method={method}", f"task={task}"]), model, method, task, tmp_path)


def test_paper_budgets_and_ranks(compose):
    expected = {"bert_base": (7, 28000, 1), "roberta_base": (7, 28000, 1), "roberta_large": (10, 50000, 1),
                "llama2_7b": (32, 100000, 3)}
    for model, (rank, k, nth) in expected.items():
        m = compose([f"model={model}"]).model
        assert (m.lora_rank, m.sparse_k, m.every_nth_block) == (rank, k, nth)
    for model in ("minilm", "smollm2", "tiny_bert"):  # the LoRA-matched rule for the small models
        m = OmegaConf.to_container(compose([f"model={model}"]).model)
        cfg = m.get("random_init") or {}
        hidden = cfg.get("hidden_size", {"minilm": 384, "smollm2": 576}.get(model))
        inter = cfg.get("intermediate_size", 1536)
        assert m["sparse_k"] == m["lora_rank"] * (hidden + inter)


def test_default_is_minilm_sparsegrad_movie_sentiment(compose):
    cfg = compose([])
    assert (cfg.model.name, cfg.method.name, cfg.task.name, cfg.logger.name) == (
        "minilm", "sparsegrad", "movie_sentiment", "wandb")
    assert cfg.logger.mode == "offline"


def test_paper_trainer_takes_the_tasks_eval_interval(compose):
    cfg = compose(["trainer=paper", "task=cola"])
    assert cfg.trainer.eval_every == 50 and cfg.trainer.protocol == "official" and cfg.trainer.schedule == "constant"


def test_leading_block_options_reach_the_method_layer(compose, tmp_path):
    from sparsegrad import MethodConfig
    from sparsegrad.suite.run.methods import BASIS_KINDS, method_config

    for overrides, factor in (([], 2.0), (["method.options.block_factor=3.0"], 3.0)):
        cfg = compose(["model=tiny_bert", "method=leading_block", *overrides])
        settings = settings_from_config(OmegaConf.to_container(cfg, resolve=True), str(tmp_path), check_files=False)
        assert settings.method.kind == "leading_block" and settings.method.kind in BASIS_KINDS
        mc = MethodConfig.from_any(method_config(settings.method))
        assert (mc.name, mc.block_factor, mc.k, mc.orientation) == ("leading_block", factor, settings.model.sparse_k,
                                                                     "hosvd")


def test_unknown_names_list_the_valid_ones():
    message = check_choices(["model=gpt5"])
    assert "Unknown model 'gpt5'" in message and "minilm" in message and "tiny_llama" in message
    assert "Valid method options" in check_choices(["method=sparsegrad,adapter"])
    assert check_choices(["model=minilm", "task=cola", "trainer.lr=1e-3"]) is None


def test_cli_exits_2_with_one_paragraph_for_unknown_task():
    proc = subprocess.run([sys.executable, "-m", "experiments.finetune", "task=imdb"], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "Unknown task 'imdb'" in proc.stderr and "movie_sentiment" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_conf_dir_is_the_repository_conf():
    assert (CONF_DIR / "config.yaml").exists()


@pytest.mark.parametrize("task", ["movie_sentiment", "chat", "oasst1", "mnli"])
def test_paper_trainer_composes_with_every_kind_of_task(compose, task, tmp_path):
    cfg = compose(["trainer=paper", f"task={task}"])
    settings = settings_from_config(OmegaConf.to_container(cfg, resolve=True), str(tmp_path), check_files=False)
    assert settings.trainer.eval_every == {"mnli": 5000}.get(task)


def test_authors_baseline_switches_reach_the_method_layer(compose, tmp_path):
    """lora_authors / meprop_adamw: the switch is in the method config (and so in the run record), and
    the paper profiles use them."""
    from sparsegrad.suite.run.methods import method_config

    lora = _check(compose(["model=bert_base", "method=lora_authors"]), "bert_base", "lora_authors",
                  "movie_sentiment", tmp_path).method
    cfg = method_config(lora)
    assert cfg["lora_variant"] == "authors" and "lora_alpha" not in cfg and "lora_dropout" not in cfg
    assert method_config(_check(compose(["model=bert_base", "method=lora"]), "bert_base", "lora",
                                "movie_sentiment", tmp_path).method)["lora_variant"] == "standard"
    meprop = _check(compose(["model=bert_base", "method=meprop_adamw"]), "bert_base", "meprop_adamw",
                    "movie_sentiment", tmp_path).method
    assert method_config(meprop)["meprop_optimizer"] == "adamw"
    for profile in ("paper", "paper_best"):
        methods = OmegaConf.load(CONF_DIR / "profile" / f"{profile}.yaml").methods
        assert "lora_authors" in methods and "meprop_adamw" in methods and "lora" not in methods
    for profile in ("llama", "llama_offline"):
        assert "meprop_adamw" in OmegaConf.load(CONF_DIR / "profile" / f"{profile}.yaml").methods
