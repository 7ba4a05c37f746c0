"""The findings table: does this profile's data confirm the paper's claims, at this scale?

One row per claim of the paper and per model/setting of the profile (a model config such as
``minilm`` is the paper's setting, ``minilm_mlp`` the MLP-only one):

(a) SparseGrad ≥ LoRA at the same trainable budget (score);  (b) SparseGrad ≥ MeProp (score);
(c) SparseGrad within 1 point of full fine-tuning (score);  (d) peak memory LoRA < SparseGrad < full FT;
(e) steps/s LoRA > SparseGrad > full FT;  (f) the weight gradient is sparser in SparseGrad's (HOSVD)
basis than in the original one (share of gradient energy in the top 1% of entries);
(g) SparseGrad reaches the lowest validation loss of the four methods (Table 6; loss tasks only).

How a difference and its interval are computed (:mod:`sparsegrad.suite.report.stats`): the methods' seed
re-runs are paired by seed (same data order, same initial head); for each seed the difference of the
two methods is averaged over the profile's tasks (the paper's claims are about its task average);
the 95% interval is Student's t over those per-seed differences. It covers seed-to-seed (training)
variation on this fixed test split. The test split's own sampling error is shown beside it, not folded
in: the same mean paired difference recomputed on bootstrap resamples of the test examples (the
records' per-example results of the scored checkpoint; the same resample for every method and seed).
Claim (f) pairs the two bases per MLP layer of the sparsity analysis (each layer's share averaged over
its evaluation batches) and takes the t interval over layers.

The power of each claim (:mod:`sparsegrad.suite.report.stats`): the smallest difference the design
detects at 80% power (two-sided 5%) from the observed spread of the paired differences, and the
number of seeds that would decide the paper's own difference with that spread.

Memory (claim (d)) is the training phase's peak of live tensor bytes (``memory.gauge``: the CUDA
allocator's peak, or its CPU analogue :mod:`sparsegrad.suite.run.live_bytes`); records written
before that gauge (CPU: peak RSS) fall back to the RSS that training added, and the row says so. The
row also sets the direction beside the one ``make bench`` measured for the same model, when
``results/bench`` holds one.

Everything is a pure function of the run records (and the sparsity-analysis record), as every table is.
"""

from __future__ import annotations

import csv
import json
import math
import statistics
from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from sparsegrad.suite.report import stats
from sparsegrad.suite.run import measure
from sparsegrad.suite.run.convergence import converged, late_change

PAPER_CSV = Path(__file__).resolve().parents[3] / "results" / "paper" / "paper_numbers.csv"
LOSS_METRICS = ("loss", "perplexity")
C_MARGIN = -1.0  # claim (c): SparseGrad - full FT > -1 point
CLAIMS = {
    "a": "SparseGrad ≥ LoRA (score, same trainable budget)",
    "b": "SparseGrad ≥ MeProp (score)",
    "c": "SparseGrad within 1 point of full FT (score)",
    "d": "peak memory LoRA < SparseGrad < full FT",
    "e": "steps/s LoRA > SparseGrad > full FT",
    "f": "gradient sparser in the HOSVD basis (top-1% energy share)",
    "g": "SparseGrad has the lowest validation loss (Table 6)",
}
BOOTSTRAP_RESAMPLES = 2000
BOOTSTRAP_SEED = 0  # one fixed stream: the table is a pure function of the records
RULE = [
    "Verdict rule (95% intervals): a claim that a difference is positive — SparseGrad better than the other "
    "method for (a), (b), (g); the stated ordering for each half of (d) and (e); HOSVD share above the original "
    "for (f) — is **confirmed** when the whole interval lies above 0, **contradicted** when the whole interval "
    "lies below 0, and **inconclusive** when it contains 0 or has fewer than 2 paired seeds. Claim (c) is "
    "confirmed when the whole interval of SparseGrad − full FT lies above −1 point, contradicted when it lies "
    "below −1. Claims with several parts — (d), (e), (g) — are confirmed when every part is, contradicted "
    "when any part is, else inconclusive.",
    "Interval: paired over seeds — per seed, the two methods' difference averaged over the listed tasks; "
    "mean ± t(0.975, n−1)·sd/√n over the n seeds both methods completed. It covers training (seed) variation on "
    "this fixed test split. (f): paired per MLP layer of the sparsity analysis, t interval over layers.",
    f"Test split ±: the test split's own sampling error, shown beside the seed interval and not folded into it "
    f"(the verdict uses the seed interval alone): half the width of the central 95% of the same mean paired "
    f"difference recomputed on {BOOTSTRAP_RESAMPLES:,} bootstrap resamples of the test examples (each task's test "
    f"split resampled with replacement, the same resample for every method and seed; the per-example results of "
    f"the scored checkpoints in the records). 'unavailable': records written before they held per-example results.",
    "Detectable: the smallest difference this design detects with 80% power in a two-sided 5% test, from the "
    "observed spread of the paired differences: MDE = (t(0.975, n−1) + t(0.80, n−1))·sd/√n, sd the sample "
    "standard deviation of the n paired differences. Seeds for the paper's Δ: the smallest n ≥ 2 with "
    "(t(0.975, n−1) + t(0.80, n−1))·sd/√n ≤ |paper's difference|, solved by stepping n up (\">1000\": more than "
    "1,000). The paper's difference is in the claim's units: for (c) its distance from the −1 margin; for (d) and "
    "(e) the paper's ratio of the two methods applied to our mean of the second one (MB and steps/s do not carry "
    "across devices and models).",
    "Scores are the main metric ×100 on the test split of the checkpoint each run scores: the best one on held-out "
    "data (trainer.checkpoint=best) or the last one of a fixed budget (trainer.checkpoint=final), as the notes "
    "column says; for loss tasks lower is better and a difference is shown as SparseGrad − other (negative: SparseGrad better).",
]


