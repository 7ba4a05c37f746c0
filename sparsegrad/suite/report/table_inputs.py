"""What the paper's tables are built from: run records, the paper's own numbers, benchmark reports.

A record is the JSON of :mod:`sparsegrad.suite.run.record` with one extra key, ``_stage`` — ``sweep`` (an
Optuna trial), ``seeds`` (the best setting re-run over seeds) or ``kept`` (SparseGrad at another kept
fraction k) — taken from the folder it was found in. This module selects and groups them (the seed
re-runs at the chosen setting, the best trial, per-cell scores); :mod:`sparsegrad.suite.report.tables` turns
them into tables.
"""

from __future__ import annotations

import csv
import json
import math
from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from sparsegrad.suite.run.measure import CUDA_GAUGE, RSS_GAUGE

PAPER_CSV = Path(__file__).resolve().parents[3] / "results" / "paper" / "paper_numbers.csv"
# the paper's row a method config stands for (the paper's LoRA and MeProp numbers are the authors' variants)
PAPER_METHOD = {"lora_authors": "lora", "meprop_adamw": "meprop"}
# (out x in) of each MLP matrix, to turn a budget k (a count) into the kept share
MLP_MATRIX_ENTRIES = {"tiny_bert": 32 * 64, "tiny_roberta": 32 * 64, "minilm": 384 * 1536, "bert_base": 768 * 3072,
                      "roberta_base": 768 * 3072, "roberta_large": 1024 * 4096, "smollm2": 576 * 1536,
                      "llama2_7b": 4096 * 11008, "tiny_llama": 32 * 64}
LOSS_METRICS = ("loss", "perplexity")


def mean_std(values: list[float]) -> tuple[float | None, float | None]:
    if not values:
        return None, None
    m = sum(values) / len(values)
    if len(values) == 1:
        return m, None
    return m, math.sqrt(sum((v - m) ** 2 for v in values) / len(values))



# ------------------------------------------------------------------------------------------- paper
@dataclass
class Paper:
    """The paper's numbers (results/paper/paper_numbers.csv) keyed by (table, model, method, setting, task, quantity)."""

    rows: dict[tuple[str, str, str, str, str, str], tuple[str, str]]

    @classmethod
    def load(cls, path: Path = PAPER_CSV) -> Paper:
        rows = {}
        with open(path, encoding="utf-8") as fh:
            for r in csv.DictReader(fh):
                key = (r["table"], r["model"], r["method"], r["setting"], r["task"], r["quantity"])
                rows[key] = (r["value"], r["std"])
        return cls(rows)

    def raw(self, table, model, method, task, quantity, setting="") -> str | None:
        method = PAPER_METHOD.get(method, method)
        hit = self.rows.get((table, model, method, setting, task, quantity))
        return hit[0] if hit else None

    def get(self, table, model, method, task, quantity, setting="") -> tuple[float | None, float | None]:
        method = PAPER_METHOD.get(method, method)
        hit = self.rows.get((table, model, method, setting, task, quantity))
        if not hit:
            return None, None
        try:
            value = float(hit[0])
        except ValueError:
            return None, None
        return value, (float(hit[1]) if hit[1] not in ("", None) else None)


@dataclass
class Analogue:
    """Which paper model / task each of ours stands in for (identity for the paper's own)."""

    models: Mapping[str, str] = field(default_factory=dict)
    tasks: Mapping[str, str] = field(default_factory=dict)

    def model(self, name: str) -> str:
        return self.models.get(name, name)

    def task(self, name: str) -> str:
        return self.tasks.get(name, name)

    def used(self, models: Iterable[str], tasks: Iterable[str]) -> list[str]:
        pairs = [f"{m} ↔ {self.models[m]}" for m in sorted(set(models)) if m in self.models]
        pairs += [f"{t} ↔ {self.tasks[t]}" for t in sorted(set(tasks)) if t in self.tasks]
        return pairs


