"""Models and tokenizers: pretrained (Hub name, local folder or offline asset) or tiny random ones.

``pretrained`` may be a Hub id (``bert-base-uncased``), a local folder, or ``asset:<name>`` for a
model in the offline asset cache (``make assets``). Tiny test models are built from a config
(``random_init``) and get a tokenizer trained in well under a second on the task's own training
text (``tokenizer: train``), so they need neither the Hub nor the asset cache.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

from annotated_types import Ge

from sparsegrad.suite.errors import ConfigError, HubUnreachableError, IncompatibleTaskError, hub_model_message
from sparsegrad.suite.run.tasks import CAUSAL_LM, REGRESSION, TaskSpec

ENCODER, DECODER = "encoder", "decoder"


@dataclass
class ModelSettings:
    """What the Hydra ``model`` group says about a model (see conf/model/*.yaml)."""

    name: str
    architecture: Literal["encoder", "decoder"] = ENCODER  # encoder: sequence classification head; decoder: causal LM
    pretrained: str | None = None  # Hub id, local folder or asset:<name>; None with random_init
    random_init: dict[str, Any] | None = None  # a transformers config (model_type + sizes) for tiny models
    tokenizer: str | None = None  # None: the pretrained one; "train": train a small one on the task text
    tokenizer_vocab_size: Annotated[int, Ge(1)] = 1000
    chat_template: Literal["chatml", "llama2_inst"] | None = None  # None: the tokenizer's own (data.CHAT_TEMPLATES)
    config_overrides: dict[str, Any] = field(default_factory=dict)  # e.g. num_hidden_layers: 4
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"  # weights as loaded; training precision is trainer.precision
    # The method settings the paper matches to each model (read by conf/method/*.yaml):
    mlp_targets: dict[str, str] | list[str] = field(default_factory=list)
    lora_rank: Annotated[int, Ge(1)] = 8
    lora_alpha: float | None = None
    sparse_k: int | float = 0
    every_nth_block: Annotated[int, Ge(1)] = 1
    train_non_mlp: bool = True
    train_head: bool = False  # with train_non_mlp=false: keep the task head trainable (sparsegrad.suite.run.heads)


def resolve_location(pretrained: str) -> str:
    """A local folder path or a Hub id; ``asset:<name>`` resolves in the asset cache."""
    if pretrained.startswith("asset:"):
        from sparsegrad.suite.run import assets

        return str(assets.asset_path(pretrained.split(":", 1)[1]))
    return os.path.expanduser(pretrained)


def _is_local(location: str) -> bool:
    return Path(location).exists()


def load_tokenizer(settings: ModelSettings, training_texts: list[str] | None = None):
    from transformers import AutoTokenizer

    from sparsegrad.suite.run.data import CHAT_TEMPLATES

    if settings.tokenizer == "train":
        if not settings.random_init:
            raise ConfigError(f"model {settings.name}: tokenizer=train is only for random_init (tiny) models")
        from sparsegrad.suite.run.tiny_tokenizers import train_tokenizer

        tokenizer = train_tokenizer(settings.random_init["model_type"], training_texts or ["hello world"], settings.tokenizer_vocab_size)
    else:
        source = settings.tokenizer or settings.pretrained
        if not source:
            raise ConfigError(f"model {settings.name}: set model.pretrained or model.tokenizer")
        location = resolve_location(source)
        try:
            tokenizer = AutoTokenizer.from_pretrained(location)
        except OSError as exc:
            if _is_local(location):
                raise
            raise HubUnreachableError(hub_model_message(source, exc)) from exc
    if settings.chat_template:
        if settings.chat_template not in CHAT_TEMPLATES:
            raise ConfigError(f"model.chat_template={settings.chat_template!r}; choose one of {sorted(CHAT_TEMPLATES)} or null")
        tokenizer.chat_template = CHAT_TEMPLATES[settings.chat_template]
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    return tokenizer


def check_compatible(settings: ModelSettings, spec: TaskSpec, tokenizer=None) -> None:
    """Raise IncompatibleTaskError when the task's labels cannot be produced by the model's head."""
    if settings.architecture not in (ENCODER, DECODER):
        raise ConfigError(f"model.architecture={settings.architecture!r}; choose encoder or decoder")
    if settings.architecture == DECODER and spec.kind != CAUSAL_LM:
        raise IncompatibleTaskError(
            f"model {settings.name} is a causal language model (decoder) but task {spec.name} is {spec.kind} "
            f"with {'a real-valued label' if spec.kind == REGRESSION else f'{spec.num_labels}-class labels'}; "
            "pair decoders with task=oasst1 or task=chat, and encoders (minilm, bert_base, roberta_*) with GLUE-style tasks."
        )
    if settings.architecture == ENCODER and spec.kind == CAUSAL_LM:
        raise IncompatibleTaskError(
            f"model {settings.name} is an encoder with a sequence-classification head but task {spec.name} is causal "
            "language modelling (assistant-token loss); use model=smollm2, llama2_7b or tiny_llama for it."
        )
    if spec.kind == CAUSAL_LM and tokenizer is not None and not getattr(tokenizer, "chat_template", None):
        raise ConfigError(
            f"model {settings.name}: the tokenizer has no chat template; set model.chat_template=chatml or llama2_inst"
        )


def _head_kwargs(spec: TaskSpec) -> dict:
    if spec.kind == CAUSAL_LM:
        return {}
    problem = "regression" if spec.kind == REGRESSION else "single_label_classification"
    return {"num_labels": spec.num_labels, "problem_type": problem}


def _check_pretrained_head(settings: ModelSettings, spec: TaskSpec, location: str) -> None:
    """A checkpoint that already carries a trained classification head must match the task's head."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(location)
    architectures = config.architectures or []
    if not any(a.endswith("ForSequenceClassification") for a in architectures):
        return
    had_regression = config.problem_type == "regression" or config.num_labels == 1
    if had_regression != (spec.kind == REGRESSION) or (spec.kind != REGRESSION and config.num_labels != spec.num_labels):
        theirs = "regression (1 output)" if had_regression else f"classification ({config.num_labels} classes)"
        ours = "regression (1 output)" if spec.kind == REGRESSION else f"classification ({spec.num_labels} classes)"
        raise IncompatibleTaskError(
            f"model {settings.name} ({location}) carries a trained {theirs} head but task {spec.name} needs {ours}; "
            "start from the base checkpoint instead."
        )


def build_model(settings: ModelSettings, spec: TaskSpec, tokenizer):
    """The model with the head the task needs; the classification head is freshly initialised."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

    check_compatible(settings, spec, tokenizer)
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[settings.dtype]
    head = _head_kwargs(spec)
    auto = AutoModelForCausalLM if spec.kind == CAUSAL_LM else AutoModelForSequenceClassification
    if settings.random_init:
        kwargs = dict(settings.random_init)
        model_type = kwargs.pop("model_type")
        kwargs.update(settings.config_overrides)
        kwargs.setdefault("vocab_size", len(tokenizer))
        kwargs["vocab_size"] = max(kwargs["vocab_size"], len(tokenizer))
        for key in ("pad_token_id", "bos_token_id", "eos_token_id"):
            value = getattr(tokenizer, key, None)
            if value is not None:
                kwargs[key] = value
        config = AutoConfig.for_model(model_type, **kwargs, **head)
        model = auto.from_config(config)
        return model.to(dtype)
    if not settings.pretrained:
        raise ConfigError(f"model {settings.name}: set model.pretrained (Hub id, local folder or asset:<name>) or random_init")
    location = resolve_location(settings.pretrained)
    try:
        if _is_local(location) and spec.kind != CAUSAL_LM:
            _check_pretrained_head(settings, spec, location)
        model = auto.from_pretrained(location, dtype=dtype, **head, **settings.config_overrides)
    except OSError as exc:
        if _is_local(location):
            raise
        raise HubUnreachableError(hub_model_message(settings.pretrained, exc)) from exc
    if model.config.pad_token_id is None and tokenizer.pad_token_id is not None:
        model.config.pad_token_id = tokenizer.pad_token_id
    return model


def count_parameters(model) -> tuple[int, int]:
    """(all parameters, trainable parameters); tied weights are counted once."""
    seen, total, trainable = set(), 0, 0
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel()
        trainable += p.numel() if p.requires_grad else 0
    return total, trainable
