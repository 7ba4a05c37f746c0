"""peft's own test suite judges the PEFT methods: every PeftCommonTester check of peft's
``tests/test_custom_models.py`` (the sdist's, fetched as the asset ``peft_tests``) on SparseGrad and MeProp
rows added to its tables by ``tests/peft_suite/sparsegrad_peft_rows.py``; nothing fails, and every check
that does not run says why (ours: ``EXCLUDED`` there; peft's own: the bias checks)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import xml.etree.ElementTree as ET
from collections import Counter
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PLUGIN_DIR = ROOT / "tests" / "peft_suite"
# peft skips these for every method without a ``bias`` option (SHiRA's rows skip them too)
PEFT_OWN_SKIPS = (
    "Testing bias warnings only for LoraConfig or BOFTConfig",
    "does not support the 'bias' argument",
    "requires the PEFT method to support training the bias directly",
)


def _pypi_reachable() -> bool:
    try:
        socket.create_connection(("pypi.org", 443), timeout=5).close()
        return True
    except OSError:
        return False


def peft_tests_folder() -> Path:
    """The unpacked sdist (fetched here when ``make assets`` has not fetched it yet)."""
    from sparsegrad.suite.run.assets import asset_path, is_ready

    if not is_ready("peft_tests"):
        from scripts.fetch_assets import FetchError, fetch

        try:
            fetch("peft_tests")
        except FetchError as exc:
            if not _pypi_reachable():
                pytest.skip(f"peft's test suite is not in the asset cache and PyPI is unreachable ({exc}); "
                            "run `make assets` where PyPI is reachable")  # fmt: skip
            raise
    return asset_path("peft_tests")


def test_peft_common_tester_passes_on_sparsegrad_and_meprop(tmp_path):
    sys.path.insert(0, str(PLUGIN_DIR))
    try:
        from sparsegrad_peft_rows import EXCLUDED, rows
    finally:
        sys.path.remove(str(PLUGIN_DIR))
    folder = peft_tests_folder()
    report = tmp_path / "report.xml"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT), str(PLUGIN_DIR), os.environ.get("PYTHONPATH", "")])}  # fmt: skip
    cmd = [sys.executable, "-m", "pytest", "tests/test_custom_models.py", "-c", "pytest.ini", "--rootdir", ".",
           "-p", "no:cacheprovider", "-p", "sparsegrad_peft_rows", "-k", "SparseGrad or MeProp", "-q", "-W", "ignore",
           "--tb=short", f"--junitxml={report}"]  # fmt: skip
    proc = subprocess.run(cmd, cwd=folder, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-2000:]

    single, multiple = rows()
    names = [r[0] for r in single] + [r[0] for r in multiple]

    def row_of(test_id: str) -> str:  # e.g. test_adapter_dtype_autocast[True-True-dtype0-<row>-MLP-...]
        return next((r for r in names if f"[{r}-" in test_id or f"-{r}-" in test_id), "")

    outcomes: dict[str, Counter] = {}
    skips: dict[str, str] = {}
    for case in ET.parse(report).getroot().iter("testcase"):
        name = case.get("name")
        row = row_of(name)
        skipped = case.find("skipped")
        failed = case.find("failure") is not None or case.find("error") is not None
        outcome = "failed" if failed else "skipped" if skipped is not None else "passed"
        outcomes.setdefault(row, Counter())[outcome] += 1
        if skipped is not None:
            skips[name] = skipped.get("message", "")
    for row in names:
        counts = outcomes.get(row, Counter())
        assert counts["failed"] == 0, (row, counts)
        assert counts["passed"] >= (40 if row in [r[0] for r in single] else 5), (row, counts)
    for name, reason in skips.items():
        ours = reason.removeprefix("Skipped: ").startswith("excluded for ")
        assert ours or any(s in reason for s in PEFT_OWN_SKIPS), f"{name} skipped for an unexpected reason: {reason}"
    excluded = {(row, check) for row, checks in EXCLUDED.items() for check in checks}
    skipped_ours = {(row_of(n), n.split("[")[0]) for n, reason in skips.items() if "excluded for" in reason}
    assert skipped_ours == excluded
    total = sum(outcomes.values(), Counter())
    print(f"peft's custom-model suite on SparseGrad and MeProp: {dict(total)}")
    for name, reason in sorted(skips.items()):
        print(f"  skipped {name}: {reason}")
