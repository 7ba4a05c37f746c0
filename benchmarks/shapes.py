"""The model shapes and the synthetic batches every benchmark run trains on.

Models are built from architecture configs with random weights (no download), except MiniLM and
SmolLM2 with ``pretrained`` when the asset cache holds them. Batches are random token ids, padded to
the real length distribution of the movie-review sentences (``padding="movie"``) or full
(``padding="none"``).
"""

from __future__ import annotations

import random

# Token counts of the 10,605 movie-review sentences under the MiniLM (bert-base-uncased) tokenizer,
# [CLS] and [SEP] included: length -> number of sentences. Used when the asset is not available.
MOVIE_LENGTHS = {
    4: 7, 5: 22, 6: 56, 7: 82, 8: 113, 9: 142, 10: 167, 11: 201, 12: 218, 13: 233, 14: 250, 15: 242,
    16: 276, 17: 271, 18: 347, 19: 342, 20: 339, 21: 313, 22: 350, 23: 377, 24: 368, 25: 339, 26: 382,
    27: 368, 28: 385, 29: 351, 30: 303, 31: 312, 32: 314, 33: 272, 34: 266, 35: 252, 36: 283, 37: 232,
    38: 184, 39: 188, 40: 174, 41: 184, 42: 133, 43: 129, 44: 118, 45: 104, 46: 95, 47: 76, 48: 61,
    49: 59, 50: 48, 51: 36, 52: 58, 53: 45, 54: 31, 55: 28, 56: 12, 57: 19, 58: 9, 59: 8, 60: 6, 61: 2,
    62: 8, 63: 5, 64: 4, 65: 1, 66: 1, 67: 1, 68: 1, 72: 1, 79: 1,
}  # fmt: skip

# Architecture configs (random init; no download). bert/roberta: transformers defaults = base size.
MODEL_SHAPES = {
    "minilm": {"model_type": "bert", "hidden_size": 384, "num_hidden_layers": 6, "num_attention_heads": 12,
               "intermediate_size": 1536, "vocab_size": 30522},
    "bert-base": {"model_type": "bert"},
    "roberta-base": {"model_type": "roberta", "vocab_size": 50265, "max_position_embeddings": 514,
                     "pad_token_id": 1, "bos_token_id": 0, "eos_token_id": 2, "type_vocab_size": 1},
    "smollm2": {"model_type": "llama", "hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30,
                "num_attention_heads": 9, "num_key_value_heads": 3, "vocab_size": 49152, "head_dim": 64,
                "tie_word_embeddings": True, "pad_token_id": 2, "rms_norm_eps": 1e-5},
    "llama2-7b": {"model_type": "llama", "hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
                  "num_attention_heads": 32, "num_key_value_heads": 32, "vocab_size": 32000,
                  "tie_word_embeddings": False, "pad_token_id": 0},
    # tiny shapes for the harness tests
    "tiny-bert": {"model_type": "bert", "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
                  "intermediate_size": 64, "vocab_size": 1000},
    "tiny-llama": {"model_type": "llama", "hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 4,
                   "num_attention_heads": 2, "num_key_value_heads": 2, "vocab_size": 1000, "pad_token_id": 0,
                   "tie_word_embeddings": False},
}  # fmt: skip
# The paper's settings per family: LoRA rank and k (Table 5/6 budgets); LLaMA: every 3rd block, MLP only.
FAMILY = {
    "bert": {"lora_rank": 7, "k": 28000 / (768 * 3072), "every_nth_block": None, "train_non_mlp": True},
    "roberta": {"lora_rank": 7, "k": 28000 / (768 * 3072), "every_nth_block": None, "train_non_mlp": True},
    "llama": {"lora_rank": 32, "k": 100000 / (4096 * 11008), "every_nth_block": 3, "train_non_mlp": False},
}




