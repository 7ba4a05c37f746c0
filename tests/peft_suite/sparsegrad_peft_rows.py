"""A pytest plugin that runs peft's own custom-model tests on SparseGrad and MeProp.

peft's source distribution ships ``tests/test_custom_models.py``: every check of its ``PeftCommonTester``
(save / load, merge / unmerge / safe merge, unload, disable, several adapters, training, dtypes, ...)
parametrised by a table of small local models and method configs (``TEST_CASES``, and
``MULTIPLE_ACTIVE_ADAPTERS_TEST_CASES`` for two adapters at once). This plugin puts our rows in those
tables (in place of peft's own, which peft's CI runs) once the module is imported and before its tests
are parametrised. ``EXCLUDED`` lists the checks that do not apply to a row, with the reason; they are
reported as skipped (as are the checks peft itself skips for a method without a ``bias`` option).

Run by ``tests/integrations/test_peft_suite.py`` (``pytest -p sparsegrad_peft_rows`` in the unpacked
sdist). ``diffusers`` (imported by peft's test helpers for its Stable Diffusion tests, not used here) is
replaced by an empty stand-in.
"""

from __future__ import annotations

import sys
import types

import pytest

if "diffusers" not in sys.modules:
    _stub = types.ModuleType("diffusers")
    _stub.StableDiffusionPipeline = type("StableDiffusionPipeline", (), {})
    sys.modules["diffusers"] = _stub

import torch  # noqa: E402

import sparsegrad  # noqa: E402  (registers the PEFT methods when peft is imported)

# Tiny models: one thread (two threads on a busy machine make a 20 x 10 product take milliseconds).
torch.set_num_threads(1)

# Why a check does not apply to a row. peft's checks train with torch's own optimizers on all parameters.
_FOREIGN_OPTIMIZER = (
    "trains with torch.optim.SGD/Adam, which add the gradient to the parameter; with storage 'weight' the "
    "parameter is ΔW but its gradient is dL/dΔW~ in the rotated basis, so only sparsegrad.build_optimizer steps it "
    "right (the layer raises at the next forward, as it should)"
)
_SPARSE_ADAM = (
    "trains with torch.optim.Adam, which takes no sparse gradient, and the method's gradient is k-sparse COO "
    "(the check runs on the rows with dense_weight_grad=True)"
)
#: row name -> {check: reason}
EXCLUDED: dict[str, dict[str, str]] = {
    "Vanilla MLP 4 SparseGrad weight storage": {
        "test_only_params_are_updated": _FOREIGN_OPTIMIZER,
        "test_parameters_after_loading_model": _FOREIGN_OPTIMIZER,
        "test_disable_adapters": _FOREIGN_OPTIMIZER,
        "test_disable_adapters_with_merging": _FOREIGN_OPTIMIZER,
    },
    **{row: {"test_disable_adapters_with_merging": _SPARSE_ADAM}
       for row in ("Vanilla MLP 1 SparseGrad", "Vanilla MLP 3 SparseGrad identity basis",
                   "Vanilla MLP 5 SparseGrad compact save", "Vanilla MLP 1 MeProp")},
}  # fmt: skip


def rows():
    sg, mp = sparsegrad.SparseGradConfig, sparsegrad.MePropConfig
    rotated = {"basis": "random", "storage": "rotated"}
    single = [
        ("Vanilla MLP 1 SparseGrad", "MLP", sg, {"target_modules": ["lin0"], "k": 0.2, **rotated}),
        ("Vanilla MLP 2 SparseGrad dense gradient", "MLP", sg,
         {"target_modules": ["lin0", "lin1"], "k": 0.3, "dense_weight_grad": True, **rotated}),
        ("Vanilla MLP 3 SparseGrad identity basis", "MLP", sg,
         {"target_modules": "lin1", "k": 5, "basis": "identity", "storage": "rotated"}),
        ("Vanilla MLP 4 SparseGrad weight storage", "MLP", sg, {"target_modules": ["lin0"], "k": 0.2, "basis": "random"}),
        ("Vanilla MLP 5 SparseGrad compact save", "MLP", sg,
         {"target_modules": ["lin0", "lin1"], "k": 0.2, "compact_save": True, **rotated}),
        ("Vanilla MLP 1 MeProp", "MLP", mp, {"target_modules": ["lin0"], "k": 0.2}),
        ("Vanilla MLP 2 MeProp dense gradient", "MLP", mp,
         {"target_modules": ["lin0", "lin1"], "k": 0.3, "dense_weight_grad": True}),
    ]  # fmt: skip
    multiple = [
        ("SparseGrad Same", "sparsegrad", sg, {"target_modules": ["lin0"], "k": 0.2, "init_weights": False, **rotated},
         {"target_modules": ["lin0"], "k": 0.2, "init_weights": False, **rotated}),
        ("SparseGrad Different", "sparsegrad", sg, {"target_modules": ["lin0"], "k": 0.2, "init_weights": False, **rotated},
         {"target_modules": ["lin1"], "k": 0.2, "init_weights": False, "compact_save": True, **rotated}),
        ("MeProp Same", "meprop", mp, {"target_modules": ["lin0"], "k": 0.2, "init_weights": False},
         {"target_modules": ["lin0"], "k": 0.2, "init_weights": False}),
        ("MeProp Different", "meprop", mp, {"target_modules": ["lin0"], "k": 0.2, "init_weights": False},
         {"target_modules": ["lin1"], "k": 0.2, "init_weights": False}),
    ]  # fmt: skip
    return single, multiple


_done: set[str] = set()


def pytest_pycollect_makeitem(collector, name, obj):
    module = getattr(collector, "obj", None)
    if not isinstance(module, types.ModuleType) or module.__name__ in _done:
        return None
    if hasattr(module, "TEST_CASES") and hasattr(module, "MULTIPLE_ACTIVE_ADAPTERS_TEST_CASES"):
        single, multiple = rows()
        module.TEST_CASES[:] = single  # the lists the parametrize marks hold
        module.MULTIPLE_ACTIVE_ADAPTERS_TEST_CASES[:] = multiple
    _done.add(module.__name__)
    return None


def pytest_collection_modifyitems(config, items):
    for item in items:
        test = item.originalname if hasattr(item, "originalname") else item.name
        row = item.callspec.params.get("test_name") if hasattr(item, "callspec") else None
        reason = EXCLUDED.get(row, {}).get(test)
        if reason is not None:
            item.add_marker(pytest.mark.skip(reason=f"excluded for {row!r}: {reason}"))
