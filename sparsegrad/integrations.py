"""Training SparseGrad models with the Hugging Face tools: ``transformers.Trainer`` (and its subclasses,
TRL's ``SFTTrainer``) and data parallelism.

Trainer takes the optimizer as it is: ``Trainer(..., optimizers=(sparsegrad.build_optimizer(model, ...),
None))``, and nothing else is needed. What the optimizer needs from Trainer:

* **Gradient norm.** Trainer computes the global gradient norm before every optimizer step (to clip it
  when ``max_grad_norm > 0``, and to log it always) with ``torch.nn.utils.clip_grad_norm_``, which
  calls ``torch.linalg.vector_norm`` on every gradient; torch has no kernel of it for the sparse COO
  gradients of ``topk_at="backward"`` layers. This module registers one (through ``torch.library``,
  for the SparseCPU and SparseCUDA backends, only where torch has none): the norm of the coalesced
  values, i.e. of the dense-equivalent tensor, for every ``ord``. Clipping then scales the COO values
  (torch's ``mul_`` handles them). :func:`prepare_trainer` (no longer needed) routes both steps through
  :func:`sparsegrad.clip_grad_norm` instead, which sums the squares in float64. Layers built with
  ``topk_at="step"`` keep dense gradients until the optimizer step, so Trainer clips the whole dense
  gradient, before the top-k.
* **The optimizer itself.** Given no optimizer, Trainer builds torch's AdamW, which cannot step a
  k-sparse gradient (and for ``topk_at="step"`` layers would silently train every entry of the
  dense one). A global optimizer step pre-hook (``torch.optim.optimizer.register_optimizer_step_pre_hook``)
  refuses, before the first step, any optimizer other than sparsegrad's that is about to step the
  sparse-gradient parameter of a layer :func:`sparsegrad.apply_method` swapped in, naming
  :func:`sparsegrad.build_optimizer`. Optimizers that take sparse gradients (``torch.optim.SparseAdam``,
  ``SGD``, ``Adagrad``) stay allowed on ``topk_at="backward"`` layers, as before (storage "rotated"
  trains with them; storage "weight" refuses them at the next forward).
* **Learning-rate schedule.** Build the optimizer with ``schedule=None`` and Trainer's scheduler
  (``lr_scheduler_type``, ``warmup_steps``) drives it; an optimizer that runs its own schedule raises
  at the first step where another scheduler set a different learning rate.

Data parallelism (DistributedDataParallel, ``accelerate launch``, Trainer under ``torchrun``) has two
modes, chosen by the method's ``topk_at``:

* ``"backward"`` (the default, the paper's rule): each process keeps its own top-k in every backward
  pass; DDP leaves the sparse weights alone (:func:`sparsegrad.prepare_data_parallel`, which
  :func:`sparsegrad.apply_method` runs on the model it returns) and the k COO entries of every process
  are summed by :mod:`sparsegrad.data_parallel`: at the end of each backward pass in which DDP
  synchronises (so Trainer's clipping and logged norm see the sum), or else at clipping or the
  optimizer step of :func:`sparsegrad.build_optimizer`. N processes end where one process accumulating
  their N micro-batches would; k entries per process and weight go over the wire.
* ``"step"``: the gradients stay dense through DDP's all-reduce and the top-k is taken once per
  optimizer step from the whole batch's gradient: every replica selects the same coordinates, and the
  result is that of one process on the concatenated batch, at the price of a dense all-reduce and one
  rotation per step.
"""

from __future__ import annotations

import weakref

import torch
from torch import nn
from torch.optim.optimizer import register_optimizer_step_pre_hook
from torch.utils.weak import WeakIdKeyDictionary

from sparsegrad.data_parallel import exchange_pending
from sparsegrad.lazy_adam import LazySparseAdam
from sparsegrad.optim import SparseGradOptimizer, clip_grad_norm
from sparsegrad.registry import swapped_modules

__all__ = ["prepare_trainer", "watch_sparse_parameters"]


# ------------------------------------------------------------------------ norm of a sparse COO tensor
def _sparse_vector_norm(x, ord=2, dim=None, keepdim=False, *, dtype=None):
    """``torch.linalg.vector_norm`` of a sparse COO tensor: that of its dense equivalent.

    Over the whole tensor, it is the norm of the coalesced values (duplicate coordinates summed), with
    one zero appended when some entries are not stored, which is what the implicit zeros contribute for
    every ``ord`` (none for ord > 0 and inf; 0 for ord <= 0 and -inf). A norm over some dimensions is
    taken on the dense tensor."""
    if dim is not None and sorted(d % x.dim() for d in ([dim] if isinstance(dim, int) else dim)) != list(range(x.dim())):
        return torch.linalg.vector_norm(x.to_dense(), ord, dim, keepdim, dtype=dtype)
    values = x.coalesce().values().reshape(-1)
    if values.numel() < x.numel():
        values = torch.cat([values, values.new_zeros(1)])
    norm = torch.linalg.vector_norm(values, ord, dtype=dtype)
    return norm.reshape([1] * x.dim()) if keepdim else norm