@dataclass
class Finding:
    claim: str  # a..g
    model: str
    setting: str
    tasks: list[str]
    paper: str  # the paper's own figure, as text
    ours: str  # our difference(s) with interval(s), as text
    n: int  # paired seeds (or layers for (f))
    verdict: str
    parts: list[tuple[str, stats.Interval, str]] = field(default_factory=list)  # (label, interval, verdict)
    notes: list[str] = field(default_factory=list)
    power: list[Power] = field(default_factory=list)  # one per part
    digits: int = 1  # how the difference and the detectable difference are printed
    unit: str = ""


@dataclass
class Power:
    """How far one part of a claim is from being decided, and the test split's own sampling error."""

    detectable: float | None  # MDE at 80% power from the observed spread (stats.detectable_difference)
    paper_difference: float | None  # the paper's difference in our units (None: the paper gives none)
    seeds_needed: int | None  # seeds that decide the paper's difference (None: more than stats.MAX_SEEDS)
    test_split: tuple[float, float] | str | None = None  # bootstrap interval, or why there is none

    @classmethod
    def of(cls, iv: stats.Interval, paper_difference: float | None, test_split=None) -> Power:
        return cls(stats.detectable_difference(iv.sd, iv.n), paper_difference,
                   stats.seeds_needed(paper_difference, iv.sd), test_split)


# ------------------------------------------------------------------------------------------ inputs
def load_paper(path: Path = PAPER_CSV) -> dict[tuple[str, str, str, str, str, str], float]:
    """The paper's numeric values keyed by (table, model, method, setting, task, quantity)."""
    out = {}
    with open(path, encoding="utf-8") as fh:
        for r in csv.DictReader(fh):
            try:
                out[(r["table"], r["model"], r["method"], r["setting"], r["task"], r["quantity"])] = float(r["value"])
            except ValueError:
                continue
    return out


def setting_label(record: dict) -> str:
    model = (record.get("config") or {}).get("model") or {}
    if model.get("train_non_mlp", True):
        return "paper: all parameters trainable"
    if model.get("train_head"):
        return "MLP only (+ task head)"
    every = model.get("every_nth_block") or 1
    return "MLP only" + (f", every {every}rd block" if every == 3 else f", every {every}th block" if every > 1 else "")


def _score(record: dict) -> float | None:
    best = record.get("best") or {}
    score = best.get("score")
    if score is None or record.get("status") != "completed":
        return None
    name = (record.get("main_metric") or {}).get("name", "")
    return float(score) if name in LOSS_METRICS else 100.0 * float(score)


LIVE_GAUGES = (measure.LIVE_GAUGE, measure.CUDA_GAUGE)


def _memory_mb(record: dict) -> float | None:
    """The training phase's peak of live tensor bytes (MB)."""
    b = (record.get("memory") or {}).get("train_peak_bytes")
    return None if b is None or record.get("status") != "completed" else b / 2**20


