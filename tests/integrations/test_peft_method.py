"""SparseGrad and MeProp as PEFT methods: ``get_peft_model`` with their configs trains exactly as
``apply_method`` does, saves and reloads to the same logits, merges into a plain model, disables, trains
under transformers.Trainer, and is registered with peft after a plain ``import sparsegrad``."""

import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from method_fixtures import make_batches, make_model
from peft import PeftModel, get_peft_model
from peft.tuners.tuners_utils import BaseTunerLayer
from safetensors.torch import load_file
from transformers import Trainer, TrainingArguments

import sparsegrad

logging.getLogger("transformers").setLevel(logging.ERROR)
ROOT = Path(__file__).resolve().parents[2]
STEPS, LR = 3, 2e-2
# the PEFT config and the apply_method config of the same training
METHODS = {
    "sparsegrad": (lambda: sparsegrad.SparseGradConfig(k=0.05), {"name": "sparsegrad", "k": 0.05}),
    "sparsegrad_rotated": (lambda: sparsegrad.SparseGradConfig(k=0.05, storage="rotated"),
                           {"name": "sparsegrad", "k": 0.05, "storage": "rotated"}),
    "sparsegrad_compact": (lambda: sparsegrad.SparseGradConfig(k=0.05, compact_save=True), {"name": "sparsegrad", "k": 0.05}),
    "meprop": (lambda: sparsegrad.MePropConfig(k=0.05), {"name": "meprop", "k": 0.05}),
}  # fmt: skip


def logits(model, batch):
    model.eval()
    with torch.no_grad():
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


def train(model, batches, steps=STEPS):
    optimizer = sparsegrad.build_optimizer(model, lr=LR, schedule="constant")
    model.train()
    for batch in (batches * steps)[:steps]:
        model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return model


def peft_model(method, batches):
    model = get_peft_model(make_model("llama"), METHODS[method][0]())
    if method.startswith("sparsegrad"):
        sparsegrad.initialize_sparsegrad_basis(model, batches, steps=2)
    return model


@pytest.mark.parametrize("method", list(METHODS))
def test_peft_round_trip_train_save_reload_merge(method, tmp_path):
    batches = make_batches("llama", n=3, seed=5)
    model = train(peft_model(method, batches), batches)
    model.print_trainable_parameters()
    trained = logits(model, batches[0])
    with model.disable_adapter():
        torch.testing.assert_close(logits(model, batches[0]), logits(make_model("llama"), batches[0]), rtol=0, atol=0)

    # the same training through apply_method (MLP linears only, as PEFT trains them): the same weights
    basis = sparsegrad.estimate_basis(make_model("llama"), batches, steps=2) if method.startswith("sparsegrad") else None
    reference = train(sparsegrad.apply_method(make_model("llama"), {**METHODS[method][1], "train_non_mlp": False},
                                              basis=basis), batches)  # fmt: skip
    torch.testing.assert_close(trained, logits(reference, batches[0]), rtol=1e-5, atol=1e-5)

    model.save_pretrained(tmp_path)
    saved = load_file(tmp_path / "adapter_model.safetensors")
    n_targets = 2 * 2  # up_proj and down_proj of 2 blocks
    compact = method == "sparsegrad_compact"
    assert sum(key.endswith("_delta.weight") for key in saved) == (0 if compact else n_targets)
    if compact:  # ΔW~ on the coordinates the steps touched: at most STEPS * k per layer
        values = [v for key, v in saved.items() if key.endswith("rotated_values")]
        layers = [m for m in model.modules() if isinstance(m, sparsegrad.SparseGradLinear)]
        assert len(values) == n_targets and all(0 < v.numel() <= STEPS * layers[0].k for v in values)
        assert sum(v.numel() for v in values) == sparsegrad.account(model).updated_total
    if method.startswith("sparsegrad"):  # the basis once per group, not per layer
        assert sorted(k for k in saved if k.startswith("sparsegrad_basis.")) == [
            f"sparsegrad_basis.model.layers.*.mlp.{proj}.{part}"
            for proj in ("down_proj", "up_proj") for part in ("estimated", "u_in", "u_out")]  # fmt: skip
    reloaded = PeftModel.from_pretrained(make_model("llama"), tmp_path)
    # dense: bit for bit; compact: ΔW = u_out ΔW~ R^T computed again, equal to rounding
    torch.testing.assert_close(logits(reloaded, batches[0]), trained, rtol=0, atol=1e-6 if compact else 0)

    merged = reloaded.merge_and_unload()
    assert not any(isinstance(m, BaseTunerLayer) for m in merged.modules())
    assert type(merged.model.layers[0].mlp.up_proj) is torch.nn.Linear
    torch.testing.assert_close(logits(merged, batches[0]), trained, rtol=1e-5, atol=1e-5)


