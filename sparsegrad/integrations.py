"""Training SparseGrad models with the Hugging Face tools: ``transformers.Trainer`` (and its subclasses,
TRL's ``SFTTrainer``) and data parallelism.

Trainer takes the optimizer as it is: ``Trainer(..., optimizers=(sparsegrad.build_optimizer(model, ...),
None))``. What the optimizer needs from Trainer:

* **Gradient norm.** Trainer computes the global gradient norm before every optimizer step (to clip it
  when ``max_grad_norm > 0``, and to log it always) with ``torch.nn.utils.clip_grad_norm_``, which has
  no kernel for the sparse COO gradients of ``topk_at="backward"`` layers. :func:`prepare_trainer`
  (one line) routes both through :func:`sparsegrad.clip_grad_norm`, which takes dense and COO gradients
  together and scales like torch's. Layers built with ``topk_at="step"`` keep dense gradients until the
  optimizer step, so Trainer's own clipping works on them as it is (it then clips the whole dense
  gradient, before the top-k).
* **Learning-rate schedule.** Build the optimizer with ``schedule=None`` and Trainer's scheduler
  (``lr_scheduler_type``, ``warmup_steps``) drives it; an optimizer that runs its own schedule raises
  at the first step where another scheduler set a different learning rate.

Data parallelism (DistributedDataParallel, ``accelerate launch``): apply the method with
``topk_at="step"`` so that the gradients stay dense through DDP's all-reduce and the top-k is taken
once per optimizer step from the whole batch's gradient: every replica selects the same coordinates,
and the result is that of one process on the concatenated batch.
"""

from __future__ import annotations

import torch

from sparsegrad.optim import clip_grad_norm

__all__ = ["prepare_trainer"]


def prepare_trainer(trainer):
    """Let ``trainer`` (a ``transformers.Trainer`` or subclass) clip and log sparse gradients.

    Returns the trainer. Replaces the two gradient-norm steps of its training loop by
    :func:`sparsegrad.clip_grad_norm`: clipping to ``args.max_grad_norm`` when it is > 0 (0 means no
    clipping, as in Trainer) and the logged ``grad_norm``. With dense gradients only, the result is
    the same as Trainer's own.
    """
    if not (hasattr(trainer, "_clip_grad_norm") and hasattr(trainer, "_get_grad_norm")):
        raise TypeError(
            f"prepare_trainer expects a transformers.Trainer (or a subclass such as trl.SFTTrainer), got "
            f"{type(trainer).__name__}; this transformers version may name its gradient-norm steps differently"
        )

    def parameters(model):
        return [p for p in model.parameters() if p.grad is not None]

    def clip(model):
        trainer.accelerator.unscale_gradients()
        return clip_grad_norm(parameters(model), trainer.args.max_grad_norm)

    def grad_norm(model, grad_norm=None):
        if grad_norm is None:
            grad_norm = clip_grad_norm(parameters(model), float("inf"))
        return grad_norm.item() if isinstance(grad_norm, torch.Tensor) else grad_norm

    trainer._clip_grad_norm = clip
    trainer._get_grad_norm = grad_norm
    return trainer
