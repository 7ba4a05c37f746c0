"""SparseGrad's PEFT tuner: :class:`SparseGradModel` (what ``get_peft_model`` builds for a
:class:`~sparsegrad.methods.sparsegrad.config.SparseGradConfig`), its layer :class:`SparseGradLayer`, and
:func:`initialize_sparsegrad_basis`, the data-driven initialisation of the transition basis.

Each adapted linear holds, per adapter, a bias-free :class:`~sparsegrad.SparseGradLinear` with the change
ΔW (see :mod:`sparsegrad.peft_tuner`); its gradient is the k-sparse ``dL/dΔW~ = u_out^T (dL/dW) R``.

The layers of a group share one transition basis (in memory, and once in the saved adapter): the file
holds, per layer, ΔW (storage "weight"; storage "rotated": ΔW~ and ΔW) and the record of updated
coordinates, and per group ``u_in`` and ``u_out`` under ``sparsegrad_basis.<group>.``. With
``compact_save=True`` a layer holds ΔW~ on its updated coordinates instead (indices and values: the
learned sparse matrix itself), and loading computes ΔW = u_out ΔW~ R^T again (equal to rounding).
"""

from __future__ import annotations

import re
import zlib
from collections.abc import Iterable, Mapping

import torch
from torch import nn

from sparsegrad.kernels import mark_bits, new_bitmask, set_bit_positions
from sparsegrad.methods.sparsegrad.basis import Basis, estimate_basis
from sparsegrad.methods.sparsegrad.layer import SparseGradLinear
from sparsegrad.peft_tuner import DeltaLayer, DeltaTuner

__all__ = ["SparseGradLayer", "SparseGradModel", "initialize_sparsegrad_basis", "basis_group"]

_BASIS_KEY = "sparsegrad_basis"
_PEFT_PREFIX = "base_model.model."


def basis_group(module_name: str, per_layer: bool = False) -> str:
    """The basis group of a target: its name with the block index replaced by ``*``
    (``model.layers.3.mlp.up_proj`` -> ``model.layers.*.mlp.up_proj``), or the name itself per layer."""
    name = module_name.removeprefix(_PEFT_PREFIX)
    return name if per_layer else re.sub(r"(?<=\.)\d+(?=\.|$)|^\d+(?=\.)", "*", name)


class SparseGradLayer(DeltaLayer):
    """A linear adapted by SparseGrad: the frozen base layer plus, per adapter, a SparseGradLinear with ΔW.

    ``basis_group[adapter]``: the group whose basis the layer shares; ``basis_estimated[adapter]``:
    whether that basis is the one the config asks for (a ``basis="data"`` adapter refuses to train on
    its placeholder identity basis).
    """

    adapter_layer_names = ("sparsegrad_delta",)
    other_param_names = ("basis_group", "basis_estimated")

    def make_delta(self, start: nn.Linear, config, adapter_name: str, basis=None, group: str = "") -> nn.Module:
        u_in, u_out = basis
        self.basis_group[adapter_name] = group
        self.basis_estimated[adapter_name] = config.basis != "data"
        return SparseGradLinear.from_linear(
            start, u_in, u_out, config.k, orientation=config.orientation, storage=config.storage,
            sparse_by_dense=config.sparse_by_dense, topk_at=config.topk_at, dense_weight_grad=config.dense_weight_grad,
        )  # fmt: skip

    @torch.no_grad()
    def randomize(self, delta: SparseGradLinear) -> None:
        """A random ΔW~ on k random coordinates, as after one step (``init_weights=False``, for tests)."""
        n = delta.out_features * delta.in_features
        indices = torch.randperm(n, device=delta.weight.device)[: delta.k].sort().values
        values = torch.randn(indices.numel(), device=delta.weight.device) * self.random_init_std
        delta.apply_rotated_step(indices, values)
        mark_bits(delta.updated_mask, indices)

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if torch.is_grad_enabled() and not (self.disable_adapters or self.merged):
            for name in self.active_adapters:
                delta = self.sparsegrad_delta[name] if name in self.sparsegrad_delta else None
                if delta is not None and delta.weight.requires_grad and not self.basis_estimated[name]:
                    raise RuntimeError(
                        f"the SparseGrad adapter {name!r} has no transition basis yet (basis='data'): call "
                        "sparsegrad.initialize_sparsegrad_basis(peft_model, dataloader) before training, or build "
                        "the config with basis='random' or 'identity'"
                    )
        return super().forward(x, *args, **kwargs)


