"""What the sparse-gradient linear layers share: the option choices, float32 master copies of bf16/fp16
trained matrices, the plain ``nn.Linear`` a layer merges into, the data-parallel check of per-backward
top-k (the exchange itself: :mod:`sparsegrad.data_parallel`) and the context a row-wise linear autograd function saves.

Used by :mod:`sparsegrad.methods.sparsegrad.layer` (SparseGradLinear), :mod:`sparsegrad.methods.meprop.layer` (MePropLinear) and
:mod:`sparsegrad.methods.leading_block.layer` (LeadingBlockLinear); imports nothing of them.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

# registers torch's missing norm kernel for sparse COO gradients (Trainer's clipping) and the check that
# refuses an optimizer that cannot train these layers
from sparsegrad import integrations  # noqa: F401

__all__ = ["ORIENTATIONS", "FORMULATIONS", "STORAGES", "MEPROP_MODES", "TOPK_AT", "needs_master",
           "float32_master", "current_master", "plain_linear", "check_topk_at", "check_data_parallel",
           "save_linear_context", "check_choice", "copy_weight_and_bias", "autocast_off"]  # fmt: skip

ORIENTATIONS = ("hosvd", "official")
FORMULATIONS = ("auto", "regular")
STORAGES = ("weight", "rotated")
MEPROP_MODES = ("weight", "output")
# When the top-k of a weight gradient is taken: in every backward pass (the paper's; the gradient is
# sparse COO from the start, and data-parallel processes exchange only their k entries) or once per
# optimizer step, from the dense gradient summed over the micro-batches and all-reduced by
# DistributedDataParallel (the optimizer takes it).
TOPK_AT = ("backward", "step")


def autocast_off(device: torch.device):
    """A context with autocast off on ``device`` (nothing to turn off on the meta device, where peft builds
    layers without memory)."""
    if device.type == "meta":
        return contextlib.nullcontext()
    return torch.autocast(device.type, enabled=False)


def check_choice(name: str, value: str, valid: tuple[str, ...]) -> None:
    if value not in valid:
        raise ValueError(f"unknown {name} {value!r}; valid: {', '.join(valid)}")


def needs_master(dtype: torch.dtype) -> bool:
    """Whether a trained matrix of this dtype gets a float32 master copy (bf16, fp16)."""
    return dtype.is_floating_point and torch.finfo(dtype).bits < 32


@torch.no_grad()
def float32_master(tensor: torch.Tensor) -> torch.Tensor | None:
    """A float32 copy of a bf16/fp16 ``tensor`` to train in place of it; None for other dtypes."""
    return tensor.detach().to(torch.float32, copy=True) if needs_master(tensor.dtype) else None


@torch.no_grad()
def current_master(module: nn.Module, param_name: str, master_name: str) -> torch.Tensor | None:
    """The float32 master of ``module.<param_name>`` if the parameter is bf16/fp16, else None; created
    from the parameter (and the buffer set) when the module was converted with ``.to()`` after it was
    built, dropped when the parameter is float32 or wider."""
    param, master = getattr(module, param_name), getattr(module, master_name)
    if not needs_master(param.dtype):
        if master is not None:
            setattr(module, master_name, None)
        return None
    if master is None or master.dtype != torch.float32 or master.device != param.device:
        master = float32_master(param)
        setattr(module, master_name, master)
    return master


@torch.no_grad()
def copy_weight_and_bias(layer: nn.Module, linear: nn.Linear) -> None:
    """Copy ``linear``'s weight (and its float32 master, where the layer keeps one) and bias into a new
    layer whose ``weight`` holds W; the bias keeps ``linear``'s ``requires_grad``."""
    layer.weight.copy_(linear.weight)
    if getattr(layer, "weight_master", None) is not None:
        layer.weight_master.copy_(linear.weight)
    if linear.bias is not None:
        layer.bias.copy_(linear.bias)
        layer.bias.requires_grad_(linear.bias.requires_grad)


@torch.no_grad()
def plain_linear(weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Linear:
    """An ``nn.Linear`` holding copies of ``weight`` (out x in) and ``bias``: what ``to_linear`` returns."""
    out_f, in_f = weight.shape
    linear = nn.Linear(in_f, out_f, bias=bias is not None, device=weight.device, dtype=weight.dtype)
    linear.weight.copy_(weight)
    if bias is not None:
        linear.bias.copy_(bias)
    return linear


def check_topk_at(topk_at: str) -> None:
    if topk_at not in TOPK_AT:
        raise ValueError(f"unknown topk_at {topk_at!r}; valid: {', '.join(TOPK_AT)}")


def check_data_parallel(layer: nn.Module, param: torch.Tensor | None) -> None:
    """Under data parallelism, check that a per-backward top-k layer (``topk_at="backward"``) is set up
    for the sparse exchange: its sparse weight ``param`` kept out of DistributedDataParallel
    (:func:`sparsegrad.prepare_data_parallel`) and stepped by an optimizer of
    :func:`sparsegrad.build_optimizer`, which sums every process's top-k entries; inside a DDP forward
    that synchronises, have them summed at the end of its backward pass. ``param`` None: the layer's
    weight gradient is dense and goes through DDP as any other."""
    if param is None or layer.topk_at != "backward" or not param.requires_grad:
        return
    if not (layer.training and torch.is_grad_enabled()):
        return
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return
    ref = getattr(param, "_sparsegrad_exchange", None)
    exchange = ref() if ref is not None else None
    if getattr(param, "_ddp_ignored", False) and exchange is not None:
        ddp = getattr(nn.parallel.DistributedDataParallel, "_active_ddp_module", None)
        if ddp is not None and getattr(ddp, "require_backward_grad_sync", False):
            exchange.sync_after_backward()  # this backward pass all-reduces: exchange at its end
        return
    if not getattr(param, "_ddp_ignored", False):
        problem = ("its sparse weight is not kept out of DistributedDataParallel, which cannot all-reduce a "
                   "sparse gradient: call sparsegrad.prepare_data_parallel(module) on the module you wrap, "
                   "before wrapping it (apply_method does it for the model it returns)")  # fmt: skip
    else:
        problem = ("its sparse weight is in no optimizer from sparsegrad.build_optimizer, which sums the "
                   "processes' top-k entries: build it with sparsegrad.build_optimizer(model, ...)")  # fmt: skip
    raise RuntimeError(
        f"{type(layer).__name__} takes the top-k of its weight gradient in every backward pass "
        f"(topk_at='backward') and {dist.get_world_size()} processes are training, but {problem}. "
        "Data parallelism has two modes. topk_at='backward' (the paper's): each process keeps its own top-k "
        "and only those k entries per process are exchanged; the result is one process accumulating the "
        "processes' micro-batches. topk_at='step': the dense gradient goes through DDP's all-reduce and the "
        "top-k of the whole batch's gradient is taken once per optimizer step; the result is one process on "
        "the concatenated batch, at the cost of a dense all-reduce and a rotation per step "
        "(apply the method with {'topk_at': 'step', ...}; conf: method.topk_at=step)."
    )


def save_linear_context(ctx, x: torch.Tensor, bias, layer, *saved: torch.Tensor) -> None:
    """What the backward of a row-wise linear autograd function needs: the layer, whether there is a
    bias, the input's dtype (dL/dx is returned in it) and the ``saved`` tensors."""
    ctx.layer = layer
    ctx.has_bias = bias is not None
    ctx.x_dtype = x.dtype
    ctx.save_for_backward(*saved)
