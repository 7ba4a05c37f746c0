"""TRL's SFTTrainer fine-tunes the offline SmolLM2 on chat conversations with SparseGrad, MeProp and the
leading-block variant (3 MLP blocks of 30, the paper's LLaMA setting): clipping on and off, gradient
accumulation, and resume_from_checkpoint equal to an uninterrupted run."""

import logging

import pytest
import torch

import sparsegrad

pytestmark = pytest.mark.slow
logging.getLogger("transformers").setLevel(logging.ERROR)

METHODS = {
    "sparsegrad": {"name": "sparsegrad", "k": 0.002},
    "meprop": {"name": "meprop", "k": 0.002},
    "leading_block": {"name": "leading_block", "k": 0.002, "block_factor": 2.0},
}
SETTING = {"every_nth_block": 10, "train_non_mlp": False}  # blocks 0, 10, 20: the paper's LLaMA setting


@pytest.fixture(scope="module")
def chat(asset):
    from datasets import Dataset
    from transformers import AutoTokenizer

    from sparsegrad.suite.run.assets import chatterbot_messages

    path = asset("smollm2")
    tokenizer = AutoTokenizer.from_pretrained(path)
    conversations = [c[:2] for c in chatterbot_messages()[:16]]
    dataset = Dataset.from_list([{"messages": c} for c in conversations])
    encoded = [tokenizer.apply_chat_template(c, tokenize=True, return_dict=True, return_tensors="pt")["input_ids"][:, :24]
               for c in conversations[:2]]  # fmt: skip
    basis_batches = [{"input_ids": ids, "labels": ids} for ids in encoded]
    return path, tokenizer, dataset, basis_batches


def sft(chat, method, out, max_grad_norm, max_steps=3, resume=None):
    from transformers import AutoModelForCausalLM
    from trl import SFTConfig, SFTTrainer

    path, tokenizer, dataset, basis_batches = chat
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    model = sparsegrad.apply_method(model, {**METHODS[method], **SETTING}, batches=basis_batches)
    optimizer = sparsegrad.build_optimizer(model, lr=1e-3, schedule=None)
    args = SFTConfig(
        str(out), max_length=32, per_device_train_batch_size=2, gradient_accumulation_steps=2, max_steps=max_steps,
        max_grad_norm=max_grad_norm, use_cpu=True, report_to=[], logging_steps=1, save_strategy="steps",
        save_steps=2, save_only_model=False, train_sampling_strategy="sequential", disable_tqdm=True,
        dataset_num_proc=None,
    )  # fmt: skip
    trainer = SFTTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer,
                         optimizers=(optimizer, None))  # fmt: skip
    sparsegrad.prepare_trainer(trainer)
    trainer.train(resume_from_checkpoint=resume)
    return model, trainer


@pytest.mark.parametrize("method", list(METHODS))
def test_sft_trainer_resumes_exactly(method, chat, tmp_path):
    full, trainer = sft(chat, method, tmp_path / "a", max_grad_norm=0.05)
    norms = [h["grad_norm"] for h in trainer.state.log_history if "grad_norm" in h]
    assert len(norms) == 3 and max(norms) > 0.05  # clipping active
    resumed, _ = sft(chat, method, tmp_path / "b", max_grad_norm=0.05, resume=str(tmp_path / "a" / "checkpoint-2"))
    trained = [n for n, p in full.named_parameters() if p.requires_grad]
    assert trained
    a, b = full.state_dict(), resumed.state_dict()
    for key in a:
        if a[key].is_floating_point():
            torch.testing.assert_close(b[key], a[key], rtol=0, atol=1e-6, msg=key)


def test_sft_trainer_without_clipping_trains(chat, tmp_path):
    model, trainer = sft(chat, "sparsegrad", tmp_path, max_grad_norm=0.0, max_steps=2)
    norms = [h["grad_norm"] for h in trainer.state.log_history if "grad_norm" in h]
    assert len(norms) == 2 and all(n > 0 for n in norms)
    account = sparsegrad.account(model)
    assert account.updated_total > 0