class SparseGradModel(DeltaTuner):
    """The PEFT tuner of SparseGrad: swaps each target linear for a :class:`SparseGradLayer`.

    A fresh adapter's layers of one group share one basis tensor pair (identity for ``basis="data"``
    until :func:`initialize_sparsegrad_basis`, random orthogonal for ``basis="random"``).
    """

    prefix = "sparsegrad_"
    tuner_layer_cls = SparseGradLayer

    def inject_adapter(self, *args, **kwargs):
        self._fresh_bases: dict = {}  # (adapter, group) -> the prepared pair its layers share
        try:
            return super().inject_adapter(*args, **kwargs)
        finally:
            self._fresh_bases = {}

    def layer_kwargs(self, config, adapter_name, target, current_key) -> dict:
        group = basis_group(current_key, config.basis_per_layer)
        key = (adapter_name, group)
        if key not in self._fresh_bases:
            out_f, in_f = target.weight.shape
            u_in, u_out = _fresh_basis(config, group, in_f, out_f)
            self._fresh_bases[key] = SparseGradLinear.prepare_basis(u_in, u_out, target.weight, config.orientation)
        return {"basis": self._fresh_bases[key], "group": group}

    def _cast_adapter_dtype(self, adapter_name: str, autocast_adapter_dtype: bool = True) -> None:
        """peft's cast of bf16/fp16 adapters to float32, applied to the whole SparseGradLinear (its basis
        too), keeping the basis shared by the layers of a group."""
        if not autocast_adapter_dtype:
            return
        shared: dict = {}
        for _, delta in _deltas(self.model, adapter_name):
            if delta.weight.dtype not in (torch.float16, torch.bfloat16):
                continue
            before = {part: getattr(delta, part) for part in ("u_in", "u_out")}
            delta.to(torch.float32)
            delta.weight_master = None  # a float32 layer trains its weight itself
            for part, old in before.items():
                if old.device.type == "meta":  # no memory to share (the values come from a file)
                    continue
                key = (part, old.data_ptr(), old.device)
                if key in shared:
                    setattr(delta, part, shared[key])
                else:
                    shared[key] = getattr(delta, part)

    @classmethod
    def _get_adapter_state_dict(cls, model, config, adapter_name, state_dict, unwanted_adapter_names):
        """The layers' entries without their basis, plus the basis of each group once; with
        ``compact_save``, ΔW~ on its updated coordinates in place of the layers' dense matrices."""
        out = super()._get_adapter_state_dict(model, config, adapter_name, state_dict, unwanted_adapter_names)
        for name, layer in _layers(model, adapter_name):
            group = layer.basis_group[adapter_name]
            for part in ("u_in", "u_out"):
                tensor = out.pop(f"{name}.sparsegrad_delta.{adapter_name}.{part}", None)
                if tensor is not None:
                    out.setdefault(f"{_BASIS_KEY}.{group}.{adapter_name}.{part}", tensor)
            estimated = torch.tensor(layer.basis_estimated[adapter_name])
            out.setdefault(f"{_BASIS_KEY}.{group}.{adapter_name}.estimated", estimated)
            if config.compact_save:
                _compact(out, f"{name}.sparsegrad_delta.{adapter_name}.", layer.sparsegrad_delta[adapter_name])
        return out

    @classmethod
    def _remap_adapter_state_dict_for_load(cls, model, config, adapter_name, state_dict):
        """Give every layer the saved basis of its group (and mark it estimated if it was); expand a
        compact ΔW~ back into the layer's matrices."""
        out = super()._remap_adapter_state_dict_for_load(model, config, adapter_name, state_dict)
        saved = {k: out.pop(k) for k in [k for k in out if k.startswith(f"{_BASIS_KEY}.")]}
        for name, layer in _layers(model, adapter_name):
            group = layer.basis_group[adapter_name]
            prefix = f"{name}.sparsegrad_delta.{adapter_name}."
            for part in ("u_in", "u_out"):
                if f"{_BASIS_KEY}.{group}.{part}" in saved:
                    out[prefix + part] = saved[f"{_BASIS_KEY}.{group}.{part}"]
            estimated = saved.get(f"{_BASIS_KEY}.{group}.estimated")
            if estimated is not None:
                layer.basis_estimated[adapter_name] = bool(estimated)
            # compact entries have no counterpart in the model, so they kept their checkpoint keys
            for saved_prefix in (f"{name}.sparsegrad_delta.", f"{_PEFT_PREFIX}{name}.sparsegrad_delta."):
                if saved_prefix + "rotated_indices" in out:
                    _expand(out, saved_prefix, prefix, layer.sparsegrad_delta[adapter_name])
        return out


