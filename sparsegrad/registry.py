"""The method registry: one :class:`Method` object per fine-tuning method, found by its name.

A method is a subclass of :class:`Method` registered with :func:`register_method` (as a decorator or a
call). It says, in one place, everything the rest of the package needs to know about it:

* ``name`` and ``options`` — its name in ``MethodConfig(name=...)`` and the config options it reads;
  :meth:`Method.check` validates them; ``extra_options`` declares options of its own beyond the
  fields of :class:`~sparsegrad.MethodConfig` (with their defaults; read them with ``cfg.option(key)``);
* ``needs_basis`` — whether :func:`~sparsegrad.apply_method` must provide a transition basis;
* :meth:`Method.apply` / :meth:`Method.wrap` — how it wraps a target linear;
* ``layer_types`` — the module classes it swaps in (a class, or its dotted name ``"package.module.Class"``
  so that registering does not import the library that defines it); modules of these types (subclasses
  included) are looked up here by
  :func:`~sparsegrad.merge`, :func:`~sparsegrad.build_optimizer` and :func:`~sparsegrad.account`;
* :meth:`Method.sparse_parameter` / :meth:`Method.attach_optimizer` — which parameter has a sparse
  gradient and how the lazy sparse Adam steps it;
* :meth:`Method.merge_layer` / :meth:`Method.unwrap_model` — how it merges back into a plain model;
* :meth:`Method.budget` / :meth:`Method.is_adapter_parameter` — what it reports to accounting.

The built-in methods live in :mod:`sparsegrad.methods` (one module each). This module imports only
:mod:`sparsegrad.targets`, so every other module of the package may look methods up here.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any, ClassVar, NamedTuple

import torch
from torch import nn

from sparsegrad.targets import set_submodule

__all__ = ["METHODS", "LayerBudget", "Method", "get_method", "method_for_layer", "register_method",
           "registered_methods", "swapped_modules", "unregister_method"]  # fmt: skip

COMMON_OPTIONS = ("name", "target_patterns", "every_nth_block", "train_non_mlp")


class LayerBudget(NamedTuple):
    """What a sparse layer reports to accounting: its sparse parameter (not counted as dense
    trainable), the weight shape (out, in), the budget ``k`` of entries per step and ``updated``, the
    coordinates it has moved so far."""

    param: torch.Tensor
    shape: tuple[int, int]
    k: int
    updated: int


class Method:
    """One fine-tuning method. Subclass, set the class attributes, override the hooks you need.

    The defaults describe a method that trains its targets densely and swaps nothing (``full``).
    """

    name: ClassVar[str] = ""
    #: MethodConfig fields this method reads besides name / target_patterns / every_nth_block / train_non_mlp
    options: ClassVar[tuple[str, ...]] = ()
    #: options of this method that are not MethodConfig fields: name -> default
    extra_options: ClassVar[Mapping[str, Any]] = {}
    #: whether apply_method needs a transition basis (``basis=`` or ``batches=``)
    needs_basis: ClassVar[bool] = False
    #: the module classes this method swaps in for a target linear (classes or dotted class names)
    layer_types: ClassVar[tuple[type | str, ...]] = ()

    # -- config ------------------------------------------------------------------------------------
    def check(self, cfg) -> None:
        """Raise ValueError (what is wrong, the valid choices) for a bad value of one of its options."""

    # -- apply -------------------------------------------------------------------------------------
    def apply(self, model: nn.Module, cfg, targets: list, basis=None) -> nn.Module:
        """Swap the targets of ``model`` (requires_grad is already set: targets trainable, the rest
        as ``cfg.train_non_mlp``); return the model to train. Default: :meth:`wrap` each target."""
        for t in targets:
            layer = self.wrap(model.get_submodule(t.name), cfg, t, basis)
            if layer is not None:
                set_submodule(model, t.name, layer)
        return model

    def wrap(self, linear: nn.Module, cfg, target, basis=None) -> nn.Module | None:
        """The module that replaces the target ``linear`` (None: keep it as it is)."""
        return None

    # -- optimizer ---------------------------------------------------------------------------------
    def sparse_parameter(self, module: nn.Module) -> torch.Tensor | None:
        """The parameter of a swapped module whose gradient is sparse COO (stepped by
        :class:`~sparsegrad.LazySparseAdam`), or None when the module trains densely."""
        return None

    def attach_optimizer(self, module: nn.Module, sparse_optimizer) -> None:
        """Register appliers / update listeners of ``module`` with the lazy sparse Adam."""

    # -- merge -------------------------------------------------------------------------------------
    def unwrap_model(self, model: nn.Module) -> nn.Module:
        """Undo a model-level wrapper this method added (e.g. a PeftModel); default: none."""
        return model

    def merge_layer(self, module: nn.Module) -> nn.Module:
        """A plain module with the same function as the swapped ``module`` (default ``to_linear()``)."""
        linear = module.to_linear()
        linear.train(module.training)
        return linear

    # -- accounting --------------------------------------------------------------------------------
    def budget(self, module: nn.Module) -> LayerBudget | None:
        """What a swapped module reports to accounting as a sparse layer (None: not a sparse layer).
        Default: the module's sparse parameter, ``k`` and ``num_updated()``."""
        param = self.sparse_parameter(module)
        if param is None:
            return None
        return LayerBudget(param, (module.out_features, module.in_features), int(module.k), int(module.num_updated()))

    def is_adapter_parameter(self, param_name: str) -> bool:
        """Whether a parameter (by its name in the model) is an adapter this method added."""
        return False

    def __repr__(self) -> str:
        return f"<method {self.name!r}: {type(self).__module__}.{type(self).__qualname__}>"