def _rss_added_mb(record: dict) -> float | None:
    """What training added to the process's peak RSS (MB): the fallback for records without live tensor bytes."""
    memory = record.get("memory") or {}
    rss = memory.get("rss") if measure.record_gauge(memory) in LIVE_GAUGES else memory
    peak, base = (rss or {}).get("train_peak_bytes"), (rss or {}).get("baseline_bytes")
    return None if peak is None or base is None or record.get("status") != "completed" else (peak - base) / 2**20


def _rss_mb(record: dict) -> float | None:
    memory = record.get("memory") or {}
    rss = memory.get("rss") if measure.record_gauge(memory) in LIVE_GAUGES else memory
    peak = (rss or {}).get("train_peak_bytes")
    return None if peak is None or record.get("status") != "completed" else peak / 2**20


def _basis_mb(record: dict) -> float | None:
    b = (record.get("memory") or {}).get("basis_peak_bytes")
    return None if b is None or record.get("status") != "completed" else b / 2**20


def _steps_per_s(record: dict) -> float | None:
    v = (record.get("training") or {}).get("steps_per_second")
    return None if v is None or record.get("status") != "completed" else float(v)


def seed_runs(records: list[dict]) -> dict[tuple[str, str, str], dict[int, dict]]:
    """(model, method, task) -> {seed: record} of the final seed re-runs (one setting per cell)."""
    from sparsegrad.suite.report.table_inputs import final_runs

    out: dict[tuple[str, str, str], dict[int, dict]] = defaultdict(dict)
    for r in final_runs(records):
        out[(r["model"], r["method"], r["task"])][int(r["seed"])] = r
    return out


ROLES = ("full", "lora", "meprop", "sparsegrad")  # the methods a claim compares, by the kind of method


def by_role(cells: Mapping[tuple[str, str, str], dict[int, dict]]):
    """Re-key ``cells`` by role: a variant (``meprop_adamw``, ``lora_authors``) fills its kind's role when the
    profile has no run of the plain method. Returns (cells, {(model, role): the variant's name})."""
    kinds: dict[tuple[str, str], set[str]] = defaultdict(set)  # (model, role) -> method names of that kind
    for (model, method, _task), runs in cells.items():
        record = next(iter(runs.values()))
        kind = str(((record.get("config") or {}).get("method") or {}).get("kind") or method)
        if kind in ROLES:
            kinds[(model, kind)].add(method)
    chosen = {key: (key[1] if key[1] in names else sorted(names)[0]) for key, names in kinds.items()}
    role_of = {(model, name): role for (model, role), name in chosen.items()}
    out = {(model, role_of[(model, method)], task): runs for (model, method, task), runs in cells.items()
           if (model, method) in role_of}
    return out, {key: name for key, name in chosen.items() if name != key[1]}


def per_seed(cells: Mapping[tuple[str, str, str], dict[int, dict]], model: str, method: str, tasks: list[str],
             value) -> dict[int, float]:
    """{seed: mean over ``tasks`` of value(record)}, for seeds with a value on every task."""
    out = {}
    seeds = set.intersection(*(set(cells.get((model, method, t), {})) for t in tasks)) if tasks else set()
    for s in sorted(seeds):
        vs = [value(cells[(model, method, t)][s]) for t in tasks]
        if all(v is not None and math.isfinite(v) for v in vs):
            out[s] = sum(vs) / len(vs)
    return out


# ----------------------------------------------------------------------------------------- format
def _num(x: float | None, digits: int) -> str:
    return "—" if x is None else f"{x:+.{digits}f}"


def fmt_interval(iv: stats.Interval, digits: int = 1, unit: str = "") -> str:
    if iv.mean is None:
        return "—"
    if not iv.exists:
        return f"{_num(iv.mean, digits)}{unit} (n={iv.n}, no interval)"
    return f"{_num(iv.mean, digits)}{unit} [{_num(iv.lo, digits)}, {_num(iv.hi, digits)}]"


# ---------------------------------------------------------------------------------------- claims
def _diff(cells, model, tasks, a: str, b: str, value) -> stats.Interval:
    return stats.t_interval(stats.paired_differences(per_seed(cells, model, a, tasks, value),
                                                     per_seed(cells, model, b, tasks, value)).values())


def _paper_avg(paper, pmodel: str, method: str) -> float | None:
    for table in ("5", "9", "10", "4"):
        v = paper.get((table, pmodel, method, "", "avg", "score"))
        if v is not None:
            return v
    return None