def test_reloaded_adapter_trains_on_in_its_saved_basis(tmp_path):
    batches = make_batches("llama", n=3, seed=6)
    model = train(peft_model("sparsegrad", batches), batches, steps=2)
    model.save_pretrained(tmp_path)
    reloaded = PeftModel.from_pretrained(make_model("llama"), tmp_path, is_trainable=True)
    layer = reloaded.base_model.model.model.layers[1].mlp.up_proj
    original = model.base_model.model.model.layers[1].mlp.up_proj
    assert layer.basis_estimated["default"]
    for part in ("u_in", "u_out"):
        assert torch.equal(getattr(layer.sparsegrad_delta["default"], part),
                           getattr(original.sparsegrad_delta["default"], part))  # fmt: skip
    # the layers of a group share one basis tensor after loading, as after initialisation
    other = reloaded.base_model.model.model.layers[0].mlp.up_proj.sparsegrad_delta["default"]
    assert other.u_out.data_ptr() == layer.sparsegrad_delta["default"].u_out.data_ptr()
    torch.testing.assert_close(logits(train(reloaded, batches[2:], steps=1), batches[0]),
                               logits(train(model, batches[2:], steps=1), batches[0]), rtol=1e-5, atol=1e-5)  # fmt: skip


def test_data_basis_must_be_initialised_before_training():
    batches = make_batches("llama", n=1)
    model = get_peft_model(make_model("llama"), sparsegrad.SparseGradConfig(k=0.05))
    with pytest.raises(RuntimeError, match="initialize_sparsegrad_basis"):
        model(**batches[0]).loss.backward()
    with torch.no_grad():  # inference needs no basis: ΔW = 0
        model(**batches[0])
    basis = sparsegrad.initialize_sparsegrad_basis(model, batches)
    reference = sparsegrad.estimate_basis(make_model("llama"), batches)
    for group, key in (("model.layers.*.mlp.up_proj", "up"), ("model.layers.*.mlp.down_proj", "down")):
        torch.testing.assert_close(basis.groups[group].u_out, reference.groups[key].u_out)
    model(**batches[0]).loss.backward()


