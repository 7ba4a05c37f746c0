"""Registering the package's PEFT methods (SparseGrad, MeProp) with peft, without importing peft early.

peft knows a method by a member of its ``PeftType`` enum, which has no public way to grow; :func:`peft_type`
adds one. :func:`register_peft_methods` registers the methods through ``peft.utils.register_peft_method``.
``import sparsegrad`` calls :func:`install`, which runs the registration at once if peft is imported, and
otherwise as soon as peft is (a finder on ``sys.meta_path`` that wraps peft's loader once): then
``get_peft_model`` and ``PeftModel.from_pretrained`` know the methods, and ``import sparsegrad`` still
imports neither peft nor torch. The tuners themselves are in :mod:`sparsegrad.peft_tuner`.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
import warnings

__all__ = ["PEFT_METHODS", "peft_type", "register_peft_methods", "install"]

#: PEFT method name -> (config class, tuner class), as "module:attribute"
PEFT_METHODS: dict[str, tuple[str, str]] = {
    "sparsegrad": ("sparsegrad.methods.sparsegrad.config:SparseGradConfig",
                   "sparsegrad.methods.sparsegrad.model:SparseGradModel"),
    "meprop": ("sparsegrad.methods.meprop.config:MePropConfig", "sparsegrad.methods.meprop.model:MePropModel"),
}  # fmt: skip


def peft_type(name: str):
    """peft's ``PeftType`` member for the method ``name`` (e.g. ``PeftType.SPARSEGRAD``), added to the
    enum if it is not there: ``register_peft_method`` accepts only names the enum knows."""
    from peft.utils.peft_types import PeftType

    value = name.upper()
    if value in PeftType.__members__:
        return PeftType[value]
    member = str.__new__(PeftType, value)
    member._name_, member._value_ = value, value
    member.__objclass__ = PeftType
    member._sort_order_ = len(PeftType._member_names_)
    type.__setattr__(PeftType, value, member)  # EnumType.__setattr__ refuses new members
    PeftType._member_names_.append(value)
    PeftType._member_map_[value] = member
    PeftType._value2member_map_[value] = member
    return member


def _load(path: str):
    module, _, attribute = path.partition(":")
    return getattr(importlib.import_module(module), attribute)


def register_peft_methods() -> None:
    """Register SparseGrad and MeProp with peft (``get_peft_model``, ``PeftModel.from_pretrained``); a
    no-op for a method already registered."""
    from peft.mapping import PEFT_TYPE_TO_TUNER_MAPPING
    from peft.utils import register_peft_method

    for name, (config_path, model_path) in PEFT_METHODS.items():
        if peft_type(name) in PEFT_TYPE_TO_TUNER_MAPPING:
            continue
        register_peft_method(name=name, config_cls=_load(config_path), model_cls=_load(model_path), prefix=f"{name}_")


def _our_modules_loading() -> bool:
    """Whether one of the PEFT modules of this package is being imported (the import of peft that
    triggered the hook came from it: its classes are not defined yet, and its config registers the
    methods when first built)."""
    for paths in PEFT_METHODS.values():
        for path in paths:
            module = sys.modules.get(path.partition(":")[0])
            if module is not None and getattr(getattr(module, "__spec__", None), "_initializing", False):
                return True
    return False


def _register_after_import() -> None:
    if _our_modules_loading():
        return
    try:
        register_peft_methods()
    except Exception as error:  # an unexpected peft version must not break "import peft"
        warnings.warn(f"sparsegrad could not register its PEFT methods with peft: {error!r}", stacklevel=2)


class _AfterPeftImport(importlib.abc.MetaPathFinder):
    """Finds nothing itself: when ``peft`` is first imported it lets the other finders find it and
    makes the loader register the methods once peft is executed."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname != "peft":
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec("peft")
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        execute = spec.loader.exec_module

        def exec_module(module):
            execute(module)
            _register_after_import()

        spec.loader.exec_module = exec_module
        return spec


def install() -> None:
    """Register the PEFT methods now if peft is imported already, else as soon as it is."""
    if "peft" in sys.modules:
        _register_after_import()
    elif not any(isinstance(f, _AfterPeftImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _AfterPeftImport())
