"""Run records of a profile: the results folder's identity, harvesting, loading, claims, best trial.

A results folder (``results/<profile>``) has an identity, ``run.json`` (created once, atomically, by the
first run into it). Every run started for it carries that id (``+reproduce.results_id``), and
:func:`harvest` copies into the folder only the records carrying its id: moving a results folder
aside, or starting fresh elsewhere, never brings back records of another folder's runs. A record that
cannot be read is reported by name, never skipped silently. Copies are atomic (write, then rename).

:class:`Claim` keeps two drivers of one profile (two ``make reproduce-glue`` at once, or machines sharing
the results folder) from running the same seed or kept-fraction runs: a claim is a file created with
O_EXCL that names its holder (host and pid), kept fresh by a heartbeat, and taken over once stale: at
once when its holder ran on this host and that pid is gone (a SIGKILLed driver), else after ``grace``
seconds without a heartbeat (a holder on another host, whose pid cannot be looked up from here).
"""

from __future__ import annotations

import json
import math
import os
import re
import secrets
import socket
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

STAGES = ("sweep", "seeds", "kept")


@dataclass
class Problem:
    path: Path
    reason: str

    def __str__(self) -> str:
        return f"{self.path}: {self.reason}"


@dataclass
class Loaded:
    records: list[dict] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)


def folder_identity(results: Path, fresh: bool = False) -> dict:
    """The results folder's ``run.json`` ({"id", "created", "fresh"}), created if missing; concurrent
    creators agree (the file is linked into place, which fails if another got there first)."""
    path = results / "run.json"
    if not path.exists():
        results.mkdir(parents=True, exist_ok=True)
        ident = {"id": time.strftime("%Y%m%d-%H%M%S-") + secrets.token_hex(3),
                 "created": time.strftime("%Y-%m-%dT%H:%M:%S"), "fresh": bool(fresh)}
        tmp = results / f".run.json.{os.getpid()}.{secrets.token_hex(4)}"
        tmp.write_text(json.dumps(ident, indent=1) + "\n", encoding="utf-8")
        try:
            os.link(tmp, path)
        except FileExistsError:
            pass
        finally:
            tmp.unlink(missing_ok=True)
    return json.loads(path.read_text(encoding="utf-8"))


def _read(path: Path) -> tuple[dict | None, str | None]:
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        return None, f"cannot be read ({exc.strerror or exc})"
    except ValueError as exc:
        return None, f"is not valid JSON (truncated by a kill or a full disk?): {exc}"
    if not isinstance(record, dict):
        return None, "is not a run record (not a JSON object)"
    missing = [k for k in ("run_id", "model", "method", "task", "status") if k not in record]
    if missing:
        return None, f"is not a run record (no {', '.join(missing)})"
    return record, None


def harvest(work: Path, records_dir: Path, results_id: str | None) -> tuple[int, list[Problem]]:
    """Copy the finished run records under ``work`` that belong to this results folder (``results_id``;
    None: any) into ``records_dir/<stage>/<study>/<run_id>.json``; returns (new copies, unreadable)."""
    copied, problems = 0, []
    if not work.exists():
        return 0, problems
    for path in sorted(work.rglob("record.json")):
        record, why = _read(path)
        if record is None:
            problems.append(Problem(path, why))
            continue
        meta = (record.get("config") or {}).get("reproduce") or {}
        if meta.get("stage") not in STAGES or record.get("status") == "interrupted":
            continue
        if results_id is not None and meta.get("results_id") != results_id:
            continue  # a run of another results folder (moved aside, or an earlier fresh start)
        study = f"{record['model']}-{record['method']}-{record['task']}"
        target = records_dir / meta["stage"] / study / f"{record['run_id']}.json"
        if target.exists():
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
        tmp.write_bytes(path.read_bytes())
        os.replace(tmp, target)
        copied += 1
    return copied, problems


def load_records(records_dir: Path) -> Loaded:
    """Every record under ``records_dir/<stage>/<study>/*.json`` with ``_stage`` added, sorted by path,
    and the files that could not be read."""
    out = Loaded()
    for path in sorted(Path(records_dir).glob("*/*/*.json")):
        record, why = _read(path)
        if record is None:
            out.problems.append(Problem(path, why))
            continue
        record["_stage"] = path.parent.parent.name
        out.records.append(record)
    return out


def describe_problems(problems: Iterable[Problem], what: str = "left out of the tables") -> list[str]:
    problems = list(problems)
    if not problems:
        return []
    return [f"{len(problems)} run record(s) could not be read and are {what}; rerun or delete them:",
            *(f"  - {p}" for p in problems)]


# ------------------------------------------------------------------------------------------ settings
def setting(record: dict) -> tuple[float | None, int | None]:
    trainer = (record.get("config") or {}).get("trainer") or {}
    lr, bs = trainer.get("lr"), trainer.get("batch_size")
    return (float(lr) if lr is not None else None), (int(bs) if bs is not None else None)


def same_lr(a: float | None, b: float | None) -> bool:
    return a is not None and b is not None and math.isclose(a, b, rel_tol=1e-9, abs_tol=0.0)