def _paper_score_diff(paper, pmodel: str, a: str, b: str) -> tuple[str, float | None]:
    """The paper's difference a - b of GLUE averages: (as text, as a number)."""
    pa, pb = _paper_avg(paper, pmodel, a), _paper_avg(paper, pmodel, b)
    if pa is None or pb is None:
        return "—", None
    return f"{pa - pb:+.1f} ({pmodel} GLUE avg {pa:.1f} vs {pb:.1f})", pa - pb


def _paper_loss(paper, pmodel: str, ptask: str, method: str) -> float | None:
    return paper.get(("6", pmodel, method, "", ptask, "valid_loss"))


def _paper_loss_diff(paper, pmodel: str, ptask: str, a: str, b: str) -> tuple[str, float | None]:
    pa, pb = _paper_loss(paper, pmodel, ptask, a), _paper_loss(paper, pmodel, ptask, b)
    if pa is None or pb is None:
        return "—", None
    return f"{pa - pb:+.3f} ({pmodel} valid loss {pa:.3f} vs {pb:.3f})", pa - pb


def _paper_table3(paper, quantity: str) -> dict[str, float | None]:
    return {m: paper.get(("3", "roberta_base", m, "sparse_by_dense" if m == "sparsegrad" else "", "avg", quantity))
            for m in ("lora", "sparsegrad", "full")}


def _paper_order(paper, quantity: str, digits: int) -> str:
    vals = _paper_table3(paper, quantity)
    if any(v is None for v in vals.values()):
        return "—"
    sign = "<" if quantity == "peak_memory_mb" else ">"
    return (f"LoRA {vals['lora']:.{digits}f} {sign} SparseGrad {vals['sparsegrad']:.{digits}f} {sign} "
            f"FT {vals['full']:.{digits}f} (roberta_base, Table 3)")


def _paper_ratio_difference(paper_a: float | None, paper_b: float | None, ours_b: float | None) -> float | None:
    """The paper's a - b as a share of b, applied to our mean of b (units that carry across devices and models)."""
    if paper_a is None or not paper_b or ours_b is None:
        return None
    return (paper_a - paper_b) / paper_b * ours_b


def _mean(values) -> float | None:
    vs = list(values)
    return sum(vs) / len(vs) if vs else None


def _run_notes(cells, model: str, methods: list[str], tasks: list[str]) -> list[str]:
    runs = [r for m in methods for t in tasks for r in cells.get((model, m, t), {}).values()]
    capped = sum(1 for r in runs if r.get("status") == "completed" and converged(r) is False)
    bad = sum(1 for r in runs if r.get("status") != "completed")
    notes = []
    steps = sorted(int((r.get("training") or {}).get("optimizer_steps") or 0) for r in runs if r.get("status") == "completed")
    bests = sorted(int((r.get("best") or {}).get("step") or 0) for r in runs if r.get("status") == "completed")
    policies = {((r.get("config") or {}).get("trainer") or {}).get("checkpoint", "best") for r in runs}
    if steps and steps[-1] > 0 and policies == {"final"}:
        notes.append(f"steps run: median {steps[len(steps) // 2]} (the final checkpoint scored)")
    elif steps and steps[-1] > 0:
        notes.append(f"steps run: median {steps[len(steps) // 2]} (best checkpoint at median step {bests[len(bests) // 2]})")
    if capped:
        notes.append(f"{capped}/{len(runs)} runs stopped by the step cap or the end of the epochs, not by the "
                     "convergence criterion" + _still_moving(runs))
    if bad:
        notes.append(f"{bad}/{len(runs)} runs diverged or failed (left out)")
    return notes


def _still_moving(runs: list[dict]) -> str:
    """How far from converged the runs that did not converge were: per method, the median over its seeds of
    the selection metric's slope over its last 3 evaluations (per 10 steps; ×100 for scores)."""
    slopes: dict[str, list[float]] = {}
    for r in runs:
        change = late_change(r) if r.get("status") == "completed" and converged(r) is False else None
        if change is not None:
            higher = (r.get("main_metric") or {}).get("higher_is_better", True)
            slopes.setdefault(r["method"], []).append(100 * change if higher else change)
    if not slopes:
        return ""
    parts = [f"{m} {statistics.median(v):+.3f}" for m, v in sorted(slopes.items())]
    return ("; still moving when they stopped (selection metric per 10 steps over their last 3 evaluations, "
            "median): " + ", ".join(parts))


