"""The paper's tables, rebuilt from run records, each beside the paper's own numbers.

Every builder is a pure function of run records (plus the paper's numbers and, for speed and memory,
optional CUDA benchmark records): no training, no Hydra. What a record holds and how records are
selected and grouped (the seed re-runs at the chosen setting, the best sweep trial) is in
:mod:`sparsegrad.suite.report.table_inputs`.

Conventions: scores are the main metric of the kept checkpoint (the restored best one, or the final
one with ``trainer.checkpoint=final``) on the reported split (``best.score``), x100 except for losses; "±" is the population std over seeds (as the authors'
``process_results.py``); Δ is ours minus the paper's. Only completed runs enter a mean; diverged and
failed ones are counted in the notes. Where the profile runs stand-ins (offline models and tasks), the
paper column holds the closest analogue and a note under the table says which.

:func:`build_all` returns :class:`Table` objects, each a pandas DataFrame of formatted cells with a title
and notes; :func:`write_all` writes them with pandas as Markdown, CSV and LaTeX (the Table class and the
cell formatters are in :mod:`sparsegrad.suite.report.table_format`).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Mapping
from pathlib import Path

from sparsegrad.suite.report.table_format import (  # noqa: F401 (MARKDOWN, LATEX_ESCAPES, latex_escape re-exported)
    LATEX_ESCAPES,
    MARKDOWN,
    Table,
    fmt,
    fmt_delta,
    fmt_lr,
    fmt_params,
    fmt_pm,
    latex_escape,
)
from sparsegrad.suite.report.table_inputs import (
    MLP_MATRIX_ENTRIES,
    PAPER_CSV,
    Analogue,
    Cell,
    Paper,
    best_trials,
    by_stage,
    cells,
    device_of,
    final_runs,
    kept_percent,
    load_bench,
    mean_std,
    score_of,
    setting_of,
    trainable_params,
)

# leading_block (sparsegrad.methods.leading_block.layer) is our variant, not a method of the paper: it sits right after the
# exact SparseGrad it approximates, and its paper columns stay "—" (no paper row names it).
METHOD_ORDER = ("full", "lora", "lora_authors", "sparsegrad", "leading_block", "shira", "meprop", "meprop_adamw",
                "sparsegrad_official", "meprop_output")
# which LoRA (conf/method/lora*.yaml) and which MeProp optimizer (conf/method/meprop*.yaml) a row used
METHOD_LABEL = {"full": "Regular FT", "lora": "LoRA (peft, α = r)", "lora_authors": "LoRA (authors': α = 1, scale 1/r)",
                "sparsegrad": "SparseGrad", "leading_block": "SparseGrad, leading block (variant)",
                "meprop": "MeProp (lazy sparse Adam)", "meprop_adamw": "MeProp (authors': dense AdamW)",
                "sparsegrad_official": "SparseGrad (authors' basis)", "meprop_output": "meProp (dL/dY)",
                "shira": "SHiRA (peft, random sparse mask)"}
# Rows that are not methods of the paper (no paper number exists for them), and what each is.
VARIANT_NOTES = {
    "leading_block": "this repository's variant of SparseGrad (sparsegrad.methods.leading_block.layer.LeadingBlockLinear: "
                     "only the leading block of the rotated weight is trained, with the same transition basis and "
                     "budget k)",
    "shira": "peft's SHiRA, a sparse baseline beside the paper's (a fixed random mask of each MLP weight with "
             "about SparseGrad's k entries, trained in the original space: sparsity without the basis and the top-k)",
}
VARIANTS = tuple(VARIANT_NOTES)
TASK_ORDER = ("stsb", "cola", "mnli", "mrpc", "qnli", "qqp", "rte", "sst2", "wnli",
              "movie_sentiment", "movie_score", "oasst1", "chat")
GLUE_TASKS = ("stsb", "cola", "mnli", "mrpc", "qnli", "qqp", "rte", "sst2")
# the paper's per-task score tables by model
SCORE_TABLE = {"bert_base": "9", "roberta_base": "10", "roberta_large": "4"}
KEPT_TABLE = {"bert_base": "11", "roberta_base": "12"}
BEST_TABLE = {"bert_base": "13", "roberta_base": "14", "roberta_large": "15"}


def _order(seq: Iterable[str], order: tuple[str, ...]) -> list[str]:
    return sorted(set(seq), key=lambda x: (order.index(x) if x in order else len(order), x))



def _analogue_note(analogue: Analogue, models, tasks) -> list[str]:
    pairs = analogue.used(models, tasks)
    if not pairs:
        return []
    return ["Offline stand-ins: the paper column holds the closest paper analogue (" + ", ".join(pairs) +
            "). Our runs are far shorter and smaller than the paper's, so compare trends, not absolute values."]

def _not_completed_note(cs: Mapping[tuple, Cell]) -> list[str]:
    bad = [f"{m}/{meth}/{t}: {c.not_completed}" for (m, meth, t), c in sorted(cs.items()) if c.not_completed]
    return ["Runs that diverged or failed (left out of the means): " + ", ".join(bad) + "."] if bad else []


def _variant_note(methods: Iterable[str]) -> list[str]:
    """Says which rows are this repository's variants, so an empty paper column is not read as missing data."""
    methods = set(methods)  # often a generator: read it once
    shown = [m for m in VARIANTS if m in methods]
    return [f"{METHOD_LABEL[m]}: {VARIANT_NOTES[m]}, not a method of the paper, so its paper columns are empty."
            for m in shown]


