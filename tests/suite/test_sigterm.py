"""SIGTERM (``timeout``, ``kill``, SLURM's time limit or ``--signal``, preemption) stops a run as Ctrl-C does."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

from suite_fixtures import REPO, data_files_override


def test_sigterm_to_a_single_run_writes_its_record_as_interrupted_and_says_where(tmp_path, glue_files):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled"}
    run_dir = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "experiments.finetune", "model=tiny_bert", "method=full", "task=sst2",
                             data_files_override(glue_files["sst2"]), "trainer=smoke", "trainer.threads=1",
                             "trainer.max_steps=null", "trainer.epochs=100000", "trainer.eval_every=100000",
                             "logger=none", f"hydra.run.dir={run_dir}"],
                            cwd=REPO, env=env, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
    lines = []
    try:
        for line in proc.stderr:  # training has started once the run says how many steps it plans
            lines.append(line)
            if "steps planned" in line:
                time.sleep(0.5)
                proc.send_signal(signal.SIGTERM)
                break
        lines += proc.stderr.readlines()
        proc.wait(timeout=120)
    finally:
        proc.kill()
    err = "".join(lines)
    assert proc.returncode == 130, err[-3000:]
    assert "Traceback" not in err
    assert f"error: interrupted by SIGTERM; the run record (status interrupted) is in {run_dir}/record.json" in err
    record = json.loads((run_dir / "record.json").read_text())
    assert record["status"] == "interrupted" and record["error"].startswith("interrupted (SIGTERM) at step")
    assert record["training"]["optimizer_steps"] > 0 and record["training"]["stop_reason"] == record["error"]