# ------------------------------------------------------------------------- the test split's error
def _example_count(record: dict) -> int | None:
    entry = record.get("examples")
    return int(entry["n"]) if entry else None


def _resampled_scores(record: dict, index):
    """The record's score (as :func:`_score` gives it) on each resample of its test examples (rows of ``index``)."""
    import numpy as np

    from sparsegrad.suite.run import examples as examples_lib

    entry = record["examples"]
    kind, name = entry["kind"], (record.get("main_metric") or {}).get("name")
    data = examples_lib.arrays(entry)
    scale = 1.0 if name in LOSS_METRICS else 100.0
    if name == "accuracy" and "predictions" in data:
        return scale * examples_lib.accuracy_resamples(data, index)
    return scale * np.asarray([examples_lib.metric(kind, data, name, row) for row in index])


def test_split_bootstrap(cells, model: str, tasks: list[str], a: str, b: str) -> tuple[float, float] | str:
    """The central 95% of the mean paired difference a - b (the statistic of :func:`_diff`) over bootstrap
    resamples of each task's test examples, the same resample for every method and seed; or why there is none."""
    import numpy as np

    seeds = sorted(set(per_seed(cells, model, a, tasks, _score)) & set(per_seed(cells, model, b, tasks, _score)))
    if not seeds:
        return "—"
    rng = np.random.default_rng(BOOTSTRAP_SEED)
    total = np.zeros(BOOTSTRAP_RESAMPLES)
    for task in tasks:
        runs = {(m, s): cells[(model, m, task)][s] for s in seeds for m in (a, b)}
        sizes = {_example_count(r) for r in runs.values()}
        if None in sizes:
            return "unavailable"
        if len(sizes) != 1:
            return "unavailable (the runs' test splits differ)"
        n = sizes.pop()
        index = rng.integers(0, n, size=(BOOTSTRAP_RESAMPLES, n))
        for s in seeds:
            total += _resampled_scores(runs[(a, s)], index) - _resampled_scores(runs[(b, s)], index)
    return stats.percentile_interval(total / (len(seeds) * len(tasks)))


# ---------------------------------------------------------------------------------------- claims
def score_findings(cells, model: str, tasks: list[str], higher: bool, pmodel: str, ptask: str) -> list[Finding]:
    setting = setting_label(next(iter(cells[(model, "sparsegrad", tasks[0])].values())))
    out = []
    loss = not higher
    digits = 3 if loss else 1
    for claim, other in (("a", "lora"), ("b", "meprop"), ("c", "full")):
        if not all((model, other, t) in cells for t in tasks):
            continue
        if claim == "c" and loss:
            continue  # "within 1 point" is a statement about GLUE scores
        iv = _diff(cells, model, tasks, "sparsegrad", other, _score)
        if claim == "c":
            verdict = stats.verdict(iv, C_MARGIN)
        else:
            verdict = stats.verdict(iv.negated() if loss else iv, 0.0)
        paper, paper_diff = (_paper_loss_diff(paper_cache(), pmodel, ptask, "sparsegrad", other) if loss
                             else _paper_score_diff(paper_cache(), pmodel, "sparsegrad", other))
        if claim == "c" and paper_diff is not None:
            paper_diff -= C_MARGIN  # what must be told apart is the paper's distance from the margin
        label = f"SparseGrad − {other}"
        out.append(Finding(claim, model, setting, tasks, paper, f"{label}: {fmt_interval(iv, digits)}", iv.n, verdict,
                           [(label, iv, verdict)], _run_notes(cells, model, ["sparsegrad", other], tasks),
                           [Power.of(iv, paper_diff, test_split_bootstrap(cells, model, tasks, "sparsegrad", other))],
                           digits))
    if loss and all((model, m, t) in cells for m in ("full", "lora", "meprop") for t in tasks):
        parts, power = [], []
        paper_sg = _paper_loss(paper_cache(), pmodel, ptask, "sparsegrad")
        for other in ("full", "lora", "meprop"):
            iv = _diff(cells, model, tasks, other, "sparsegrad", _score)  # other - SparseGrad > 0: SparseGrad lower
            parts.append((f"{other} − SparseGrad", iv, stats.verdict(iv, 0.0)))
            paper_other = _paper_loss(paper_cache(), pmodel, ptask, other)
            power.append(Power.of(iv, None if paper_sg is None or paper_other is None else paper_other - paper_sg,
                                  test_split_bootstrap(cells, model, tasks, other, "sparsegrad")))
        pvals = {m: _paper_loss(paper_cache(), pmodel, ptask, m) for m in ("sparsegrad", "lora", "full", "meprop")}
        paper = ("—" if any(v is None for v in pvals.values()) else
                 " < ".join(f"{m} {v:.3f}" for m, v in sorted(pvals.items(), key=lambda kv: kv[1])))
        out.append(Finding("g", model, setting, tasks, paper,
                           "; ".join(f"{lab}: {fmt_interval(iv, 3)}" for lab, iv, _ in parts),
                           min(iv.n for _, iv, _ in parts), stats.combine(v for _, _, v in parts), parts,
                           _run_notes(cells, model, ["sparsegrad", "full", "lora", "meprop"], tasks), power, 3))
    return out


