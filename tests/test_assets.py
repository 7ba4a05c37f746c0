"""The offline assets are real: pretrained weights that behave like it, data that parses."""

import pytest
import torch

pytestmark = pytest.mark.slow


def test_minilm_is_a_pretrained_sequence_classifier(asset):
    from transformers import AutoModel, AutoModelForSequenceClassification, AutoTokenizer

    path = asset("minilm")
    tokenizer = AutoTokenizer.from_pretrained(path)
    batch = tokenizer(["a gripping, beautiful film", "a dull and lifeless movie"], padding=True, return_tensors="pt")
    classifier = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2).eval()
    assert classifier.config.model_type == "bert" and classifier.config.num_hidden_layers == 6
    with torch.no_grad():
        logits = classifier(**batch).logits
    assert logits.shape == (2, 2) and torch.isfinite(logits).all()

    # Pretrained, not random: mean-pooled embeddings put paraphrases closer than unrelated text.
    encoder = AutoModel.from_pretrained(path).eval()
    sentences = ["The cat sits on the mat.", "A cat is sitting on a mat.", "Stock markets fell sharply today."]
    enc = tokenizer(sentences, padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = encoder(**enc).last_hidden_state
    mask = enc["attention_mask"].unsqueeze(-1).float()
    emb = torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)
    assert emb[0] @ emb[1] > emb[0] @ emb[2] + 0.3


def test_smollm2_generates_with_its_chat_template(asset):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = asset("smollm2")
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    assert model.config.model_type == "llama"
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}], add_generation_prompt=True, tokenize=False
    )
    assert "<|im_start|>assistant" in prompt
    inputs = tokenizer(prompt, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=12, do_sample=False)
    answer = tokenizer.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    assert "Paris" in answer, answer


def test_movie_reviews_parse_with_their_scores(asset):
    from sparsegrad.suite.run.assets import load_movie_reviews

    asset("movie_reviews")
    rows = load_movie_reviews()
    assert len(rows) == 10_605
    scores = [score for _, score, _ in rows]
    assert min(scores) >= -4 and max(scores) <= 4
    assert sum(s > 0 for s in scores) == 5_242 and sum(s < 0 for s in scores) == 5_326
    assert sum(s == 0 for s in scores) == 37
    assert all(text for _, _, text in rows) and len({rid for rid, _, _ in rows}) == len(rows)


def test_chatterbot_conversations_alternate_turns(asset):
    from sparsegrad.suite.run.assets import chatterbot_messages

    asset("chatterbot")
    conversations = chatterbot_messages()
    assert len(conversations) > 1_900
    for conv in conversations:
        assert len(conv) >= 2 and conv[0]["role"] == "user"
        assert all(a["role"] != b["role"] for a, b in zip(conv, conv[1:]))
        assert all(m["content"] for m in conv)
