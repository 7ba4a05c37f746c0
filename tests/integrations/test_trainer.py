"""transformers.Trainer trains SparseGrad, MeProp and leading-block models exactly as a plain loop does:
clipping on and off, gradient accumulation, resume from a checkpoint, one owner of the schedule."""

import logging

import pytest
import torch
from method_fixtures import make_batches, make_model
from transformers import Trainer, TrainingArguments

import sparsegrad

logging.getLogger("transformers").setLevel(logging.ERROR)

METHODS = {
    "sparsegrad": {"name": "sparsegrad", "k": 0.05},
    "sparsegrad_rotated": {"name": "sparsegrad", "k": 0.05, "storage": "rotated"},
    "meprop": {"name": "meprop", "k": 0.05},
    "leading_block": {"name": "leading_block", "k": 0.05, "block_factor": 2.0},
}
STEPS, ACCUMULATION, MICRO = 4, 2, 2
LR = 1e-2


@pytest.fixture(scope="module")
def data():
    batches = make_batches("bert", n=STEPS * ACCUMULATION, batch_size=MICRO, seed=3)
    rows = [{k: v[i] for k, v in b.items()} for b in batches for i in range(MICRO)]
    basis = sparsegrad.estimate_basis(make_model("bert"), batches[:2], steps=2)
    return batches, rows, basis


def fresh(method, basis, **overrides):
    return sparsegrad.apply_method(make_model("bert"), {**METHODS[method], **overrides}, basis=basis)


def args(out, max_grad_norm, **kw):
    kw = {"save_strategy": "no", **kw}
    return TrainingArguments(
        str(out), per_device_train_batch_size=MICRO, gradient_accumulation_steps=ACCUMULATION,
        max_steps=STEPS, learning_rate=LR, max_grad_norm=max_grad_norm, use_cpu=True, report_to=[],
        train_sampling_strategy="sequential", logging_steps=1, disable_tqdm=True, **kw,
    )  # fmt: skip


def plain_loop(model, optimizer, batches, clip_dense=None):
    """What Trainer does with these arguments: per optimizer step, the summed losses of the micro-batches
    (Trainer passes num_items_in_batch to the model and does not average them for this model)."""
    for step in range(STEPS):
        for batch in batches[step * ACCUMULATION : (step + 1) * ACCUMULATION]:
            model(**batch).loss.backward()
        if clip_dense:
            torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.grad is not None], clip_dense)
        optimizer.step()
        optimizer.zero_grad()
    return model


def assert_same_parameters(a, b, atol=1e-6):
    sa, sb = a.state_dict(), b.state_dict()
    # a rotated layer saves its cached W only while the cache is valid (a forward since the last step)
    assert all("effective_weight" in key for key in sa.keys() ^ sb.keys()), sa.keys() ^ sb.keys()
    for key in sa.keys() & sb.keys():
        if sa[key].is_floating_point():
            torch.testing.assert_close(sa[key], sb[key], rtol=0, atol=atol, msg=key)
        else:
            assert torch.equal(sa[key], sb[key]), key


@pytest.mark.parametrize("max_grad_norm", [0.0, 0.05])
@pytest.mark.parametrize("method", list(METHODS))
def test_trainer_trains_like_a_plain_loop(method, max_grad_norm, data, tmp_path):
    batches, rows, basis = data
    model = fresh(method, basis)
    optimizer = sparsegrad.build_optimizer(model, lr=LR, total_steps=STEPS)
    trainer = sparsegrad.prepare_trainer(Trainer(
        model=model, args=args(tmp_path, max_grad_norm), train_dataset=rows, optimizers=(optimizer, None)))  # fmt: skip
    trainer.train()
    reference = fresh(method, basis)
    plain_loop(reference, sparsegrad.build_optimizer(reference, lr=LR, total_steps=STEPS, max_grad_norm=max_grad_norm),
               batches)  # fmt: skip
    assert_same_parameters(model, reference)
    logged = [h for h in trainer.state.log_history if "grad_norm" in h]
    assert len(logged) == STEPS and all(h["grad_norm"] > 0 for h in logged)
    if max_grad_norm:
        assert max(h["grad_norm"] for h in logged) > max_grad_norm  # the clipping was active


@pytest.mark.parametrize("method", list(METHODS))
def test_trainer_resume_from_checkpoint_equals_an_uninterrupted_run(method, data, tmp_path):
    batches, rows, basis = data

    def trainer_for(model, out):
        optimizer = sparsegrad.build_optimizer(model, lr=LR, total_steps=STEPS)
        return sparsegrad.prepare_trainer(Trainer(
            model=model, args=args(out, 0.05, save_strategy="steps", save_steps=2), train_dataset=rows,
            optimizers=(optimizer, None)))  # fmt: skip

    full = fresh(method, basis)
    trainer_for(full, tmp_path / "a").train()
    resumed = fresh(method, basis)
    trainer_for(resumed, tmp_path / "b").train(resume_from_checkpoint=str(tmp_path / "a" / "checkpoint-2"))
    assert_same_parameters(resumed, full)