def _memory_finding_value(cells, model: str, tasks: list[str]):
    """How (d) reads memory for this model: live tensor bytes when every record involved has them, else the RSS
    that training added; returns (value function, notes, gauge)."""
    runs = [r for m in ("full", "lora", "sparsegrad") for t in tasks for r in cells.get((model, m, t), {}).values()
            if r.get("status") == "completed"]
    if all(measure.record_gauge(r.get("memory")) in LIVE_GAUGES for r in runs):
        basis = [v for r in runs if (v := _basis_mb(r)) is not None]
        notes = ["memory: the training phase's peak of live tensor bytes"]
        if basis:
            notes.append(f"SparseGrad's preliminary (basis) phase, not part of the claim: peak {_mean(basis):.0f} MB "
                         "(Table 3)")
        gauge = measure.record_gauge(runs[0].get("memory")) if runs else measure.LIVE_GAUGE
        return _memory_mb, notes, gauge
    absolute = _diff(cells, model, tasks, "full", "sparsegrad", _rss_mb)
    return _rss_added_mb, [
        "memory: these records predate the live-tensor-bytes gauge, so (d) falls back to the peak RSS that training "
        "added above the RSS before it. The absolute peak RSS carries what SparseGrad's basis phase freed but the "
        f"allocator kept (FT − SparseGrad on it: {fmt_interval(absolute, 0, ' MB')}); the increase leaves out what "
        "was resident before training, SparseGrad's transition matrices included"], measure.RSS_GAUGE


LABEL = {"full": "FT", "lora": "LoRA", "sparsegrad": "SparseGrad"}


def order_findings(cells, model: str, tasks: list[str], bench: list[dict] | None = None) -> list[Finding]:
    if not all((model, m, t) in cells for m in ("full", "lora", "sparsegrad") for t in tasks):
        return []
    setting = setting_label(next(iter(cells[(model, "sparsegrad", tasks[0])].values())))
    out = []
    memory_value, memory_notes, memory_gauge = _memory_finding_value(cells, model, tasks)
    for claim, value, pairs, digits, unit, quantity in (
            # (d): lower memory is better: SparseGrad - LoRA > 0 and FT - SparseGrad > 0
            ("d", memory_value, (("sparsegrad", "lora"), ("full", "sparsegrad")), 0, " MB", "peak_memory_mb"),
            # (e): LoRA - SparseGrad > 0 and SparseGrad - FT > 0 (steps/s)
            ("e", _steps_per_s, (("lora", "sparsegrad"), ("sparsegrad", "full")), 2, "", "steps_per_s")):
        paper = _paper_table3(paper_cache(), quantity)
        parts, power = [], []
        for a, b in pairs:
            iv = _diff(cells, model, tasks, a, b, value)
            parts.append((f"{LABEL[a]} − {LABEL[b]}", iv, stats.verdict(iv, 0.0)))
            ours_b = _mean(per_seed(cells, model, b, tasks, value).values())
            power.append(Power.of(iv, _paper_ratio_difference(paper[a], paper[b], ours_b), "n/a"))
        notes = _run_notes(cells, model, ["full", "lora", "sparsegrad"], tasks)
        if claim == "d":
            notes = memory_notes + notes + bench_agreement(bench or [], model, parts[1][1], setting, memory_gauge)
        out.append(Finding(claim, model, setting, tasks, _paper_order(paper_cache(), quantity, 0 if claim == "d" else 2),
                           "; ".join(f"{lab}: {fmt_interval(iv, digits, unit)}" for lab, iv, _ in parts),
                           min(iv.n for _, iv, _ in parts), stats.combine(v for _, _, v in parts), parts, notes,
                           power, digits, unit))
    return out