# ----------------------------------------------------------------------------------------- builders
def _speed_rows(records: list[dict]) -> dict[tuple[str, str, str, str], dict[str, list[float]]]:
    """(device, model, method, task) -> {"sps": [...], "mem": [...]} from completed seed re-runs."""
    out: dict[tuple[str, str, str, str], dict[str, list[float]]] = defaultdict(lambda: {"sps": [], "mem": []})
    for r in final_runs(records):
        if r.get("status") != "completed":
            continue
        key = (device_of(r), r["model"], r["method"], r["task"])
        sps = (r.get("training") or {}).get("steps_per_second")
        mem = (r.get("memory") or {}).get("train_peak_bytes")
        if sps is not None:
            out[key]["sps"].append(float(sps))
        if mem is not None:
            out[key]["mem"].append(mem / 2**20)
    return out


def _basis_peaks(records: list[dict]) -> dict[tuple[str, str, str], list[float]]:
    """(device, model, method) -> the preliminary (basis) phase's peak memory (MB) of each completed seed re-run."""
    out: dict[tuple[str, str, str], list[float]] = defaultdict(list)
    for r in final_runs(records):
        memory = r.get("memory") or {}
        peak = memory.get("basis_peak_bytes") if "gauge" in memory else (r.get("basis") or {}).get("peak_bytes")
        if r.get("status") == "completed" and peak is not None:
            out[(device_of(r), r["model"], r["method"])].append(peak / 2**20)
    return out


def _paper_speed_setting(method: str) -> str:
    return "sparse_by_dense" if method == "sparsegrad" else ""


def _memory_note(records: list[dict]) -> list[str]:
    hows = sorted({(r.get("memory") or {}).get("how", "") for r in records if (r.get("memory") or {}).get("how")})
    notes = ["The paper's numbers: RoBERTa-base on one GPU (Table 3 / 7 / 8); SparseGrad is compared with its "
             "sparse-by-dense row. Absolute speed and memory depend on the device; the ÷ FT columns compare "
             "each method with regular fine-tuning on the same device."]
    if hows:
        notes.append("Our memory: " + "; ".join(hows) + ".")
    return notes


BASIS_NOTE = ("Preliminary phase rows: the peak memory of estimating the transition basis, before training (the "
              "paper's §8 discusses it as the method's limitation without measuring it: its stacked gradient tensor is "
              "about 276 MB for BERT and RoBERTa at 30 steps); memory ÷ FT divides it by full FT's training peak. It "
              "is not part of the training peak, nor of claim (d).")