# ----------------------------------------------------------------------------------------- records
def score_of(record: dict) -> float | None:
    best = record.get("best") or {}
    score = best.get("score")
    if score is None:
        return None
    name = (record.get("main_metric") or {}).get("name", "")
    return float(score) if name in LOSS_METRICS else 100.0 * float(score)


def setting_of(record: dict) -> tuple[float | None, int | None]:
    trainer = (record.get("config") or {}).get("trainer") or {}
    lr, bs = trainer.get("lr"), trainer.get("batch_size")
    return (float(lr) if lr is not None else None), (int(bs) if bs is not None else None)


def kept_percent(record: dict) -> float | None:
    """Share of each MLP gradient SparseGrad keeps, in percent."""
    k = ((record.get("config") or {}).get("method") or {}).get("k")
    if k is None:
        return None
    k = float(k)
    if k <= 1.0:
        return 100.0 * k
    entries = MLP_MATRIX_ENTRIES.get(record.get("model", ""))
    return 100.0 * k / entries if entries else None


def trainable_params(record: dict) -> int | None:
    p = record.get("parameters") or {}
    if not p.get("total"):
        return None
    return int(p.get("trainable_dense") or 0) + int(p.get("sparse_budget_total") or 0)


def device_of(record: dict) -> str:
    env = record.get("environment") or {}
    return str(env.get("device") or (record.get("memory") or {}).get("device_type") or "?")


def by_stage(records: Iterable[dict], stage: str) -> list[dict]:
    return [r for r in records if r.get("_stage") == stage]


def final_runs(records: list[dict]) -> list[dict]:
    """The seed re-runs; for each (model, method, task) only those at its most common (lr, batch) setting."""
    groups: dict[tuple, dict[tuple, list[dict]]] = defaultdict(lambda: defaultdict(list))
    for r in by_stage(records, "seeds"):
        groups[(r["model"], r["method"], r["task"])][setting_of(r)].append(r)
    best = best_trials(records)
    out = []
    for key, by_setting in groups.items():
        chosen = None
        if key in best:
            target = setting_of(best[key])
            chosen = next((s for s in by_setting if s[1] == target[1] and s[0] is not None and target[0] is not None
                           and math.isclose(s[0], target[0], rel_tol=1e-9)), None)
        if chosen is None:
            chosen = max(by_setting, key=lambda s: (len(by_setting[s]), s[0] or 0))
        out += by_setting[chosen]
    return out


def best_trials(records: list[dict]) -> dict[tuple[str, str, str], dict]:
    """The best completed sweep trial per (model, method, task), by the driver's own tie-break rule."""
    from sparsegrad.suite.sweep.runrecords import best_sweep_records

    return best_sweep_records(records)


@dataclass
class Cell:
    scores: list[float]
    not_completed: int
    records: list[dict]

    @property
    def mean(self):
        return mean_std(self.scores)[0]

    @property
    def std(self):
        return mean_std(self.scores)[1]


def cells(runs: list[dict]) -> dict[tuple[str, str, str], Cell]:
    out: dict[tuple[str, str, str], Cell] = {}
    for r in sorted(runs, key=lambda r: (r["model"], r["method"], r["task"], r.get("seed", 0))):
        cell = out.setdefault((r["model"], r["method"], r["task"]), Cell([], 0, []))
        s = score_of(r)
        if r.get("status") == "completed" and s is not None:
            cell.scores.append(s)
            cell.records.append(r)
        else:
            cell.not_completed += 1
    return out



# ------------------------------------------------------------------------------------- benchmarks
def bench_reports(bench_dir: Path | None, pattern: str = "*.json"):
    """(path, report) of every readable benchmark report in ``bench_dir`` whose name matches ``pattern``."""
    if bench_dir is None or not Path(bench_dir).exists():
        return
    for path in sorted(Path(bench_dir).glob(pattern)):
        try:
            yield path, json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue


