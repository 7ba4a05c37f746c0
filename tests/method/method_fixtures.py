"""Tiny random BERT / RoBERTa / LLaMA models and padded batches for the method-layer tests.

Imported by the tests as ``method_fixtures`` (a unique module name: ``conftest`` is ambiguous when
several test folders have one)."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")

import torch  # noqa: E402

torch.set_num_threads(2)

VOCAB = 97
SEQ = 12
KINDS = ("bert", "roberta", "llama")


def make_model(kind: str, seed: int = 0, n_layers: int = 2, dtype=torch.float32):
    """A tiny random model: BERT/RoBERTa sequence classifiers or a LLaMA causal LM (dropout off)."""
    from transformers import (
        BertConfig,
        BertForSequenceClassification,
        LlamaConfig,
        LlamaForCausalLM,
        RobertaConfig,
        RobertaForSequenceClassification,
    )

    torch.manual_seed(seed)
    common = {"vocab_size": VOCAB, "hidden_size": 32, "num_hidden_layers": n_layers, "num_attention_heads": 2}
    if kind == "bert":
        cfg = BertConfig(**common, intermediate_size=64, max_position_embeddings=64, num_labels=2,
                         hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)  # fmt: skip
        model = BertForSequenceClassification(cfg)
    elif kind == "roberta":
        cfg = RobertaConfig(**common, intermediate_size=64, max_position_embeddings=SEQ + 4, num_labels=2,
                            pad_token_id=1, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)  # fmt: skip
        model = RobertaForSequenceClassification(cfg)
    elif kind == "llama":
        cfg = LlamaConfig(**common, intermediate_size=48, num_key_value_heads=2, max_position_embeddings=64,
                          pad_token_id=0, tie_word_embeddings=False)  # fmt: skip
        model = LlamaForCausalLM(cfg)
    else:
        raise ValueError(kind)
    return model.to(dtype)


def make_batches(kind: str, n: int = 4, batch_size: int = 4, seed: int = 1, seq: int = SEQ) -> list[dict]:
    """Padded batches (about a third of the positions are padding) with labels."""
    gen = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(n):
        ids = torch.randint(3, VOCAB, (batch_size, seq), generator=gen)
        lengths = torch.randint(seq // 2, seq + 1, (batch_size,), generator=gen)
        lengths[0] = seq
        mask = (torch.arange(seq)[None, :] < lengths[:, None]).long()
        ids = ids.masked_fill(mask == 0, 1 if kind == "roberta" else 0)
        batch = {"input_ids": ids, "attention_mask": mask}
        if kind == "llama":
            batch["labels"] = ids.masked_fill(mask == 0, -100)
        else:
            batch["labels"] = torch.randint(0, 2, (batch_size,), generator=gen)
        batches.append(batch)
    return batches


def random_orthogonal(n: int, seed: int = 0, dtype=torch.float64) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    q, r = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=torch.float64))
    return (q * torch.sign(torch.diagonal(r))).to(dtype)