_METHODS: dict[str, Method] = {}
_BY_LAYER: dict[type | str, Method] = {}
_NAMED_LAYERS = False  # whether some layer type is registered by its dotted name


def _type_name(layer_type: type | str) -> str:
    return layer_type if isinstance(layer_type, str) else layer_type.__qualname__


def register_method(method, *, replace: bool = False):
    """Register a :class:`Method` subclass or instance under its ``name``; returns what it was given,
    so it works as a class decorator. ``replace=True`` replaces a method of the same name."""
    global _NAMED_LAYERS
    if not (isinstance(method, Method) or (isinstance(method, type) and issubclass(method, Method))):
        raise TypeError(f"register_method takes a sparsegrad.Method subclass or instance, got {method!r}")
    instance = method() if isinstance(method, type) else method
    name = instance.name
    if not name or not isinstance(name, str):
        raise ValueError(f"{type(instance).__qualname__} needs a class attribute name = '...'")
    if name in _METHODS and not replace:
        raise ValueError(f"a method named {name!r} is already registered ({_METHODS[name]!r}); pick another "
                         "name or pass replace=True")  # fmt: skip
    for layer_type in instance.layer_types:
        owner = _BY_LAYER.get(layer_type)
        if owner is not None and owner.name != name:
            raise ValueError(f"layer type {_type_name(layer_type)} already belongs to method {owner.name!r}")
    if name in _METHODS:
        unregister_method(name)
    _METHODS[name] = instance
    for layer_type in instance.layer_types:
        _BY_LAYER[layer_type] = instance
        _NAMED_LAYERS = _NAMED_LAYERS or isinstance(layer_type, str)
    return method


def unregister_method(name: str) -> None:
    """Remove a registered method (e.g. a toy method at the end of a test)."""
    instance = _METHODS.pop(name, None)
    if instance is None:
        raise ValueError(f"no method named {name!r} is registered; registered: {', '.join(_METHODS)}")
    for layer_type in [t for t, m in _BY_LAYER.items() if m is instance]:
        del _BY_LAYER[layer_type]


def get_method(name: str) -> Method:
    """The registered method called ``name``; ValueError listing the valid names otherwise."""
    try:
        return _METHODS[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown method {name!r}; valid: {', '.join(_METHODS)} (or register one with "
                         "sparsegrad.register_method)") from None  # fmt: skip


def method_for_layer(module: nn.Module) -> Method | None:
    """The method that swapped in ``module`` (by its class), or None for any other module."""
    for cls in type(module).__mro__:
        method = _BY_LAYER.get(cls)
        if method is None and _NAMED_LAYERS:
            method = _BY_LAYER.get(f"{cls.__module__}.{cls.__qualname__}")
        if method is not None:
            return method
    return None


def registered_methods() -> tuple[Method, ...]:
    """The registered methods, in registration order."""
    return tuple(_METHODS.values())


def swapped_modules(model: nn.Module) -> Iterator[tuple[str, nn.Module, Method]]:
    """(name, module, method) for every module of ``model`` that a registered method swapped in."""
    for name, module in model.named_modules():
        method = method_for_layer(module)
        if method is not None:
            yield name, module, method


class _MethodNames(Sequence):
    """The names of the registered methods, always current (a read-only sequence of str)."""

    def __getitem__(self, index):
        return tuple(_METHODS)[index]

    def __len__(self) -> int:
        return len(_METHODS)

    def __iter__(self) -> Iterator[str]:
        return iter(tuple(_METHODS))

    def __contains__(self, name: object) -> bool:
        return name in _METHODS

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Iterable) and not isinstance(other, str) and tuple(self) == tuple(other)

    __hash__ = None  # mutable as the registry

    def __repr__(self) -> str:
        return repr(tuple(_METHODS))


METHODS = _MethodNames()
