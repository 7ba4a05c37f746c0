"""Examples → token ids → padded batches.

Classification and regression examples are tokenised as single sentences or sentence pairs with
truncation to ``max_length``; batches are padded dynamically to their longest member. Chat
examples are rendered with the tokenizer's chat template and only the assistant tokens carry a
loss (every other label is -100); the template's assistant header is part of the prompt, the
assistant's end-of-turn marker is part of the target, so the model learns to stop.
"""

from __future__ import annotations

import torch

IGNORE_INDEX = -100

CHAT_TEMPLATES = {
    # ChatML, as SmolLM2 uses it (without SmolLM2's default system prompt).
    "chatml": (
        "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
        "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    ),
    # The authors' LLaMA-2 OpenAssistant format: "[INST] {prompt} [/INST] {answer} " with a BOS per pair.
    "llama2_inst": (
        "{% for message in messages %}{% if message['role'] == 'user' %}{{ bos_token }}[INST] "
        "{{ message['content'] }} [/INST]{% else %} {{ message['content'] }} {% endif %}{% endfor %}"
    ),
}


def encode_classification(examples: list[dict], tokenizer, max_length: int, chunk: int = 1024) -> list[dict]:
    """Token ids (and type ids where the tokenizer has them) plus the label of each example."""
    features = []
    for start in range(0, len(examples), chunk):
        part = examples[start:start + chunk]
        first = [e["texts"][0] for e in part]
        second = [e["texts"][1] for e in part]
        if any(s is not None for s in second):
            enc = tokenizer(first, ["" if s is None else s for s in second], truncation=True, max_length=max_length)
        else:
            enc = tokenizer(first, truncation=True, max_length=max_length)
        for i, example in enumerate(part):
            feature = {"input_ids": enc["input_ids"][i], "labels": example["label"]}
            if "token_type_ids" in enc:
                feature["token_type_ids"] = enc["token_type_ids"][i]
            features.append(feature)
    return features


def render_chat(tokenizer, messages, add_generation_prompt=False) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


def assistant_spans(tokenizer, messages: list[dict]) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the character spans of the assistant targets in it."""
    text = render_chat(tokenizer, messages)
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = render_chat(tokenizer, messages[:i], add_generation_prompt=True) if i else ""
        upto = render_chat(tokenizer, messages[: i + 1])
        if text.startswith(upto) and upto.startswith(before):
            spans.append((len(before), len(upto)))
        else:  # a template that is not prefix-consistent: fall back to the message text itself
            at = text.find(message["content"], spans[-1][1] if spans else 0)
            if at >= 0:
                spans.append((at, at + len(message["content"])))
    return text, spans


def encode_chat(examples: list[dict], tokenizer, max_length: int) -> list[dict]:
    """Token ids and assistant-only labels; conversations left without any target are dropped."""
    features = []
    for example in examples:
        text, spans = assistant_spans(tokenizer, example["messages"])
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True, truncation=True, max_length=max_length)
        labels = []
        for token_id, (start, end) in zip(enc["input_ids"], enc["offset_mapping"]):
            inside = any(start >= a and end <= b and end > start for a, b in spans)
            labels.append(token_id if inside else IGNORE_INDEX)
        if any(label != IGNORE_INDEX for label in labels[1:]):  # position 0 is never predicted
            features.append({"input_ids": enc["input_ids"], "labels": labels})
    return features


def collate(features: list[dict], pad_token_id: int, regression: bool = False) -> dict[str, torch.Tensor]:
    """Pad a list of features to the longest one (right padding)."""
    length = max(len(f["input_ids"]) for f in features)
    batch = {
        "input_ids": torch.full((len(features), length), pad_token_id, dtype=torch.long),
        "attention_mask": torch.zeros((len(features), length), dtype=torch.long),
    }
    if "token_type_ids" in features[0]:
        batch["token_type_ids"] = torch.zeros((len(features), length), dtype=torch.long)
    sequence_labels = isinstance(features[0]["labels"], list)
    if sequence_labels:
        batch["labels"] = torch.full((len(features), length), IGNORE_INDEX, dtype=torch.long)
    for row, f in enumerate(features):
        n = len(f["input_ids"])
        batch["input_ids"][row, :n] = torch.tensor(f["input_ids"], dtype=torch.long)
        batch["attention_mask"][row, :n] = 1
        if "token_type_ids" in batch:
            batch["token_type_ids"][row, :n] = torch.tensor(f["token_type_ids"], dtype=torch.long)
        if sequence_labels:
            batch["labels"][row, :n] = torch.tensor(f["labels"], dtype=torch.long)
    if not sequence_labels:
        dtype = torch.float32 if regression else torch.long
        batch["labels"] = torch.tensor([f["labels"] for f in features], dtype=dtype)
    return batch


def batch_indices(n: int, batch_size: int, shuffle: bool, generator: torch.Generator | None = None) -> list[list[int]]:
    """Index lists of one epoch; the last batch may be smaller."""
    order = torch.randperm(n, generator=generator).tolist() if shuffle else list(range(n))
    return [order[i:i + batch_size] for i in range(0, n, batch_size)]


def count_target_tokens(batch: dict[str, torch.Tensor]) -> int:
    """Tokens that carry a loss in a causal-LM batch (labels are shifted by one inside the model)."""
    return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
