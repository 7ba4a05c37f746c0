"""The library example in README.md runs as written (on a tiny random BERT instead of roberta-base)."""

import re
from pathlib import Path

import torch
from transformers import BertConfig, BertForSequenceClassification

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_library_example_trains_and_merges(tmp_path, monkeypatch):
    snippet = re.search(r"```python\n(.*?)```", README.read_text(), re.S).group(1)
    torch.manual_seed(0)
    model = BertForSequenceClassification(
        BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                   intermediate_size=64, num_labels=2)
    )
    ids = torch.randint(1, 50, (8, 12))
    batches = [{"input_ids": ids, "labels": torch.randint(0, 2, (8,))} for _ in range(3)]

    # The README loads roberta-base and has a training loop elided with "..."; stand in for both.
    snippet = snippet.replace('AutoModelForSequenceClassification.from_pretrained("roberta-base", num_labels=2)', "model")
    snippet = snippet.replace("k\": 28_000", "k\": 0.05").replace("...  #", "train(model, optimizer)  #")
    losses = []

    def train(m, optimizer):
        for batch in batches * 3:
            loss = m(**batch).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            losses.append(loss.item())

    monkeypatch.chdir(tmp_path)
    scope = {"model": model, "batches": batches, "train": train}
    exec(compile(snippet, str(README), "exec"), scope)
    merged = scope["model"]
    assert losses[-1] < losses[0]
    assert all(type(m) in (torch.nn.Linear,) for n, m in merged.named_modules() if n.endswith("intermediate.dense"))
    reloaded = BertForSequenceClassification.from_pretrained(tmp_path / "out").eval()
    merged.eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids).logits, merged(input_ids=ids).logits)
