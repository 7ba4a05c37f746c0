"""Module paths of earlier releases, kept importable after the methods moved into folders and the suite
into jobs: ``import sparsegrad.layers`` or ``from sparsegrad.suite.runner import run`` gives the module at
its new home (the same module object, so patching either name patches both).

Installed on ``sys.meta_path`` by ``import sparsegrad``; it answers only the names in :data:`MOVED` and
imports nothing until such a name is asked for.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys

_SUITE_JOBS = {
    "run": ("assets", "tasks", "data", "models", "heads", "methods", "trainer", "metrics", "measure", "record",
            "tracking", "runner", "settings", "tiny_tokenizers", "convergence", "sparsity"),
    "sweep": ("studies", "profiles", "progress", "runrecords", "search", "sweep_history"),
    "report": ("tables", "table_inputs", "table_format", "findings", "stats", "figures", "sweep_figures",
               "plotting"),
}  # fmt: skip

#: old module path -> new module path
MOVED: dict[str, str] = {
    "sparsegrad.layers": "sparsegrad.methods.sparsegrad.layer",
    "sparsegrad.sparsegrad_autograd": "sparsegrad.methods.sparsegrad.autograd",
    "sparsegrad.basis": "sparsegrad.methods.sparsegrad.basis",
    "sparsegrad.gram": "sparsegrad.methods.sparsegrad.gram",
    "sparsegrad.meprop_layer": "sparsegrad.methods.meprop.layer",
    "sparsegrad.fixed_support": "sparsegrad.methods.leading_block.layer",
    **{f"sparsegrad.suite.{m}": f"sparsegrad.suite.{job}.{m}" for job, ms in _SUITE_JOBS.items() for m in ms},
}
# ``sparsegrad.suite.sweep`` was the driver module; it is now the package of the sweep job, and re-exports
# the driver's public names (see sparsegrad/suite/sweep/__init__.py).

# Names an old module re-exported from a module that now lives elsewhere.
_EXTRA = {"sparsegrad.layers": {"MePropLinear": "sparsegrad.methods.meprop.layer"}}


class _Alias(importlib.abc.Loader):
    def __init__(self, old: str, new: str):
        self.old, self.new = old, new

    def create_module(self, spec):
        module = importlib.import_module(self.new)
        for name, home in _EXTRA.get(self.old, {}).items():
            if not hasattr(module, name):
                setattr(module, name, getattr(importlib.import_module(home), name))
        return module

    def exec_module(self, module) -> None:  # already executed at its new home
        pass


class _MovedFinder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path=None, target=None):
        new = MOVED.get(fullname)
        if new is None:
            return None
        return importlib.util.spec_from_loader(fullname, _Alias(fullname, new))


def install() -> None:
    if not any(isinstance(f, _MovedFinder) for f in sys.meta_path):
        sys.meta_path.append(_MovedFinder())