def movie_lengths(n: int, seq: int, seed: int) -> list[int]:
    """``n`` sequence lengths drawn from the real movie-sentence length distribution, capped at seq."""
    rng = random.Random(seed)
    lengths, counts = zip(*sorted(MOVIE_LENGTHS.items()))
    return [min(seq, x) for x in rng.choices(lengths, weights=counts, k=n)]


def real_movie_lengths() -> list[int] | None:
    """Token counts of the movie sentences with the MiniLM tokenizer, or None without the assets."""
    try:
        from transformers import AutoTokenizer

        from sparsegrad.suite.run.assets import asset_path, load_movie_reviews

        tok = AutoTokenizer.from_pretrained(asset_path("minilm"))
        return [len(ids) for ids in tok([t for _, _, t in load_movie_reviews()])["input_ids"]]
    except Exception:  # noqa: BLE001 - any missing asset or tokenizer problem: use the stored histogram
        return None


def make_batches(spec, config, n: int, seed: int, trim: bool = False) -> list[dict]:
    """``n`` batches of random token ids with the spec's padding; ``trim``: cut to the longest row."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    causal = config.model_type == "llama"
    pad_id = config.pad_token_id if config.pad_token_id is not None else 0
    batches = []
    for i in range(n):
        if spec.padding == "movie":
            lengths = torch.tensor(movie_lengths(spec.batch, spec.seq, seed * 1000 + i))
        elif spec.padding == "none":
            lengths = torch.full((spec.batch,), spec.seq)
        else:
            raise ValueError(f"unknown padding {spec.padding!r}; valid: movie, none")
        seq = int(lengths.max()) if trim else spec.seq
        ids = torch.randint(5, config.vocab_size, (spec.batch, seq), generator=gen)
        mask = (torch.arange(seq)[None, :] < lengths[:, None]).long()
        ids = ids.masked_fill(mask == 0, pad_id)
        batch = {"input_ids": ids, "attention_mask": mask}
        if causal:
            batch["labels"] = ids.masked_fill(mask == 0, -100)
        else:
            batch["labels"] = torch.randint(0, 2, (spec.batch,), generator=gen)
        batches.append(batch)
    return batches


def build_model(spec):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

    if spec.model not in MODEL_SHAPES:
        raise ValueError(f"unknown model {spec.model!r}; valid: {', '.join(MODEL_SHAPES)}")
    shape = dict(MODEL_SHAPES[spec.model])
    model_type = shape.pop("model_type")
    if spec.layers:
        shape["num_hidden_layers"] = spec.layers
    dtype = getattr(torch, spec.dtype)
    causal = model_type == "llama"
    source = "random init from the architecture config"
    model = None
    if spec.pretrained and spec.model in ("minilm", "smollm2"):
        try:
            from sparsegrad.suite.run.assets import asset_path

            path = asset_path(spec.model)
            kwargs = {"num_hidden_layers": spec.layers} if spec.layers else {}
            if causal:
                model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, **kwargs)
            else:
                model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2, dtype=dtype, **kwargs)
            source = f"pretrained weights from {path}"
        except Exception as exc:  # noqa: BLE001 - fall back to the config shape
            source = f"random init (pretrained asset unavailable: {type(exc).__name__})"
            model = None
    if model is None:
        torch.manual_seed(spec.seed)
        if causal:
            config = AutoConfig.for_model(model_type, **shape)
        else:
            config = AutoConfig.for_model(model_type, num_labels=2, **shape)
        auto = AutoModelForCausalLM if causal else AutoModelForSequenceClassification
        with torch.device(spec.device):  # initialise on the device: a 7B-shaped layer stack in seconds
            model = auto.from_config(config)
        if dtype != torch.float32:
            model = model.to(dtype)
    if causal and model.config.pad_token_id is None:
        model.config.pad_token_id = 0
    return model, source



def family_of(model) -> dict:
    """The paper's settings (LoRA rank, k, trained blocks) for the model's architecture family."""
    return FAMILY["llama" if model.config.model_type == "llama" else model.config.model_type]