_NORM_LIBRARY = torch.library.Library("aten", "IMPL")
for _backend in ("SparseCPU", "SparseCUDA"):
    if not torch._C._dispatch_has_kernel_for_dispatch_key("aten::linalg_vector_norm", _backend):
        _NORM_LIBRARY.impl("linalg_vector_norm", _sparse_vector_norm, _backend)


# ------------------------------------------------------------- an optimizer that is not sparsegrad's
# The sparse-gradient parameters of the layers apply_method swapped in: parameter -> its layer (weakly).
_WATCHED: WeakIdKeyDictionary = WeakIdKeyDictionary()
_OURS = (SparseGradOptimizer, LazySparseAdam)
_TAKE_SPARSE_GRADIENTS = (torch.optim.SparseAdam, torch.optim.SGD, torch.optim.Adagrad)


def watch_sparse_parameters(model: nn.Module) -> None:
    """Let the optimizer check know the sparse-gradient parameters of ``model``'s swapped layers
    (called by :func:`sparsegrad.apply_method`)."""
    for _, module, method in swapped_modules(model):
        param = method.sparse_parameter(module)
        if param is not None:
            _WATCHED[param] = weakref.ref(module)


def _refuse_foreign_optimizer(optimizer, args, kwargs) -> None:
    if isinstance(optimizer, _OURS) or not _WATCHED:
        return
    for group in optimizer.param_groups:
        for param in group["params"]:
            layer = _WATCHED.get(param) if param.grad is not None else None
            layer = layer() if layer is not None else None
            if layer is None:
                continue
            step = getattr(layer, "topk_at", "backward") == "step"
            if not step and isinstance(optimizer, _TAKE_SPARSE_GRADIENTS):
                continue
            why = ("keeps its gradient dense until sparsegrad's optimizer takes the top-k (topk_at='step'), so "
                   "this one would train every entry" if step else "has a k-sparse COO weight gradient")  # fmt: skip
            raise RuntimeError(
                f"{type(optimizer).__name__} cannot train {type(layer).__name__}, which {why}: build the optimizer "
                "with optimizer = sparsegrad.build_optimizer(model, lr=..., schedule=None) and pass it as "
                "transformers.Trainer(..., optimizers=(optimizer, None)) (given no optimizer, Trainer builds AdamW)"
            )


_GUARD = register_optimizer_step_pre_hook(_refuse_foreign_optimizer)


def prepare_trainer(trainer):
    """Let ``trainer`` (a ``transformers.Trainer`` or subclass) clip and log sparse gradients with
    :func:`sparsegrad.clip_grad_norm` (no longer needed: Trainer's own clipping handles them, see the
    module docstring; kept for code that calls it).

    Returns the trainer. Replaces the two gradient-norm steps of its training loop by
    :func:`sparsegrad.clip_grad_norm`: clipping to ``args.max_grad_norm`` when it is > 0 (0 means no
    clipping, as in Trainer) and the logged ``grad_norm``, with the squares summed in float64. The
    result is Trainer's own to float32 rounding. Under data parallelism the processes' top-k entries
    are summed first if they are not yet (before the mixed-precision unscaling too), so every process
    clips the same gradient by the same norm.
    """
    if not (hasattr(trainer, "_clip_grad_norm") and hasattr(trainer, "_get_grad_norm")):
        raise TypeError(
            f"prepare_trainer expects a transformers.Trainer (or a subclass such as trl.SFTTrainer), got "
            f"{type(trainer).__name__}; this transformers version may name its gradient-norm steps differently"
        )

    def parameters(model):
        return [p for p in model.parameters() if p.grad is not None]

    def clip(model):
        exchange_pending(model.parameters())
        trainer.accelerator.unscale_gradients()
        return clip_grad_norm(parameters(model), trainer.args.max_grad_norm)

    def grad_norm(model, grad_norm=None):
        if grad_norm is None:
            exchange_pending(model.parameters())
            grad_norm = clip_grad_norm(parameters(model), float("inf"))
        return grad_norm.item() if isinstance(grad_norm, torch.Tensor) else grad_norm

    trainer._clip_grad_norm = clip
    trainer._get_grad_norm = grad_norm
    return trainer