def table3(records: list[dict], paper: Paper, bench: list[dict]) -> Table:
    rows_src = _speed_rows(records)
    basis_peaks = _basis_peaks(records)
    agg: dict[tuple[str, str, str, str], dict[str, list[float]]] = defaultdict(lambda: {"sps": [], "mem": []})
    for (device, model, method, _task), v in rows_src.items():
        agg[(device, model, method, "records")]["sps"] += v["sps"]
        agg[(device, model, method, "records")]["mem"] += v["mem"]
    for b in bench:
        source = b["source"] + (f", {b['shape']}" if b.get("shape") else "")
        key = (b["device"], b["model"], b["method"] + (f" ({b['setting']})" if b["setting"] else ""), source)
        if b.get("steps_per_second") is not None:
            agg[key]["sps"].append(float(b["steps_per_second"]))
        if b.get("peak_memory_mb") is not None:
            agg[key]["mem"].append(float(b["peak_memory_mb"]))
    rows = []
    p_full = paper.get("3", "roberta_base", "full", "avg", "steps_per_s")[0]
    m_full = paper.get("3", "roberta_base", "full", "avg", "peak_memory_mb")[0]
    groups = sorted({(d, m, src) for d, m, _meth, src in agg})
    for device, model, src in groups:
        methods = [meth for d, m, meth, s in agg if (d, m, s) == (device, model, src)]
        full = agg.get((device, model, "full", src))
        full_sps = mean_std(full["sps"])[0] if full else None
        full_mem = mean_std(full["mem"])[0] if full else None
        for meth in _order(methods, METHOD_ORDER):
            v = agg[(device, model, meth, src)]
            base = meth.split(" ")[0]
            setting = "regular_matmul" if "regular_matmul" in meth else _paper_speed_setting(base)
            sps, mem = mean_std(v["sps"])[0], mean_std(v["mem"])[0]
            p_sps = paper.get("3", "roberta_base", base, "avg", "steps_per_s", setting)[0]
            p_mem = paper.get("3", "roberta_base", base, "avg", "peak_memory_mb", setting)[0]
            rel_sps = sps / full_sps if sps and full_sps else None
            rel_mem = mem / full_mem if mem and full_mem else None
            label = METHOD_LABEL.get(base, base) + (" (regular matmul)" if "regular_matmul" in meth else "")
            rows.append([model, label, device if src == "records" else f"{device} ({src})",
                         fmt(sps, 2), fmt(p_sps, 2), fmt(rel_sps, 2), fmt(p_sps / p_full if p_sps else None, 2),
                         fmt(mem, 0), fmt(p_mem, 0), fmt(rel_mem, 2), fmt(p_mem / m_full if p_mem else None, 2),
                         str(max(len(v["sps"]), len(v["mem"])))])
            basis = basis_peaks.get((device, model, meth)) if src == "records" else None
            if basis:
                peak = mean_std(basis)[0]
                rows.append([model, f"{label}: preliminary phase (basis)", device, "—", "—", "—", "—", fmt(peak, 0),
                             "—", fmt(peak / full_mem if full_mem else None, 2), "—", str(len(basis))])
    notes = _memory_note(records) + ([BASIS_NOTE] if any(basis_peaks.values()) else [])
    notes += _variant_note(m.split(" ")[0] for _d, _m, m, _s in agg)
    if bench:
        notes.append("Rows marked with a file name come from the CUDA benchmark records in results/bench/.")
    else:
        notes.append("No CUDA benchmark record (results/bench/cuda-*.json) was found: every number is from the "
                     "training runs on the device named in each row.")
    return Table("table03", "Table 3 — training speed and peak memory per method, averaged over tasks",
                 ["model", "method", "device", "steps/s", "paper steps/s", "steps/s ÷ FT", "paper ÷ FT",
                  "peak MB", "paper peak MB", "memory ÷ FT", "paper ÷ FT", "runs"], rows, notes)