def done_seeds(records: list[dict], stage: str, model: str, method: str, task: str, lr: float, batch_size: int,
               k: float | None = None) -> set[int]:
    """Seeds already run to the end (completed or diverged) with this setting."""
    seeds = set()
    for r in records:
        if r["_stage"] != stage or (r["model"], r["method"], r["task"]) != (model, method, task):
            continue
        if r.get("status") not in ("completed", "diverged"):
            continue
        r_lr, r_bs = setting(r)
        if not same_lr(r_lr, lr) or r_bs != batch_size:
            continue
        if k is not None and not same_lr(float((r["config"].get("method") or {}).get("k") or -1), k):
            continue
        seeds.add(int(r["seed"]))
    return seeds


def finished_sweep_record(records: Sequence[dict], name: str, params: dict) -> dict | None:
    """The completed sweep record of study ``name`` run with exactly these trial params, if any."""
    lr, bs = params.get("trainer.lr"), params.get("trainer.batch_size")
    if lr is None or bs is None:
        return None
    for r in records:
        if (r.get("_stage") == "sweep" and f"{r['model']}-{r['method']}-{r['task']}" == name
                and r.get("status") == "completed" and r.get("objective") is not None):
            r_lr, r_bs = setting(r)
            if same_lr(r_lr, float(lr)) and r_bs == int(bs):
                return r
    return None


def best_sweep_records(records: list[dict]) -> dict[tuple[str, str, str], dict]:
    """The best completed sweep record per (model, method, task) under the one tie-break rule
    (:func:`sparsegrad.suite.sweep.studies.tie_break_key`) that the driver uses to pick the seeds' setting."""
    from sparsegrad.suite.sweep.studies import pick_best

    groups: dict[tuple[str, str, str], list[dict]] = {}
    for r in records:
        if r.get("_stage") == "sweep" and r.get("status") == "completed" and r.get("objective") is not None:
            groups.setdefault((r["model"], r["method"], r["task"]), []).append(r)
    out = {}
    for key, rs in groups.items():
        higher = (rs[0].get("main_metric") or {}).get("higher_is_better", True)
        out[key] = pick_best(((float(r["objective"]), f"{r.get('started_at') or ''}|{r['run_id']}", r) for r in rs),
                             higher)
    return out


def run_folder_stamp() -> str:
    """A run folder name no other worker uses: time, host, process and a random tag (threads)."""
    return f"{time.strftime('%Y%m%d-%H%M%S')}-{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(2)}"


# -------------------------------------------------------------------------------------------- claims
HOLDER = re.compile(r"^(?P<host>\S+) pid (?P<pid>\d+)\b")


def holder_gone(text: str | None) -> bool:
    """Whether the claim holder ``text`` ("<host> pid <pid> since ...") is a process of this host that no
    longer exists. A holder on another host, or one that cannot be parsed, is never judged gone here."""
    match = HOLDER.match(text or "")
    if match is None or match["host"] != socket.gethostname():
        return False
    pid = int(match["pid"])
    if pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return True
    except PermissionError:  # it exists, under another user
        return False
    return False


class Claim:
    """An exclusive claim on a unit of work, shared through a folder: ``with Claim(dir, key) as got:``.

    After :meth:`acquire`, ``taken_from`` names the holder of a stale claim this one replaced (None when
    the claim was free)."""

    def __init__(self, folder: Path, key: str, grace: float = 60.0, interval: float = 10.0):
        self.path = Path(folder) / f"{key}.claim"
        self.grace, self.interval = grace, interval
        self.held = False
        self.taken_from: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _create(self) -> bool:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as fh:
            fh.write(f"{socket.gethostname()} pid {os.getpid()} since {time.strftime('%H:%M:%S')}\n")
        return True

    def holder(self) -> str | None:
        try:
            return self.path.read_text(encoding="utf-8").strip()
        except OSError:
            return None

    def stale(self) -> bool:
        """The claim's holder is gone: its pid no longer exists on this host, or no heartbeat for ``grace`` s."""
        try:
            age = time.time() - self.path.stat().st_mtime
        except FileNotFoundError:
            return True
        return age >= self.grace or holder_gone(self.holder())

    def _take_over(self, judged: str | None) -> bool:
        """Move the stale claim (holder text ``judged``) aside; False when another taker was quicker."""
        aside = self.path.with_name(f"{self.path.name}.stale-{os.getpid()}-{secrets.token_hex(2)}")
        try:
            os.rename(self.path, aside)
        except FileNotFoundError:
            return True  # another taker moved it; the O_EXCL create decides between us
        try:
            moved = aside.read_text(encoding="utf-8").strip()
        except OSError:
            moved = None
        if moved != judged:  # between the look and the rename another taker put a live claim there: give it back
            try:
                os.link(aside, self.path)
            except FileExistsError:
                pass
            aside.unlink(missing_ok=True)
            return False
        return True

    def acquire(self) -> bool:
        if not self._create():
            judged = self.holder()
            if not self.stale() or not self._take_over(judged) or not self._create():
                return False
            self.taken_from = judged
        self.held = True
        self._thread = threading.Thread(target=self._beat, daemon=True)
        self._thread.start()
        return True

    def _beat(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                os.utime(self.path)
            except OSError:
                pass  # moved aside for a moment by a taker that then gave it back: beat on

    def release(self) -> None:
        if self.held:
            self._stop.set()
            self.path.unlink(missing_ok=True)
            self.held = False

    def __enter__(self) -> bool:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
