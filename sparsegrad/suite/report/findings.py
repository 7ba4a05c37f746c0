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
variation on this fixed test split, not the test split's own sampling error. Claim (f) pairs the two
bases per MLP layer of the sparsity analysis (each layer's share averaged over its evaluation
batches) and takes the t interval over layers.

Everything is a pure function of the run records (and the sparsity-analysis record), as every table is.
"""

from __future__ import annotations

import csv
import json
import math
from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from sparsegrad.suite.report import stats
from sparsegrad.suite.run.convergence import converged

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
    "this fixed test split, not the test split's own sampling error. (f): paired per MLP layer of the sparsity "
    "analysis, t interval over layers.",
    "Scores are the main metric ×100 of the best checkpoint (selected on held-out data) on the test split; for "
    "loss tasks lower is better and a difference is shown as SparseGrad − other (negative: SparseGrad better).",
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


def _memory_mb(record: dict) -> float | None:
    b = (record.get("memory") or {}).get("train_peak_bytes")
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


def _paper_score_diff(paper, pmodel: str, a: str, b: str) -> str:
    pa, pb = _paper_avg(paper, pmodel, a), _paper_avg(paper, pmodel, b)
    if pa is None or pb is None:
        return "—"
    return f"{pa - pb:+.1f} ({pmodel} GLUE avg {pa:.1f} vs {pb:.1f})"


def _paper_loss_diff(paper, pmodel: str, ptask: str, a: str, b: str) -> str:
    pa = paper.get(("6", pmodel, a, "", ptask, "valid_loss"))
    pb = paper.get(("6", pmodel, b, "", ptask, "valid_loss"))
    if pa is None or pb is None:
        return "—"
    return f"{pa - pb:+.3f} ({pmodel} valid loss {pa:.3f} vs {pb:.3f})"


def _paper_order(paper, quantity: str, digits: int) -> str:
    vals = {m: paper.get(("3", "roberta_base", m, "sparse_by_dense" if m == "sparsegrad" else "", "avg", quantity))
            for m in ("lora", "sparsegrad", "full")}
    if any(v is None for v in vals.values()):
        return "—"
    sign = "<" if quantity == "peak_memory_mb" else ">"
    return (f"LoRA {vals['lora']:.{digits}f} {sign} SparseGrad {vals['sparsegrad']:.{digits}f} {sign} "
            f"FT {vals['full']:.{digits}f} (roberta_base, Table 3)")


def _run_notes(cells, model: str, methods: list[str], tasks: list[str]) -> list[str]:
    runs = [r for m in methods for t in tasks for r in cells.get((model, m, t), {}).values()]
    capped = sum(1 for r in runs if r.get("status") == "completed" and converged(r) is False)
    bad = sum(1 for r in runs if r.get("status") != "completed")
    notes = []
    steps = sorted(int((r.get("training") or {}).get("optimizer_steps") or 0) for r in runs if r.get("status") == "completed")
    bests = sorted(int((r.get("best") or {}).get("step") or 0) for r in runs if r.get("status") == "completed")
    if steps and steps[-1] > 0:
        notes.append(f"steps run: median {steps[len(steps) // 2]} (best checkpoint at median step {bests[len(bests) // 2]})")
    if capped:
        notes.append(f"{capped}/{len(runs)} runs stopped by the step cap or the end of the epochs, not by the "
                     "convergence criterion")
    if bad:
        notes.append(f"{bad}/{len(runs)} runs diverged or failed (left out)")
    return notes


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
        paper = (_paper_loss_diff(paper_cache(), pmodel, ptask, "sparsegrad", other) if loss
                 else _paper_score_diff(paper_cache(), pmodel, "sparsegrad", other))
        label = f"SparseGrad − {other}"
        out.append(Finding(claim, model, setting, tasks, paper, f"{label}: {fmt_interval(iv, digits)}", iv.n, verdict,
                           [(label, iv, verdict)], _run_notes(cells, model, ["sparsegrad", other], tasks)))
    if loss and all((model, m, t) in cells for m in ("full", "lora", "meprop") for t in tasks):
        parts = []
        for other in ("full", "lora", "meprop"):
            iv = _diff(cells, model, tasks, other, "sparsegrad", _score)  # other - SparseGrad > 0: SparseGrad lower
            parts.append((f"{other} − SparseGrad", iv, stats.verdict(iv, 0.0)))
        pvals = {m: paper_cache().get(("6", pmodel, m, "", ptask, "valid_loss")) for m in
                 ("sparsegrad", "lora", "full", "meprop")}
        paper = ("—" if any(v is None for v in pvals.values()) else
                 " < ".join(f"{m} {v:.3f}" for m, v in sorted(pvals.items(), key=lambda kv: kv[1])))
        out.append(Finding("g", model, setting, tasks, paper,
                           "; ".join(f"{lab}: {fmt_interval(iv, 3)}" for lab, iv, _ in parts),
                           min(iv.n for _, iv, _ in parts), stats.combine(v for _, _, v in parts), parts,
                           _run_notes(cells, model, ["sparsegrad", "full", "lora", "meprop"], tasks)))
    return out


def order_findings(cells, model: str, tasks: list[str]) -> list[Finding]:
    if not all((model, m, t) in cells for m in ("full", "lora", "sparsegrad") for t in tasks):
        return []
    setting = setting_label(next(iter(cells[(model, "sparsegrad", tasks[0])].values())))
    out = []
    # (d): lower memory is better: SparseGrad - LoRA > 0 and FT - SparseGrad > 0
    mem = [("SparseGrad − LoRA", _diff(cells, model, tasks, "sparsegrad", "lora", _memory_mb)),
           ("FT − SparseGrad", _diff(cells, model, tasks, "full", "sparsegrad", _memory_mb))]
    # (e): LoRA - SparseGrad > 0 and SparseGrad - FT > 0 (steps/s)
    sps = [("LoRA − SparseGrad", _diff(cells, model, tasks, "lora", "sparsegrad", _steps_per_s)),
           ("SparseGrad − FT", _diff(cells, model, tasks, "sparsegrad", "full", _steps_per_s))]
    for claim, parts_in, digits, unit, quantity in (("d", mem, 0, " MB", "peak_memory_mb"),
                                                   ("e", sps, 2, "", "steps_per_s")):
        parts = [(lab, iv, stats.verdict(iv, 0.0)) for lab, iv in parts_in]
        out.append(Finding(claim, model, setting, tasks, _paper_order(paper_cache(), quantity, 0 if claim == "d" else 2),
                           "; ".join(f"{lab}: {fmt_interval(iv, digits, unit)}" for lab, iv, _ in parts),
                           min(iv.n for _, iv, _ in parts), stats.combine(v for _, _, v in parts), parts,
                           _run_notes(cells, model, ["full", "lora", "sparsegrad"], tasks)))
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
                    [("HOSVD − original", iv, verdict)], [f"n = {iv.n} {level}"])]


_PAPER: dict | None = None


def paper_cache() -> dict:
    global _PAPER
    if _PAPER is None:
        _PAPER = load_paper()
    return _PAPER


# ------------------------------------------------------------------------------------------ build
def build(records: list[dict], analysis: dict | None = None,
          analogue: Mapping[str, Mapping[str, str]] | None = None) -> list[Finding]:
    """Every finding this profile's records support, ordered by claim, then model."""
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
        out += order_findings(cells, model, tasks)
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
        lines += ["| claim | model | setting | tasks | paper | ours: difference [95% CI] | n | verdict | notes |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for f in findings:
            lines.append(f"| ({f.claim}) {CLAIMS[f.claim]} | {f.model} | {f.setting} | {', '.join(f.tasks)} | "
                         f"{f.paper} | {f.ours} | {f.n} | **{f.verdict}** | {'; '.join(f.notes) or ''} |")
    lines.append("")
    lines += [f"- {r}" for r in RULE]
    return "\n".join(lines) + "\n"


def load_analysis(path: Path) -> dict | None:
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def write(records: list[dict], out_dir: Path, profile_name: str = "",
          analogue: Mapping[str, Mapping[str, str]] | None = None,
          analysis_path: Path | None = None) -> tuple[Path, str]:
    """Write ``out_dir/findings.md``; returns its path and its Markdown (tables.md starts with it)."""
    analysis = load_analysis(analysis_path or Path(out_dir) / "analysis" / "sparsity.json")
    text = markdown(build(records, analysis, analogue), profile_name)
    path = Path(out_dir) / "findings.md"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"# Findings — profile `{profile_name}`\n\n" + text, encoding="utf-8")
    return path, text