def _per_task_speed(records, paper, analogue, quantity: str, key: str, title: str, digits: int) -> Table:
    src = _speed_rows(records)
    rows = []
    for device, model, method, task in sorted(src, key=lambda k: (k[0], k[1], METHOD_ORDER.index(k[2])
                                                                 if k[2] in METHOD_ORDER else 99,
                                                                 TASK_ORDER.index(k[3]) if k[3] in TASK_ORDER else 99)):
        values = src[(device, model, method, task)]["sps" if quantity == "steps_per_s" else "mem"]
        ours = mean_std(values)[0]
        table = "7" if quantity == "steps_per_s" else "8"
        ptask = analogue.task(task)
        p = paper.get(table, "roberta_base", method, ptask, quantity, _paper_speed_setting(method))[0]
        rows.append([model, METHOD_LABEL.get(method, method), task, ptask if p is not None else "—", device,
                     fmt(ours, digits), fmt(p, digits), str(len(values))])
    notes = _memory_note(records)[:1] + _analogue_note(analogue, [], [r[2] for r in rows])
    notes += _variant_note(k[2] for k in src)
    col = "steps/s" if quantity == "steps_per_s" else "peak MB"
    return Table(key, title, ["model", "method", "task", "paper task", "device", col, f"paper {col}", "runs"],
                 rows, notes)


def table7(records, paper, analogue) -> Table:
    return _per_task_speed(records, paper, analogue, "steps_per_s", "table07",
                           "Table 7 — training steps per second, per task", 2)


def table8(records, paper, analogue) -> Table:
    return _per_task_speed(records, paper, analogue, "peak_memory_mb", "table08",
                           "Table 8 — peak training memory (MB), per task", 0)


def table5(records: list[dict], paper: Paper, analogue: Analogue) -> Table:
    cs = cells(final_runs(records))
    rows = []
    models = _order({m for m, _, _ in cs}, tuple(MLP_MATRIX_ENTRIES))
    for model in models:
        pmodel = analogue.model(model)
        for method in _order({meth for m, meth, _ in cs if m == model}, METHOD_ORDER):
            tasks = [t for m, meth, t in cs if (m, meth) == (model, method) and cs[(m, meth, t)].scores
                     and t not in ("wnli",)]
            means = [cs[(model, method, t)].mean for t in tasks]
            avg = sum(means) / len(means) if means else None
            params = [trainable_params(r) for t in tasks for r in cs[(model, method, t)].records]
            params = [p for p in params if p is not None]
            p_avg = paper.get("5", pmodel, method, "avg", "score")[0]
            rows.append([model, METHOD_LABEL.get(method, method), fmt_params(params[0] if params else None),
                         paper.raw("5", pmodel, method, "params", "trainable_params") or "—",
                         fmt(avg), fmt(p_avg), fmt_delta(avg, p_avg), ", ".join(_order(tasks, TASK_ORDER))])
    notes = ["AVG: the mean over tasks of the per-task seed means (WNLI left out, as in the paper). The paper's "
             "AVG is over its eight GLUE tasks; ours over the tasks listed.",
             "Trainable parameters: parameters updated densely plus the sparse budget (k per MLP matrix x "
             "matrices) for SparseGrad, its leading-block variant and MeProp; the paper counts them the same way."]
    notes += _analogue_note(analogue, [r[0] for r in rows], {t for _, _, t in cs})
    notes += _variant_note(meth for _, meth, _ in cs)
    return Table("table05", "Table 5 — average score per model and method, with trainable parameters",
                 ["model", "method", "trainable", "paper trainable", "AVG", "paper AVG", "Δ", "tasks"], rows, notes)