def sparsity_finding(analysis: dict | None) -> list[Finding]:
    """(f) from the sparsity-analysis record: HOSVD minus original top-1% energy share, per layer."""
    if not analysis:
        return []
    by_layer = analysis.get("energy_top_share_by_layer") or analysis.get("energy_top_share_by_group") or {}
    diffs = [100 * (v["hosvd"] - v["original"]) for v in by_layer.values()
             if v.get("hosvd") is not None and v.get("original") is not None]
    iv = stats.t_interval(diffs)
    share = analysis.get("energy_top_share") or {}
    level = "layers" if analysis.get("energy_top_share_by_layer") else "layer groups"
    ours = (f"HOSVD − original: {fmt_interval(iv, 1, ' pp')} (means {100 * share.get('hosvd', math.nan):.0f}% vs "
            f"{100 * share.get('original', math.nan):.0f}%)" if share else fmt_interval(iv, 1, " pp"))
    verdict = stats.verdict(iv, 0.0)
    return [Finding("f", str(analysis.get("model", "?")), "weight gradient before fine-tuning",
                    [str(analysis.get("task", "?"))], "Figure 2 (qualitative: no number printed)", ours, iv.n, verdict,
                    [("HOSVD − original", iv, verdict)], [f"n = {iv.n} {level}"], [Power.of(iv, None, "n/a")], 1,
                    " pp")]


# ------------------------------------------------------------------------------------ make bench
GAUGE_WORDS = {measure.LIVE_GAUGE: "live tensor bytes", measure.CUDA_GAUGE: "the CUDA allocator's peak",
               measure.RSS_GAUGE: "peak RSS"}


def bench_agreement(bench: list[dict], model: str, ft_minus_sg: stats.Interval, setting: str,
                    ours_gauge: str) -> list[str]:
    """Whether ``make bench`` measured the same direction of FT − SparseGrad for this model, or why not."""
    if ft_minus_sg.mean is None:
        return []
    # the bench trains a model as the paper does; minilm_mlp (MLP-only) is minilm's shape in another setting
    same = [b for b in bench if model in (b["model"], b["model"] + "_mlp") and {"full", "sparsegrad"} <= set(b["peaks"])]
    if not same:
        held = sorted({b["model"] for b in bench})
        where = f" (it holds {', '.join(held)})" if held else ""
        base = model.removesuffix("_mlp").replace("_", "-")
        return [f"make bench: no run of {base} in results/bench{where}, so the direction is not cross-checked "
                f"(`python -m experiments.benchmark --models {base}` measures it)"]
    ours = "lower" if ft_minus_sg.mean > 0 else "higher"
    notes = []
    for b in same:
        diff = b["peaks"]["full"] - b["peaks"]["sparsegrad"]
        theirs = "lower" if diff > 0 else "higher"
        text = (f"make bench ({b['source']}, {b['shape']}, {GAUGE_WORDS.get(b['gauge'], b['gauge'])}): FT − SparseGrad "
                f"{diff:+.0f} MB, SparseGrad {theirs} than FT")
        if theirs == ours:
            text += ", the direction of this row"
        else:
            why = [f"the gauges differ (this row: {GAUGE_WORDS.get(ours_gauge, ours_gauge)})"] if b["gauge"] != ours_gauge else []
            what = "" if b["model"] == model else f" {b['model']} in the paper's setting,"
            why.append(f"the bench trains{what} one fixed batch shape of random tokens in a fresh process; this row: "
                       f"{setting}, the runs' own batches, the basis estimated in the same process")
            text += ", the opposite of this row: " + "; ".join(why)
        notes.append(text)
    return notes


_PAPER: dict | None = None


def paper_cache() -> dict:
    global _PAPER
    if _PAPER is None:
        _PAPER = load_paper()
    return _PAPER