def test_trainer_trains_the_peft_model_like_a_plain_loop(tmp_path):
    batches = make_batches("bert", n=STEPS, batch_size=2, seed=3)
    rows = [{k: v[i] for k, v in b.items()} for b in batches for i in range(2)]
    basis = sparsegrad.estimate_basis(make_model("bert"), batches, steps=2)

    def fresh():
        model = get_peft_model(make_model("bert"), sparsegrad.SparseGradConfig(k=0.05))
        sparsegrad.initialize_sparsegrad_basis(model, basis=basis)
        return model

    model = fresh()
    args = TrainingArguments(str(tmp_path), per_device_train_batch_size=2, max_steps=STEPS, learning_rate=LR,
                             max_grad_norm=0.05, use_cpu=True, report_to=[], train_sampling_strategy="sequential",
                             logging_steps=1, disable_tqdm=True, save_strategy="no")  # fmt: skip
    optimizer = sparsegrad.build_optimizer(model, lr=LR, total_steps=STEPS)
    trainer = sparsegrad.prepare_trainer(Trainer(model=model, args=args, train_dataset=rows,
                                                 optimizers=(optimizer, None)))  # fmt: skip
    trainer.train()
    reference = fresh()
    optimizer = sparsegrad.build_optimizer(reference, lr=LR, total_steps=STEPS, max_grad_norm=0.05)
    for batch in batches:
        reference(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    trained = {k: v for k, v in model.state_dict().items() if "sparsegrad_delta" in k and k.endswith(".weight")}
    assert len(trained) == 4 and any(v.abs().sum() > 0 for v in trained.values())
    expected = reference.state_dict()
    for key, value in trained.items():
        torch.testing.assert_close(value, expected[key], rtol=0, atol=1e-6, msg=key)
    account = sparsegrad.account(model)  # the per-step budget, which print_trainable_parameters cannot show
    assert account.budget_total == sum(layer.k for layer in account.sparse_layers) > 0
    assert 0 < account.updated_total <= STEPS * account.budget_total


def test_registered_with_peft_after_a_plain_import(tmp_path):
    batches = make_batches("llama", n=2, seed=7)
    model = train(peft_model("sparsegrad", batches), batches, steps=1)
    model.save_pretrained(tmp_path)
    torch.save(logits(model, batches[0]), tmp_path / "logits.pt")
    script = (
        "import sys\n"
        "import sparsegrad\n"
        "assert 'peft' not in sys.modules and 'torch' not in sys.modules\n"
        "import torch\n"
        "from peft import PeftModel, PeftType\n"
        "from peft.mapping import PEFT_TYPE_TO_TUNER_MAPPING\n"
        "assert {PeftType.SPARSEGRAD, PeftType.MEPROP} <= set(PEFT_TYPE_TO_TUNER_MAPPING)\n"
        "sys.path.insert(0, sys.argv[2])\n"
        "from method_fixtures import make_model\n"
        "model = PeftModel.from_pretrained(make_model('llama'), sys.argv[1]).eval()\n"
        "batch = torch.load(sys.argv[1] + '/batch.pt')\n"
        "with torch.no_grad():\n"
        "    out = model(input_ids=batch['input_ids'], attention_mask=batch['attention_mask']).logits\n"
        "assert torch.equal(out, torch.load(sys.argv[1] + '/logits.pt'))\n"
    )
    torch.save(batches[0], tmp_path / "batch.pt")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-c", script, str(tmp_path), str(ROOT / "tests" / "method")],
                          env=env, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_sft_trainer_trains_the_peft_model(tmp_path):
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    from sparsegrad.suite.run.tiny_tokenizers import train_tokenizer

    texts = ["the cat sat on the mat", "a dog ran in the park", "birds fly over the sea", "the sun is warm today"]
    tokenizer = train_tokenizer("llama", texts, vocab_size=97)
    model = peft_model("sparsegrad", make_batches("llama", n=2))
    optimizer = sparsegrad.build_optimizer(model, lr=LR, schedule=None)
    args = SFTConfig(str(tmp_path), max_length=16, per_device_train_batch_size=2, max_steps=2, use_cpu=True,
                     report_to=[], logging_steps=1, save_strategy="no", disable_tqdm=True, dataset_num_proc=None,
                     max_grad_norm=1.0)  # fmt: skip
    trainer = sparsegrad.prepare_trainer(SFTTrainer(
        model=model, args=args, train_dataset=Dataset.from_list([{"text": t} for t in texts]),
        processing_class=tokenizer, optimizers=(optimizer, None)))  # fmt: skip
    trainer.train()
    norms = [h["grad_norm"] for h in trainer.state.log_history if "grad_norm" in h]
    assert len(norms) == 2 and all(n > 0 for n in norms)
    account = sparsegrad.account(model)
    assert 0 < account.updated_total <= 2 * account.budget_total


def test_readme_peft_snippet_runs_as_written(tmp_path, monkeypatch):
    import re

    section = (ROOT / "README.md").read_text().split("### With PEFT", 1)[1].split("\n### ", 1)[0]
    snippet = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    snippet = snippet.replace("k=28_000", "k=0.05").replace(
        "...  # train", "for batch in batches:\n    model(**batch).loss.backward(); optimizer.step(); optimizer.zero_grad()")
    batches = make_batches("llama", n=3, seed=9)
    monkeypatch.chdir(tmp_path)
    scope = {"model": make_model("llama"), "base_model": make_model("llama"), "batches": batches}
    exec(compile(snippet, "README.md", "exec"), scope)
    merged = scope["model"]
    assert type(merged.model.layers[0].mlp.up_proj) is torch.nn.Linear
    assert not torch.equal(merged.model.layers[0].mlp.up_proj.weight, make_model("llama").model.layers[0].mlp.up_proj.weight)