def kept_checkpoint(runs: list[dict]) -> str:
    """What a run's score is taken from: its best checkpoint, or (``trainer.checkpoint=final``) its last."""
    kinds = {((r.get("config") or {}).get("trainer") or {}).get("checkpoint", "best") for r in runs}
    if kinds == {"final"}:
        return "the final checkpoint (the weights at the end of the run's schedule)"
    if "final" in kinds:
        return "the kept checkpoint (best on held-out data, or the final one where the run's trainer says so)"
    return "the best checkpoint (selected on held-out data)"


def score_tables(records: list[dict], paper: Paper, analogue: Analogue) -> list[Table]:
    """Tables 9 (BERT-base), 10 (RoBERTa-base), 4 (RoBERTa-large): per task, mean ± std over seeds."""
    cs = cells(final_runs(records))
    by_table: dict[str, list[str]] = defaultdict(list)
    for model in _order({m for m, _, _ in cs}, tuple(MLP_MATRIX_ENTRIES)):
        table = SCORE_TABLE.get(analogue.model(model))
        if table is not None:
            by_table[table].append(model)
    titles = {"9": ("table09", "Table 9 — BERT-base per task"), "10": ("table10", "Table 10 — RoBERTa-base per task"),
              "4": ("table04", "Table 4 — RoBERTa-large per task")}
    out = []
    for table in ("9", "10", "4"):
        key, title = titles[table]
        rows = []
        models = by_table.get(table, [])
        for model in models:
            pmodel = analogue.model(model)
            for method in _order({meth for m, meth, _ in cs if m == model}, METHOD_ORDER):
                for task in _order({t for m, meth, t in cs if (m, meth) == (model, method)}, TASK_ORDER):
                    c = cs[(model, method, task)]
                    ptask = analogue.task(task)
                    pm, ps = paper.get(table, pmodel, method, ptask, "score")
                    rows.append([model, METHOD_LABEL.get(method, method), task, ptask if pm is not None else "—",
                                 fmt_pm(c.mean, c.std), str(len(c.scores)), fmt_pm(pm, ps), fmt_delta(c.mean, pm)])
        notes = [f"Score: the main metric ×100 of {kept_checkpoint(final_runs(records))} on the reported "
                 "split; ± is the population std over seeds."]
        notes += _analogue_note(analogue, models, [r[2] for r in rows])
        notes += _variant_note(meth for m, meth, _ in cs if m in models)
        notes += _not_completed_note({k: v for k, v in cs.items() if k[0] in models})
        out.append(Table(key, title + " (mean ± std over seeds)",
                         ["model", "method", "task", "paper task", "score", "seeds", "paper score", "Δ"], rows, notes))
    return out


def table_best(records: list[dict], paper: Paper, analogue: Analogue) -> Table:
    """Tables 13-15: the best learning rate and batch size found by the sweep."""
    trials: dict[tuple[str, str, str], dict[str, int]] = defaultdict(lambda: defaultdict(int))
    for r in by_stage(records, "sweep"):
        trials[(r["model"], r["method"], r["task"])][r.get("status", "?")] += 1
    best = best_trials(records)
    from sparsegrad.suite.sweep import search  # what each study tried, and a best value at its edge

    searched = search.tried(records)
    rows = []
    keys = sorted(trials, key=lambda k: (k[0], METHOD_ORDER.index(k[1]) if k[1] in METHOD_ORDER else 99,
                                         TASK_ORDER.index(k[2]) if k[2] in TASK_ORDER else 99))
    for model, method, task in keys:
        b = best.get((model, method, task))
        lr, bs = setting_of(b) if b else (None, None)
        counts = trials[(model, method, task)]
        pmodel, ptask = analogue.model(model), analogue.task(task)
        table = BEST_TABLE.get(pmodel)
        p_bs = paper.get(table, pmodel, method, ptask, "batch_size")[0] if table else None
        p_lr = paper.get(table, pmodel, method, ptask, "learning_rate")[0] if table else None
        objective = b.get("objective") if b else None
        higher = (b or {}).get("main_metric", {}).get("higher_is_better", True)
        shown = None if objective is None else (100 * objective if higher else objective)
        rows.append([model, METHOD_LABEL.get(method, method), task, str(counts.get("completed", 0)),
                     str(sum(v for k, v in counts.items() if k != "completed")),
                     str(bs) if bs else "—", fmt_lr(lr), fmt(shown), str(int(p_bs)) if p_bs else "—", fmt_lr(p_lr),
                     search.lr_range(searched[(model, method, task)]), search.edge_flag(b, searched[(model, method, task)])])
    notes = ["Best trial: the highest selection-split objective (held-out data, not the reported split). "
             "'not completed' counts diverged and failed trials, which Optuna records as FAIL.",
             "The paper publishes the best settings of SparseGrad only (Tables 13-15).",
             "lr tried: the range of learning rates the study's trials ran; EDGE marks a best value at the edge of what "
             "was tried, where the optimum may lie outside the searched range."]
    notes += _analogue_note(analogue, [r[0] for r in rows], [r[2] for r in rows])
    notes += _variant_note(meth for _, meth, _ in keys)
    return Table("table13_15", "Tables 13-15 — best batch size and learning rate found by the sweep",
                 ["model", "method", "task", "trials completed", "not completed", "best batch", "best lr",
                  "best objective", "paper batch", "paper lr", "lr tried", "edge"], rows, notes)


