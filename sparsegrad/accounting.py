"""Parameter accounting: what a method trains, its budget, and what it has actually updated.

``account(model)`` reports, for a model prepared by :func:`sparsegrad.apply_method`:

* ``total_params`` — all parameters (LoRA adapters included);
* ``trainable_dense`` — parameters with ``requires_grad`` whose gradient is dense (everything the
  dense AdamW trains: non-MLP parameters in the encoder setting, biases, LoRA adapters, meProp
  "output"-mode weights, full fine-tuning weights);
* ``lora_params`` — parameters a method added as adapters (LoRA's A and B);
* per sparse layer (SparseGradLinear, MePropLinear "weight" mode, LeadingBlockLinear) its shape, the
  budget ``k`` of gradient entries per step and ``updated`` = the size of the union of weight
  coordinates that have received a gradient entry so far (the coordinates a lazy optimizer has moved;
  LeadingBlockLinear: the entries of its block B that are non-zero, i.e. that have moved from 0);
* ``trainable_per_step = trainable_dense + sum(k)`` — the paper's "#trainable params" comparison
  (LoRA r=7 on a BERT-base MLP pair is (768+3072)*7*2 = 53,760; SparseGrad k=28000 x 2 = 56,000);
* ``master_bytes`` — memory of the float32 master copies the method layers of a bf16/fp16 model keep
  of their trained matrices (buffers ``*_master``; 0 for a float32 model).

What a layer reports is up to the method that swapped it in (``budget`` and ``is_adapter_parameter``
of its :class:`sparsegrad.Method`, found in :mod:`sparsegrad.registry`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from torch import nn

from sparsegrad.registry import registered_methods, swapped_modules

__all__ = ["LayerAccount", "MethodAccount", "account"]


@dataclass
class LayerAccount:
    name: str
    kind: str
    shape: tuple[int, int]
    k: int
    updated: int


@dataclass
class MethodAccount:
    method: str | None
    total_params: int
    trainable_dense: int
    lora_params: int
    sparse_layers: list[LayerAccount] = field(default_factory=list)
    master_bytes: int = 0

    @property
    def budget_total(self) -> int:
        return sum(layer.k for layer in self.sparse_layers)

    @property
    def updated_total(self) -> int:
        return sum(layer.updated for layer in self.sparse_layers)

    @property
    def trainable_per_step(self) -> int:
        return self.trainable_dense + self.budget_total

    def as_dict(self) -> dict:
        out = asdict(self)
        out.update(
            budget_total=self.budget_total,
            updated_total=self.updated_total,
            trainable_per_step=self.trainable_per_step,
        )
        return out


def account(model: nn.Module) -> MethodAccount:
    cfg = getattr(model, "sparsegrad_method", None)
    sparse_layers: list[LayerAccount] = []
    sparse_ids: set[int] = set()
    for name, m, method in swapped_modules(model):
        budget = method.budget(m)
        if budget is None:
            continue
        sparse_layers.append(LayerAccount(name, method.name, tuple(budget.shape), budget.k, budget.updated))
        if budget.param.requires_grad:
            sparse_ids.add(id(budget.param))
    adapters = registered_methods()
    total = trainable = lora = 0
    for name, p in model.named_parameters():
        total += p.numel()
        if any(method.is_adapter_parameter(name) for method in adapters):
            lora += p.numel()
        if p.requires_grad and id(p) not in sparse_ids:
            trainable += p.numel()
    master_bytes = sum(b.numel() * b.element_size() for n, b in model.named_buffers() if n.endswith("_master"))
    return MethodAccount(
        method=getattr(cfg, "name", None), total_params=total, trainable_dense=trainable,
        lora_params=lora, sparse_layers=sparse_layers, master_bytes=master_bytes,
    )  # fmt: skip