def bench_shapes(report: dict):
    """(shape, model, {method: row}) of each shape of a ``python -m experiments.benchmark`` report (``summary``
    {shape: {"methods": ...}}, ``shape_defs`` naming each shape's model); failed rows left out."""
    models = {d.get("key"): d.get("model") for d in report.get("shape_defs") or [] if isinstance(d, dict)}
    for shape, block in report["summary"].items():
        rows = {m: row for m, row in (block.get("methods") or {}).items() if isinstance(row, dict) and "error" not in row}
        yield shape, str(models.get(shape) or shape.split(" ")[0]).replace("-", "_"), rows


def load_bench(bench_dir: Path | None) -> list[dict]:
    """CUDA benchmark entries from ``results/bench/cuda-*.json`` (the report of ``python -m experiments.benchmark``:
    ``machine`` and ``summary`` {shape: {"methods": {method: {steps_per_s, peak_mb}}}}, with ``shape_defs``
    naming each shape's model), as {device, model, method, task, setting, steps_per_second, peak_memory_mb,
    source}. A plain list of such entries (or {"device", "results": [...]}) is read too."""
    entries = []
    for path, data in bench_reports(bench_dir, "cuda-*.json"):
        if isinstance(data, dict) and isinstance(data.get("summary"), dict):
            machine = data.get("machine") or {}
            device = machine.get("gpu") or machine.get("device") or "cuda"
            for shape, model, rows in bench_shapes(data):
                for method, row in rows.items():
                    base, setting = method, ""
                    if method == "sparsegrad_regular":
                        base, setting = "sparsegrad", "regular_matmul"
                    entries.append({"device": device, "model": model, "method": base, "task": "avg",
                                    "setting": setting, "shape": shape, "steps_per_second": row.get("steps_per_s"),
                                    "peak_memory_mb": row.get("peak_mb"), "source": path.name})
            continue
        items = data if isinstance(data, list) else (data.get("results") or data.get("runs") or [])
        device = data.get("device") if isinstance(data, dict) else None
        for item in items if isinstance(items, list) else []:
            if not isinstance(item, dict) or "method" not in item:
                continue
            sps = item.get("steps_per_second", item.get("steps_per_s"))
            mem = item.get("peak_memory_mb")
            if mem is None and item.get("peak_memory_bytes") is not None:
                mem = item["peak_memory_bytes"] / 2**20
            entries.append({"device": item.get("device") or device or "cuda", "model": item.get("model", "?"),
                            "method": item["method"], "task": item.get("task", "avg"),
                            "setting": item.get("setting", ""), "shape": item.get("shape", ""),
                            "steps_per_second": sps, "peak_memory_mb": mem, "source": path.name})
    return entries


def load_bench_memory(bench_dir: Path | None) -> list[dict]:
    """Peak training memory per method from ``make bench``'s reports (``results/bench/*.json``): one entry per
    shape, {source, model, shape, device, gauge, peaks {method: MB}}. CPU reports without a ``memory_gauge``
    were gauged by the peak RSS above the loaded model; CUDA ones by the allocator's peak."""
    out = []
    for path, data in bench_reports(bench_dir):
        if not isinstance(data, dict) or not isinstance(data.get("summary"), dict):
            continue
        device = str(data.get("device") or (data.get("machine") or {}).get("device") or "")
        gauge = data.get("memory_gauge") or (CUDA_GAUGE if device.startswith("cuda") else RSS_GAUGE)
        for shape, model, rows in bench_shapes(data):
            rows = {m: row for m, row in rows.items() if row.get("peak_mb") is not None}
            gauges = {row.get("memory_gauge") or gauge for row in rows.values()}
            out.append({"source": path.name, "model": model, "shape": shape, "device": device,
                        "gauge": gauges.pop() if len(gauges) == 1 else gauge,
                        "peaks": {m: row["peak_mb"] for m, row in rows.items()}})
    return out
