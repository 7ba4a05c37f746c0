"""Drivers that start together or die: two fresh starts at once share one run, a SIGKILLed driver's
claims are taken over at once (its pid is gone), a claim of another host waits for its heartbeat."""

from __future__ import annotations

import json
import os
import signal
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

from sparsegrad.suite.sweep import driver as sweep
from sparsegrad.suite.sweep.runrecords import Claim

ROOT = Path(__file__).resolve().parents[2]
SETTING = {"lr": 1e-3, "batch_size": 8}


def _python(tmp_path: Path, name: str, body: str) -> str:
    """A stand-in for the Python that runs experiments.finetune (the driver only starts and waits on it)."""
    fake = tmp_path / name
    fake.write_text(f"#!/bin/sh\n{body}\n")
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    return str(fake)


def _driver(tmp_path: Path, python: str, quiet: bool = True) -> sweep.Driver:
    profile = sweep.Profile(name="t", models=["tiny_bert"], methods=["full"], tasks=["movie_sentiment"], seeds=[1],
                            best_from="fixed", fixed=SETTING)
    layout = sweep.Layout(results=tmp_path / "results", work=tmp_path / "work")
    return sweep.Driver(profile, layout, sweep.Options(quiet=quiet, python=python))


def _wait_for(path: Path, timeout: float = 60.0) -> None:
    deadline = time.time() + timeout
    while not path.exists():
        assert time.time() < deadline, f"{path} never appeared"
        time.sleep(0.05)


def test_a_sigkilled_driver_and_child_leave_claims_that_the_rerun_takes_over_at_once(tmp_path, capsys):
    started = tmp_path / "child-started"
    hanging = _python(tmp_path, "hanging-python", f"touch {started}; sleep 120")
    code = ("import sys; sys.path.insert(0, sys.argv[1]); from pathlib import Path\n"
            "from tests.reproduce.test_concurrent_drivers import SETTING, _driver\n"
            "_driver(Path(sys.argv[2]), sys.argv[3]).seeds('tiny_bert', 'full', 'movie_sentiment', SETTING)\n")
    proc = subprocess.Popen([sys.executable, "-c", code, str(ROOT), str(tmp_path), hanging], cwd=ROOT,
                            start_new_session=True)
    try:
        _wait_for(started)  # the driver holds the seeds' claim and its child runs
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the driver and its child, as `kill -9 -<pgid>` would
        proc.wait(timeout=30)
    claim = tmp_path / "results" / "claims" / "seeds-tiny_bert-full-movie_sentiment.claim"
    assert claim.read_text().startswith(f"{socket.gethostname()} pid {proc.pid} ")  # left behind, fresh
    rerun = _driver(tmp_path, _python(tmp_path, "quick-python", "exit 0"), quiet=False)
    t0 = time.perf_counter()
    assert rerun.seeds("tiny_bert", "full", "movie_sentiment", SETTING)  # ran, did not wait for the claim
    assert time.perf_counter() - t0 < 30  # well inside the 60 s heartbeat grace it used to wait out
    out = capsys.readouterr().out
    assert f"taken over from a driver that is gone ({socket.gethostname()} pid {proc.pid} since" in out
    assert not claim.exists() and len(rerun.commands) == 1


def test_a_live_holder_or_one_on_another_host_keeps_its_claim(tmp_path):
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        for holder in (f"{socket.gethostname()} pid {sleeper.pid} since 10:00:00",  # alive here
                       f"not-{socket.gethostname()} pid {sleeper.pid + 1} since 10:00:00"):  # another host
            (tmp_path / "k.claim").write_text(holder + "\n")
            claim = Claim(tmp_path, "k")
            assert not claim.acquire() and claim.holder() == holder
            os.utime(tmp_path / "k.claim", (time.time() - 120, time.time() - 120))  # no heartbeat for 2 min
            assert claim.acquire() and claim.taken_from == holder
            claim.release()
    finally:
        sleeper.kill()
        sleeper.wait()


FRESH = ("import json, sys, time; sys.path.insert(0, sys.argv[1]); from pathlib import Path\n"
         "from sparsegrad.suite.sweep.profiles import Layout, enter_results\n"
         "layout = Layout(results=Path(sys.argv[2]) / 'results' / 'local' / 't', "
         "work=Path(sys.argv[2]) / 'outputs' / 'local' / 't')\n"
         "while time.time() < float(sys.argv[3]): time.sleep(0.001)\n"
         "entry = enter_results(layout, fresh=True)\n"
         "print(json.dumps({'run_id': entry.run_id, 'moved': entry.moved, 'joined': entry.joined,\n"
         "                  'message': entry.fresh_message('t', layout)}), flush=True)\n"
         "while not Path(sys.argv[4]).exists(): time.sleep(0.05)\n")


def test_two_fresh_starts_at_once_share_one_run_and_the_second_names_the_first(tmp_path):
    old = sweep.Layout(results=tmp_path / "results" / "local" / "t", work=tmp_path / "outputs" / "local" / "t")
    old_id = old.identity["id"]
    (old.work / "some-run").mkdir(parents=True)
    stop = tmp_path / "stop"
    at = time.time() + 1.5  # both processes are up by then: they call enter_results within a millisecond
    procs = [subprocess.Popen([sys.executable, "-c", FRESH, str(ROOT), str(tmp_path), str(at), str(stop)], cwd=ROOT,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    try:
        lines = [json.loads(p.stdout.readline() or "{}") for p in procs]
    finally:
        stop.touch()
        errors = [p.communicate(timeout=60)[1] for p in procs]
    assert all(p.returncode == 0 for p in procs) and not any(errors), errors
    first, second = sorted(lines, key=lambda e: -len(e["moved"]))
    assert len(first["moved"]) == 2 and first["joined"] == [], lines  # results and run folders moved aside once
    assert second["moved"] == [] and first["run_id"] == second["run_id"] != old_id
    other = procs[lines.index(first)].pid
    assert second["joined"] == [f"{socket.gethostname()} pid {other} since {second['joined'][0].split()[-1]}"]
    assert second["message"].startswith(f"fresh start: another driver ({socket.gethostname()} pid {other} since ")
    assert f"is running the fresh run {first['run_id']} in " in second["message"]
    assert "stop that driver first, then run make reproduce-glue PROFILE=t FRESH=1" in second["message"]
    # both are gone now: the next fresh start moves their run aside instead of joining the dead
    entry = sweep.enter_results(old, fresh=True)
    try:
        assert entry.joined == [] and len(entry.moved) == 1 and entry.run_id != first["run_id"]
    finally:
        entry.release()
    assert json.loads((tmp_path / "results" / "local" / f"{entry.moved[0].split('/')[-1]}" / "run.json").read_text()
                      )["id"] == first["run_id"]
