"""Tiny random models and padded batches for the benchmark-harness and variant tests."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")

import torch  # noqa: E402

torch.set_num_threads(2)

VOCAB = 97
SEQ = 12


def tiny_bert(seed: int = 0, n_layers: int = 2, dtype=torch.float32):
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=n_layers, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=64, num_labels=2,
                     hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)  # fmt: skip
    return BertForSequenceClassification(cfg).to(dtype)


def padded_batches(n: int = 4, batch_size: int = 4, seed: int = 1, seq: int = SEQ) -> list[dict]:
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(3, VOCAB, (batch_size, seq), generator=gen)
        lengths = torch.randint(seq // 3, seq + 1, (batch_size,), generator=gen)
        mask = (torch.arange(seq)[None, :] < lengths[:, None]).long()
        out.append({"input_ids": ids.masked_fill(mask == 0, 0), "attention_mask": mask,
                    "labels": torch.randint(0, 2, (batch_size,), generator=gen)})  # fmt: skip
    return out


def random_orthogonal(n: int, seed: int = 0, dtype=torch.float64) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    q, r = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=torch.float64))
    return (q * torch.sign(torch.diagonal(r))).to(dtype)