def _compact(entries: dict, prefix: str, delta: SparseGradLinear) -> None:
    """Replace a layer's dense matrices in ``entries`` by ΔW~ = u_out^T ΔW R on its updated coordinates
    (``rotated_indices``, flat row-major, and ``rotated_values``, float32): exact up to rounding, since a
    SparseGrad-trained ΔW~ is zero elsewhere. A layer whose coordinates are mostly updated, or whose ΔW~
    is not zero elsewhere (changed by hand, or ``init_weights=False``), stays dense."""
    n = delta.out_features * delta.in_features
    indices = set_bit_positions(delta.updated_mask, n)
    if indices.numel() * 2 >= n:  # 8 bytes per entry against 4 per dense entry
        return
    w_tilde = delta.rotated_weight(torch.float64).reshape(-1)
    values = w_tilde[indices]
    off_support = w_tilde.square().sum() - values.square().sum()
    if off_support > 1e-10 * max(float(w_tilde.square().sum()), 1e-30):
        return
    # storage "rotated": the count of updates of a valid cached ΔW stays, saying the cache was valid
    for key in ("weight", "rotated_weight", "weight_master", "effective_weight", "updated_mask"):
        entries.pop(prefix + key, None)
    index_dtype = torch.int32 if n < 2**31 else torch.int64
    entries[prefix + "rotated_indices"] = indices.to(index_dtype)
    entries[prefix + "rotated_values"] = values.to(torch.float32)


def _expand(entries: dict, saved_prefix: str, prefix: str, delta: SparseGradLinear) -> None:
    """The inverse of :func:`_compact` (entries under ``saved_prefix``; the layer's own, the basis among
    them, under ``prefix``): ΔW = u_out ΔW~ R^T in float64, and the layer's other entries from it."""
    indices = entries.pop(saved_prefix + "rotated_indices").long()
    values = entries.pop(saved_prefix + "rotated_values").to(torch.float64)
    shape = (delta.out_features, delta.in_features)
    w_tilde = torch.zeros(shape[0] * shape[1], dtype=torch.float64, device=values.device)
    w_tilde[indices] = values
    w_tilde = w_tilde.view(shape)
    u_in = entries.get(prefix + "u_in", delta.u_in).to(device=values.device, dtype=torch.float64)
    u_out = entries.get(prefix + "u_out", delta.u_out).to(device=values.device, dtype=torch.float64)
    r_mat = u_in if delta.orientation == "hosvd" else u_in.t()
    w = (u_out @ w_tilde) @ r_mat.t()
    trained = w if delta.storage == "weight" else w_tilde
    dtype = delta.weight.dtype
    entries[prefix + "weight"] = w.to(dtype)
    if delta.storage == "rotated":
        entries[prefix + "rotated_weight"] = w_tilde.to(dtype)
    if delta.weight_master is not None:
        entries[prefix + "weight_master"] = trained.to(torch.float32)
    if prefix + "effective_weight_updates" in entries:  # the saved layer had a valid cached ΔW
        entries[prefix + "effective_weight"] = w.to(torch.float32 if delta.weight_master is not None else dtype)
    mask = new_bitmask(shape[0] * shape[1], values.device)
    mark_bits(mask, indices)
    entries[prefix + "updated_mask"] = mask


def _layers(model: nn.Module, adapter_name: str) -> Iterable[tuple[str, SparseGradLayer]]:
    """(name, layer) of the SparseGradLayers of ``model`` that hold ``adapter_name`` (names as in the
    model's state dict, without FSDP's wrapper prefix)."""
    for name, module in model.named_modules():
        if isinstance(module, SparseGradLayer) and adapter_name in module.sparsegrad_delta:
            yield name.replace("_fsdp_wrapped_module.", ""), module


def _deltas(model: nn.Module, adapter_name: str) -> Iterable[tuple[str, SparseGradLinear]]:
    for name, layer in _layers(model, adapter_name):
        yield name, layer.sparsegrad_delta[adapter_name]


