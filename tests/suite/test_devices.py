"""One GPU per run on a node with several: leases over a faked device list (no GPU needed).

SPARSEGRAD_DEVICES stands in for the visible GPUs and SPARSEGRAD_DEVICE_LOCKS keeps each test's leases
apart; torch.cuda is monkeypatched where a run's start asks it about the device it was given.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from sparsegrad.suite.run import devices

ROOT = Path(__file__).resolve().parents[2]
APP = ROOT / "tests" / "fixtures" / "device_app.py"


@pytest.fixture
def four_gpus(tmp_path, monkeypatch):
    monkeypatch.setenv(devices.DEVICES_ENV, "0,1,2,3")
    monkeypatch.setenv(devices.LOCKS_ENV, str(tmp_path / "locks"))
    return tmp_path


def test_concurrent_runs_lease_one_gpu_each_then_share_the_least_used(four_gpus):
    leases = [devices.acquire("auto") for _ in range(4)]
    assert [(lease.device, lease.slot) for lease in leases] == [("cuda:0", 0), ("cuda:1", 0), ("cuda:2", 0), ("cuda:3", 0)]
    fifth = devices.acquire("cuda")  # an unindexed cuda is spread too
    assert (fifth.device, fifth.slot) == ("cuda:0", 1)  # every GPU busy: shared, the least used first
    leases[2].release()
    again = devices.acquire("auto")
    assert (again.device, again.slot) == ("cuda:2", 0)  # a released GPU is taken again
    assert devices.acquire("cuda:3") is None and devices.acquire("cpu") is None  # an explicit device is kept
    for lease in [*leases, fifth, again]:
        lease.release()


def test_one_gpu_takes_no_lease(tmp_path, monkeypatch):
    monkeypatch.setenv(devices.DEVICES_ENV, "0")
    monkeypatch.setenv(devices.LOCKS_ENV, str(tmp_path))
    assert devices.acquire("auto") is None


def test_a_killed_runs_gpu_is_free_again_at_once(four_gpus):
    code = ("from sparsegrad.suite.run import devices; import time; lease = devices.acquire('auto'); "
            "print(lease.device, flush=True); time.sleep(60)")
    holder = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, cwd=ROOT,
                              env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        assert holder.stdout.readline().strip() == "cuda:0"
        assert devices.acquire("auto").device == "cuda:1"  # held by the other process
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=30)
    assert devices.acquire("auto").device == "cuda:0"  # the kernel dropped the dead process's lock


def test_the_run_record_names_the_leased_gpu(four_gpus, compose, monkeypatch):
    import torch

    from experiments.finetune import resolve
    from sparsegrad.suite.run import runner

    chosen = []
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: chosen.append(str(device)))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda index=None: f"Fake GPU {index}")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # torch's view of the fake node: 4 GPUs
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    other = devices.acquire("auto")  # a concurrent run holds cuda:0
    settings = runner.settings_from_config(resolve(compose(["model=tiny_bert", "logger=none"])), str(four_gpus / "run"))
    run = runner.start(settings)
    try:
        assert chosen == ["cuda:1"]
        assert run.record["environment"]["device"] == "cuda:1 Fake GPU 1"
        assert run.record["environment"]["device_lease"] == {"device": "cuda:1", "slot": 0, "devices": [0, 1, 2, 3]}
    finally:
        run.lease.release()
        other.release()


def test_the_parallel_launcher_gives_each_concurrent_trial_its_own_gpu(four_gpus):
    out = four_gpus / "leases"
    out.mkdir()
    cmd = [sys.executable, str(APP), "--multirun", "+x=1,2,3", "+together=3", f"+out={out}", "hydra/launcher=joblib",
           "hydra.launcher.n_jobs=3", f"hydra.sweep.dir={four_gpus / 'multirun'}"]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=four_gpus, timeout=240,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    leases = [json.loads((out / f"{x}.json").read_text()) for x in (1, 2, 3)]
    assert all(lease["together"] == 3 for lease in leases), "the three trials did not hold their GPUs at once"
    assert sorted(lease["device"] for lease in leases) == ["cuda:0", "cuda:1", "cuda:2"]
    assert all(lease["slot"] == 0 for lease in leases)