# ------------------------------------------------------------------------------------------ build
def build(records: list[dict], analysis: dict | None = None,
          analogue: Mapping[str, Mapping[str, str]] | None = None, bench: list[dict] | None = None) -> list[Finding]:
    """Every finding this profile's records support, ordered by claim, then model (``bench``: the memory of
    ``make bench``'s runs, :func:`sparsegrad.suite.report.table_inputs.load_bench_memory`, for (d)'s cross-check)."""
    analogue = analogue or {}
    amodels, atasks = analogue.get("models", {}), analogue.get("tasks", {})
    cells, variants = by_role(seed_runs(records))
    by_model: dict[str, set[str]] = defaultdict(set)
    for model, method, task in cells:
        if method == "sparsegrad":
            by_model[model].add(task)
    out: list[Finding] = []
    for model in sorted(by_model):
        tasks = sorted(by_model[model])
        directions = {}
        for t in tasks:
            r = next(iter(cells[(model, "sparsegrad", t)].values()))
            directions[t] = bool((r.get("main_metric") or {}).get("higher_is_better", True))
        for higher in sorted(set(directions.values()), reverse=True):
            group = [t for t in tasks if directions[t] == higher]
            ptask = atasks.get(group[0], group[0])
            out += score_findings(cells, model, group, higher, amodels.get(model, model), ptask)
        out += order_findings(cells, model, tasks, bench)
        mine = sorted((role, name) for (m, role), name in variants.items() if m == model)
        for f in (f for f in out if f.model == model):
            named = [f"{role}: the {name} variant" for role, name in mine if role in f.ours.lower()]
            if named:
                f.notes = [*f.notes, "; ".join(named)]
    out += sparsity_finding(analysis)
    return sorted(out, key=lambda f: (f.claim, f.model))


def markdown(findings: list[Finding], profile_name: str = "") -> str:
    title = "### Findings — the paper's claims at this scale" + (f" (profile `{profile_name}`)" if profile_name else "")
    lines = [title, ""]
    if not findings:
        lines.append("_No seed re-runs of SparseGrad with a comparison method in this profile._")
    else:
        lines += ["| claim | model | setting | tasks | paper | ours: difference [95% CI] | test split ± | n | "
                  "detectable (80% power) | seeds for the paper's Δ | verdict | notes |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for f in findings:
            lines.append(f"| ({f.claim}) {CLAIMS[f.claim]} | {f.model} | {f.setting} | {', '.join(f.tasks)} | "
                         f"{f.paper} | {f.ours} | {_per_part(f, _fmt_test_split)} | {f.n} | "
                         f"{_per_part(f, _fmt_detectable)} | {_per_part(f, _fmt_seeds)} | "
                         f"**{f.verdict}** | {'; '.join(f.notes) or ''} |")
    lines.append("")
    lines += [f"- {r}" for r in RULE]
    return "\n".join(lines) + "\n"


def _per_part(f: Finding, fmt) -> str:
    """One cell for every part of a claim: the value alone for one part, else labelled per part."""
    if not f.power:
        return "—"
    texts = [fmt(p, f) for p in f.power]
    if len(texts) == 1 or len(set(texts)) == 1 and texts[0] in ("n/a", "—", "unavailable"):
        return texts[0]
    return "; ".join(f"{label}: {t}" for (label, _, _), t in zip(f.parts, texts))


def _fmt_test_split(p: Power, f: Finding) -> str:
    if isinstance(p.test_split, tuple):
        return f"±{(p.test_split[1] - p.test_split[0]) / 2:.{f.digits}f}"
    return p.test_split or "—"


def _fmt_detectable(p: Power, f: Finding) -> str:
    return "—" if p.detectable is None else f"{p.detectable:.{f.digits}f}{f.unit}"


def _fmt_seeds(p: Power, _f: Finding) -> str:
    if p.paper_difference is None or p.detectable is None:
        return "—"
    if p.paper_difference == 0:
        return "never (the paper's Δ is 0)"
    return f">{stats.MAX_SEEDS}" if p.seeds_needed is None else str(p.seeds_needed)


def load_analysis(path: Path) -> dict | None:
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def write(records: list[dict], out_dir: Path, profile_name: str = "",
          analogue: Mapping[str, Mapping[str, str]] | None = None,
          analysis_path: Path | None = None, bench_dir: Path | None = None) -> tuple[Path, str]:
    """Write ``out_dir/findings.md``; returns its path and its Markdown (tables.md starts with it)."""
    analysis = load_analysis(analysis_path or Path(out_dir) / "analysis" / "sparsity.json")
    from sparsegrad.suite.report.table_inputs import load_bench_memory

    text = markdown(build(records, analysis, analogue, load_bench_memory(bench_dir)), profile_name)
    path = Path(out_dir) / "findings.md"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"# Findings — profile `{profile_name}`\n\n" + text, encoding="utf-8")
    return path, text