def table_kept(records: list[dict], paper: Paper, analogue: Analogue) -> Table:
    """Tables 11-12: SparseGrad score vs the kept share of each MLP gradient."""
    groups: dict[tuple[str, str, float], list[dict]] = defaultdict(list)
    kept_models = {r["model"] for r in by_stage(records, "kept")}
    for r in by_stage(records, "kept") + [r for r in final_runs(records)
                                          if r["method"] == "sparsegrad" and r["model"] in kept_models]:
        pct = kept_percent(r)
        if pct is not None:
            groups[(r["model"], r["task"], round(pct, 2))].append(r)
    rows = []
    kept_tasks = {r["task"] for r in by_stage(records, "kept")}
    for model, task, pct in sorted(groups, key=lambda k: (k[0], TASK_ORDER.index(k[1]) if k[1] in TASK_ORDER
                                                           else 99, k[2])):
        if task not in kept_tasks:
            continue
        rs = groups[(model, task, pct)]
        scores = [score_of(r) for r in rs if r.get("status") == "completed" and score_of(r) is not None]
        m, s = mean_std(scores)
        pmodel, ptask = analogue.model(model), analogue.task(task)
        table = KEPT_TABLE.get(pmodel)
        prow = f"{pct:.2g}".rstrip("0").rstrip(".") if pct < 10 else f"{pct:.0f}"
        pm, ps = paper.get(table, pmodel, "sparsegrad", ptask, "score", f"kept_percent={prow}") if table else (None, None)
        rows.append([model, task, ptask if pm is not None else "—", f"{pct:.2f}", fmt_pm(m, s), str(len(scores)),
                     fmt_pm(pm, ps), fmt_delta(m, pm)])
    notes = ["% kept: the sparse gradient budget k of each MLP matrix as a share of its entries; the row at the "
             "model's default budget comes from the seed re-runs. Paper numbers are shown where the paper has a "
             "row at the same share."]
    notes += _analogue_note(analogue, [r[0] for r in rows], [r[1] for r in rows])
    return Table("table11_12", "Tables 11-12 — SparseGrad score vs the share of gradient entries kept",
                 ["model", "task", "paper task", "% kept", "score", "runs", "paper score", "Δ"], rows, notes)


def _ci95(values: list[float]) -> str:
    from sparsegrad.suite.report.stats import t_interval

    iv = t_interval(values)
    return f"[{iv.lo:.3f}, {iv.hi:.3f}]" if iv.exists else "—"