def _fresh_basis(config, group: str, in_f: int, out_f: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The basis of a fresh adapter's group: identity (``basis`` "data" until estimated, "identity"), or
    random orthogonal matrices drawn from ``basis_seed`` and the group's name (``basis="random"``)."""
    if config.basis != "random":
        return torch.eye(in_f), torch.eye(out_f)
    gen = torch.Generator().manual_seed(config.basis_seed * 1_000_003 + zlib.crc32(group.encode()))
    mats = []
    for n in (in_f, out_f):
        q, r = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=torch.float64))
        mats.append((q * torch.sign(torch.diagonal(r))).float())
    return mats[0], mats[1]


@torch.no_grad()
def initialize_sparsegrad_basis(
    model: nn.Module,
    dataloader: Iterable[Mapping] | None = None,
    *,
    adapter_name: str = "default",
    basis: Basis | None = None,
    steps: int | None = None,
    micro_batch: int | None = None,
    progress: bool = False,
) -> Basis:
    """Estimate the transition basis of a SparseGrad adapter from data and give it to its layers.

    The counterpart of peft's ``initialize_lora_eva_weights(model, dataloader)``: call it once after
    ``get_peft_model(model, SparseGradConfig(...))``, before training. The gradient statistics are those
    of the base model (the adapters are off during the passes; no weight changes), over ``steps``
    batches of ``dataloader`` (default: the config's ``basis_steps``, else all of them), each a dict fed
    as ``model(**batch)`` with labels; ``micro_batch`` rows per backward pass (default: the config's
    ``basis_micro_batch``). Or pass ``basis``, a :func:`sparsegrad.estimate_basis` result estimated on the
    base model (its layer names or this adapter's groups). The layers keep their function: a trained
    adapter is re-expressed in the new basis. Returns the basis used.
    """
    layers = list(_layers(model, adapter_name))
    if not layers:
        raise ValueError(f"the model has no SparseGrad adapter named {adapter_name!r}: build it with "
                         "peft.get_peft_model(model, sparsegrad.SparseGradConfig(...)) first")  # fmt: skip
    if any(layer.merged for _, layer in layers):
        raise RuntimeError("the SparseGrad adapter is merged into the weights: call unmerge_adapter() first")
    config = model.peft_config[adapter_name]
    if basis is None:
        if dataloader is None:
            raise ValueError("pass dataloader (batches fed as model(**batch), with labels) or basis=...")
        targets = {f"{name}.base_layer": layer.basis_group[adapter_name] for name, layer in layers}
        with torch.enable_grad(), _adapters_off([layer for _, layer in layers]):
            basis = estimate_basis(
                model, dataloader, targets, steps=steps if steps is not None else config.basis_steps,
                per_layer=config.basis_per_layer, progress=progress,
                micro_batch=micro_batch if micro_batch is not None else config.basis_micro_batch,
            )  # fmt: skip
    prepared: dict[int, tuple] = {}  # one converted pair per group: its layers share it
    for name, layer in layers:
        delta = layer.sparsegrad_delta[adapter_name]
        group_basis = _basis_of(basis, name, layer.basis_group[adapter_name])
        if id(group_basis) not in prepared:
            prepared[id(group_basis)] = SparseGradLinear.prepare_basis(
                group_basis.u_in, group_basis.u_out, delta.weight, delta.orientation
            )
        delta.set_basis(*prepared[id(group_basis)])
        layer.basis_estimated[adapter_name] = True
    return basis


def _basis_of(basis: Basis, name: str, group: str):
    """The GroupBasis of the layer ``name`` (looked up by its name in the PEFT model, in the base model,
    or by its group)."""
    base_name = name.removeprefix(_PEFT_PREFIX)
    for key in (f"{name}.base_layer", name, base_name):
        if key in basis.layer_keys:
            return basis.groups[basis.layer_keys[key]]
    if group in basis.groups:
        return basis.groups[group]
    raise KeyError(f"the basis has nothing for layer {base_name!r} (group {group!r}): it holds groups "
                   f"{sorted(basis.groups)} for layers {sorted(basis.layer_keys)[:6]}")  # fmt: skip


class _adapters_off:
    """Run the base layers alone (the adapters' layers skipped), restoring each layer's state after."""

    def __init__(self, layers: list[DeltaLayer]):
        self.layers = layers

    def __enter__(self):
        self.states = [layer._disable_adapters for layer in self.layers]
        for layer in self.layers:
            layer._disable_adapters = True

    def __exit__(self, *exc):
        for layer, state in zip(self.layers, self.states):
            layer._disable_adapters = state
