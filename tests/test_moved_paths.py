"""Module paths of earlier releases still import, and give the module at its new home."""

import importlib
import subprocess
import sys

import pytest

import sparsegrad
from sparsegrad._moved import MOVED


@pytest.mark.parametrize("old", sorted(MOVED))
def test_old_path_is_the_new_module(old):
    assert importlib.import_module(old) is importlib.import_module(MOVED[old])


def test_old_from_imports():
    from sparsegrad.basis import estimate_basis
    from sparsegrad.fixed_support import LeadingBlockLinear
    from sparsegrad.layers import MePropLinear, SparseGradLinear
    from sparsegrad.suite.runner import finetune  # noqa: F401

    from sparsegrad.suite.sweep import (
        run_profile,  # the old driver module is now the sweep package  # noqa: F401
    )

    assert SparseGradLinear is sparsegrad.SparseGradLinear
    assert MePropLinear is sparsegrad.MePropLinear
    assert estimate_basis is sparsegrad.estimate_basis
    from sparsegrad.methods.leading_block import LeadingBlockLinear as new_home

    assert LeadingBlockLinear is new_home


def test_method_folders_register_every_builtin():
    assert list(sparsegrad.METHODS)[:5] == ["full", "lora", "meprop", "sparsegrad", "leading_block"]


def test_old_suite_path_stays_light():
    # The config check must not pay for torch, under its old name as under its new one.
    code = "import sys, sparsegrad.suite.settings; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