def table6(records: list[dict], paper: Paper, analogue: Analogue) -> Table:
    runs = [r for r in final_runs(records) if r["task"] in ("oasst1", "chat")]
    cs = cells(runs)
    rows = []
    for model, method, task in sorted(cs, key=lambda k: (k[0], METHOD_ORDER.index(k[1]) if k[1] in METHOD_ORDER
                                                          else 99)):
        c = cs[(model, method, task)]
        shares = [trainable_params(r) / r["parameters"]["total"] for r in c.records if trainable_params(r)]
        pm, ps = paper.get("6", analogue.model(model), method, analogue.task(task), "valid_loss")
        rows.append([model, METHOD_LABEL.get(method, method), task,
                     f"{100 * shares[0]:.2g}%" if shares else "—",
                     paper.raw("6", analogue.model(model), method, analogue.task(task), "trainable_share") or "—",
                     fmt_pm(c.mean, c.std, 3), _ci95(c.scores), str(len(c.scores)), fmt_pm(pm, ps, 3),
                     fmt_delta(c.mean, pm, 3)])
    notes = ["Validation loss: the assistant-token loss of the best checkpoint on the reported split; "
             "± is the population std over seeds; 95% CI: Student t interval of the mean over seeds."]
    notes += _analogue_note(analogue, [r[0] for r in rows], [r[2] for r in rows])
    notes += _variant_note(meth for _, meth, _ in cs)
    notes += _not_completed_note(cs)
    return Table("table06", "Table 6 — LLaMA-style chat fine-tuning, validation loss",
                 ["model", "method", "task", "trainable", "paper trainable", "valid loss", "95% CI", "seeds",
                  "paper valid loss", "Δ"], rows, notes)


def history_table(records: list[dict]) -> Table:
    from sparsegrad.suite.sweep.sweep_history import history_table as build  # each study's best-trial history

    return build(records)


def build_all(records: list[dict], paper: Paper | None = None, analogue: Analogue | None = None,
              bench: list[dict] | None = None) -> list[Table]:
    paper = paper or Paper.load()
    analogue = analogue or Analogue()
    bench = bench or []
    return [table3(records, paper, bench), table7(records, paper, analogue), table8(records, paper, analogue),
            table5(records, paper, analogue), *score_tables(records, paper, analogue),
            table_best(records, paper, analogue), history_table(records), table_kept(records, paper, analogue),
            table6(records, paper, analogue)]


def write_all(records: list[dict], out_dir: Path, *, profile_name: str = "", analogue: Mapping | None = None,
              bench_dir: Path | None = None, paper_csv: Path = PAPER_CSV, analysis: Path | None = None) -> list[Path]:
    """Write every table as Markdown, CSV and LaTeX under ``out_dir/tables`` plus ``out_dir/tables.md``
    (and ``findings.md``, whose claim (f) reads the sparsity analysis, default out_dir/analysis/sparsity.json)."""
    analogue = analogue or {}
    tables = build_all(records, Paper.load(paper_csv),
                       Analogue(analogue.get("models", {}), analogue.get("tasks", {})), load_bench(bench_dir))
    tdir = Path(out_dir) / "tables"
    tdir.mkdir(parents=True, exist_ok=True)
    written = []
    for t in tables:
        for ext, text in (("md", t.markdown()), ("csv", t.csv()), ("tex", t.latex())):
            path = tdir / f"{t.key}.{ext}"
            path.write_text(text, encoding="utf-8")
            written.append(path)
    header = (f"# Results — profile `{profile_name}`\n\nGenerated by `make tables PROFILE={profile_name}` from "
              f"{len(records)} run records under `records/` (every table is a pure function of them). "
              f"Markdown, CSV and LaTeX of each table are in `tables/`; figures in `figures/`.\n\n")
    from sparsegrad.suite.report import findings  # the findings table comes first, and also in findings.md

    findings_path, findings_md = findings.write(records, out_dir, profile_name, analogue, analysis, bench_dir)
    summary = Path(out_dir) / "tables.md"
    summary.write_text(header + findings_md + "\n" + "\n".join(t.markdown() for t in tables), encoding="utf-8")
    written += [findings_path, summary]
    return written
