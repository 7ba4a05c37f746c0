"""Small tokenizers built on the spot for the tiny random models (no Hub, no asset cache).

The vocabulary is built in Python, deterministically: the special tokens, every character seen
(alone and as a ``##`` continuation), then the most frequent lower-cased words (ties broken
alphabetically). The ``tokenizers`` trainers are not used on purpose: their Rust hash maps order
equally frequent merges differently from one call to the next, so two runs with the same seed got
different token ids and different metrics. Each family keeps its own special tokens and input
format: [CLS] a [SEP] b [SEP] with token types for BERT, <s> a </s></s> b </s> for RoBERTa, and
ChatML markers for LLaMA.
"""

from __future__ import annotations

import re
from collections import Counter

_WORD = re.compile(r"\w+|[^\w\s]", re.UNICODE)

SPECIALS = {
    "bert": ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"],
    "roberta": ["<s>", "<pad>", "</s>", "<unk>", "<mask>"],
    "llama": ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|pad|>"],
}
UNK = {"bert": "[UNK]", "roberta": "<unk>", "llama": "<|endoftext|>"}


def build_vocab(texts: list[str], specials: list[str], vocab_size: int) -> dict[str, int]:
    words = Counter()
    chars = set()
    for text in texts:
        for word in _WORD.findall(text.lower()):
            words[word] += 1
            chars.update(word)
    vocab = list(specials)
    for ch in sorted(chars):
        vocab.extend([ch, "##" + ch])
    budget = max(0, vocab_size - len(vocab))
    vocab.extend(w for w, _ in sorted(words.items(), key=lambda kv: (-kv[1], kv[0])) if len(w) > 1)
    vocab = vocab[: len(specials) + 2 * len(chars) + budget]
    return {token: i for i, token in enumerate(dict.fromkeys(vocab))}


def train_tokenizer(model_type: str, texts: list[str], vocab_size: int = 1000):
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    if model_type not in SPECIALS:
        raise ValueError(f"no tiny tokenizer for model_type {model_type!r} (bert, roberta, llama)")
    specials = SPECIALS[model_type]
    texts = [t for t in texts if t] + ["user assistant system"]  # chat-template role names
    vocab = build_vocab(texts, specials, vocab_size)
    tok = Tokenizer(models.WordPiece(vocab, unk_token=UNK[model_type], max_input_chars_per_word=64))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    if model_type == "bert":
        tok.post_processor = processors.TemplateProcessing(
            single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
            special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])],
        )
        return PreTrainedTokenizerFast(
            tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]", sep_token="[SEP]",
            mask_token="[MASK]", model_input_names=["input_ids", "token_type_ids", "attention_mask"],
        )
    if model_type == "roberta":
        tok.post_processor = processors.RobertaProcessing(("</s>", vocab["</s>"]), ("<s>", vocab["<s>"]))
        return PreTrainedTokenizerFast(
            tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>",
            cls_token="<s>", sep_token="</s>", mask_token="<mask>", model_input_names=["input_ids", "attention_mask"],
        )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<|im_end|>", pad_token="<|pad|>",
        unk_token="<|endoftext|>", model_input_names=["input_ids", "attention_mask"],
    )
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    return tokenizer
