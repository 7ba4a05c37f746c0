"""SHiRA (peft's fixed random sparse mask) through the registry: its budget against SparseGrad's k,
accounting, training that moves only the mask, and the merge back to a plain model."""

import torch
from method_fixtures import make_batches, make_model

import sparsegrad
from sparsegrad.methods.shira import shira_rank


def test_rank_gives_about_k_entries_per_matrix():
    bert_base = [(3072, 768), (768, 3072)]
    assert shira_rank(28_000, bert_base) == 7  # 7 * 3840 = 26,880 entries: the nearest r (in + out) to 28,000
    assert shira_rank(0.01, bert_base) == 6  # 1% = 23,593 entries -> 6 * 3840 = 23,040
    assert shira_rank(13_440, [(1536, 384), (384, 1536)]) == 7  # minilm's sparse_k = 7 (384 + 1536): exact
    assert shira_rank(1, bert_base) == 1  # at least one
    assert shira_rank(10**9, [(64, 32)]) == 21  # at most what a 64 x 32 matrix holds (21 * 96 <= 2048)


def test_shira_budget_accounting_and_flags():
    k = 2 * (32 + 64)  # r = 2 on the tiny BERT's 64 x 32 and 32 x 64 MLP matrices
    model = sparsegrad.apply_method(make_model("bert"), {"name": "shira", "k": k})
    assert type(model).__name__ == "PeftModel"
    report = sparsegrad.account(model)
    assert report.method == "shira" and [layer.kind for layer in report.sparse_layers] == ["shira"] * 4
    assert all(layer.k == k and layer.updated == 0 for layer in report.sparse_layers)
    flags = dict(model.named_parameters())
    adapters = [n for n in flags if "shira_weight" in n]
    assert len(adapters) == 4 and all(flags[n].requires_grad and flags[n].numel() == k for n in adapters)
    assert report.lora_params == 4 * k  # counted with the adapters
    # the dense trainable parameters exclude the adapters, which are the per-step budget
    assert report.trainable_dense == sum(p.numel() for n, p in flags.items() if p.requires_grad and n not in adapters)
    assert report.trainable_per_step == report.trainable_dense + 4 * k
    frozen = [n for n, p in flags.items() if not p.requires_grad]
    assert frozen and all(n.endswith("base_layer.weight") for n in frozen)  # target W frozen, the rest trains


def test_shira_trains_only_its_mask_and_merges_to_the_same_function():
    batches = make_batches("llama", n=4, seed=3)
    original = make_model("llama", seed=1)
    model = sparsegrad.apply_method(make_model("llama", seed=1), {"name": "shira", "k": 0.05, "train_non_mlp": False})
    masks = {name.removeprefix("base_model.model."): m.shira_indices["default"]
             for name, m in model.named_modules() if hasattr(m, "shira_indices")}  # fmt: skip
    opt = sparsegrad.build_optimizer(model, lr=1e-2, schedule="constant")
    losses = []
    for batch in batches[:3] * 2:
        loss = model(**batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[3] < losses[0] and losses[5] < losses[2]  # the same batches, one pass later
    report = sparsegrad.account(model)
    assert all(0 < layer.updated <= layer.k for layer in report.sparse_layers)
    model.eval()
    probe = {key: v for key, v in batches[3].items() if key != "labels"}
    with torch.no_grad():
        before = model(**probe).logits
    merged = sparsegrad.merge(model)
    assert type(merged).__name__ == "LlamaForCausalLM" and not hasattr(merged, "peft_config")
    with torch.no_grad():
        torch.testing.assert_close(merged(**probe).logits, before, rtol=1e-5, atol=1e-5)
    trained = dict(merged.named_parameters())
    assert len(masks) == 4
    for name, p in original.named_parameters():
        change = trained[name].detach() - p.detach()
        layer = name.removesuffix(".weight")
        if layer not in masks:
            assert not change.any(), name  # nothing outside the targets moved
            continue
        on_mask = torch.zeros_like(change, dtype=torch.bool)
        on_mask[masks[layer][0].long(), masks[layer][1].long()] = True
        assert not change[~on_mask].any() and change[on_mask].ne(0).sum() > 0, name