@pytest.mark.parametrize("method", ["sparsegrad", "meprop", "leading_block"])
def test_plain_trainer_with_topk_per_optimizer_step(method, data, tmp_path):
    """topk_at="step": dense gradients until the optimizer step, so Trainer's own clipping works without
    prepare_trainer (it clips the whole dense gradient, then the optimizer takes the top-k)."""
    batches, rows, basis = data
    model = fresh(method, basis, topk_at="step")
    optimizer = sparsegrad.build_optimizer(model, lr=LR, total_steps=STEPS)
    Trainer(model=model, args=args(tmp_path, 0.05), train_dataset=rows, optimizers=(optimizer, None)).train()
    reference = fresh(method, basis, topk_at="step")
    plain_loop(reference, sparsegrad.build_optimizer(reference, lr=LR, total_steps=STEPS), batches, clip_dense=0.05)
    assert_same_parameters(model, reference)
    # the top-k was taken once per optimizer step from the accumulated gradient: at most k new coordinates
    layers = [m for m in model.modules() if hasattr(m, "select_gradient")]
    assert layers
    for layer in layers:
        if hasattr(layer, "num_updated"):
            assert 0 < layer.num_updated() <= STEPS * layer.k


def test_one_owner_of_the_learning_rate(data, tmp_path):
    batches, rows, basis = data
    # the optimizer's own schedule and a different one from Trainer (warm-up): refused at once
    model = fresh("sparsegrad", basis)
    optimizer = sparsegrad.build_optimizer(model, lr=LR, total_steps=STEPS)
    trainer = sparsegrad.prepare_trainer(Trainer(
        model=model, args=args(tmp_path, 0.0, warmup_steps=2), train_dataset=rows, optimizers=(optimizer, None)))  # fmt: skip
    with pytest.raises(RuntimeError, match="own learning-rate schedule.*schedule=None"):
        trainer.train()
    # schedule=None: Trainer's scheduler drives the optimizer
    model = fresh("sparsegrad", basis)
    optimizer = sparsegrad.build_optimizer(model, lr=LR, schedule=None)
    trainer = sparsegrad.prepare_trainer(Trainer(
        model=model, args=args(tmp_path, 0.0, warmup_steps=2), train_dataset=rows, optimizers=(optimizer, None)))  # fmt: skip
    trainer.train()
    lrs = [h["learning_rate"] for h in trainer.state.log_history if "learning_rate" in h]
    assert lrs == pytest.approx([0.0, LR / 2, LR, LR / 2])


@pytest.mark.parametrize(("method", "max_grad_norm"), [("sparsegrad", 0.05), ("meprop", 0.0), ("leading_block", 0.05)])
def test_plain_trainer_with_sparse_gradients_trains_like_a_plain_loop(method, max_grad_norm, data, tmp_path):
    """No prepare_trainer: Trainer's own clipping and grad-norm logging take the k-sparse COO gradients
    (sparsegrad registers torch's missing norm kernel for them) and train as the plain loop does."""
    batches, rows, basis = data
    model = fresh(method, basis)
    optimizer = sparsegrad.build_optimizer(model, lr=LR, total_steps=STEPS)
    trainer = Trainer(model=model, args=args(tmp_path, max_grad_norm), train_dataset=rows, optimizers=(optimizer, None))
    trainer.train()
    reference = fresh(method, basis)
    plain_loop(reference, sparsegrad.build_optimizer(reference, lr=LR, total_steps=STEPS, max_grad_norm=max_grad_norm),
               batches)  # fmt: skip
    assert_same_parameters(model, reference)
    logged = [h["grad_norm"] for h in trainer.state.log_history if "grad_norm" in h]
    assert len(logged) == STEPS and all(norm > 0 for norm in logged)


@pytest.mark.parametrize("topk_at", ["backward", "step"])
def test_trainer_given_no_optimizer_names_build_optimizer(topk_at, data, tmp_path):
    """Trainer builds AdamW when given no optimizer: refused before its first step, with the fix. (With
    topk_at="step" AdamW would otherwise train every entry of the dense gradient, silently.)"""
    batches, rows, basis = data
    model = fresh("sparsegrad", basis, topk_at=topk_at)
    before = {k: v.detach().clone() for k, v in model.named_parameters()}
    trainer = Trainer(model=model, args=args(tmp_path, 1.0), train_dataset=rows)
    with pytest.raises(RuntimeError, match=r"^AdamW cannot train SparseGradLinear.*sparsegrad\.build_optimizer\(model"):
        trainer.train()
    assert all(torch.equal(v, before[k]) for k, v in model.named_parameters())  # no step was taken
    # the same check for any loop; optimizers that take sparse gradients stay allowed where they did
    model = fresh("meprop", basis)
    model(**batches[0]).loss.backward()
    with pytest.raises(RuntimeError, match="Adam cannot train MePropLinear, which has a k-sparse COO"):
        torch.optim.Adam([p for p in model.parameters() if p.requires_grad]).step()
    torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=LR).step()
