"""The findings table: statistics, the verdict rule and the table, on fixture records with known answers."""

from __future__ import annotations

import math

import pytest

from sparsegrad.suite.report import findings, stats
from tests.reproduce.fixture_records import record

T2 = 4.302652729911275  # t(0.975, 2 degrees of freedom)


# ------------------------------------------------------------------------------------------- stats
def test_t_interval_by_hand():
    iv = stats.t_interval([1.0, 2.0, 3.0])
    half = T2 * 1.0 / math.sqrt(3)  # sample sd of 1, 2, 3 is 1
    assert iv.n == 3 and iv.mean == pytest.approx(2.0)
    assert (iv.lo, iv.hi) == (pytest.approx(2.0 - half), pytest.approx(2.0 + half))
    assert stats.t_quantile(2) == pytest.approx(T2)


def test_t_interval_edge_cases():
    assert not stats.t_interval([5.0]).exists and stats.t_interval([5.0]).mean == 5.0
    assert stats.t_interval([]).mean is None
    same = stats.t_interval([2.0, 2.0, 2.0])
    assert (same.lo, same.hi) == (2.0, 2.0)
    assert stats.t_interval([1.0, float("nan"), 3.0]).n == 2


def test_paired_differences_pair_by_seed():
    a = {1: 80.0, 2: 81.0, 3: 82.0, 4: 90.0}
    b = {1: 75.0, 2: 76.0, 3: 77.5, 5: 10.0}
    assert stats.paired_differences(a, b) == {1: 5.0, 2: 5.0, 3: 4.5}


def test_verdict_rule():
    iv = stats.Interval
    assert stats.verdict(iv(1.0, 0.2, 1.8, 3)) == stats.CONFIRMED
    assert stats.verdict(iv(-1.0, -1.8, -0.2, 3)) == stats.CONTRADICTED
    assert stats.verdict(iv(0.5, -0.2, 1.2, 3)) == stats.INCONCLUSIVE
    assert stats.verdict(iv(5.0, None, None, 1)) == stats.INCONCLUSIVE  # one seed: no interval
    assert stats.verdict(iv(-0.5, -0.9, -0.1, 3), margin=-1.0) == stats.CONFIRMED  # within 1 point
    assert stats.verdict(iv(-3.0, -4.0, -2.0, 3), margin=-1.0) == stats.CONTRADICTED
    assert stats.combine([stats.CONFIRMED, stats.CONFIRMED]) == stats.CONFIRMED
    assert stats.combine([stats.CONFIRMED, stats.INCONCLUSIVE]) == stats.INCONCLUSIVE
    assert stats.combine([stats.INCONCLUSIVE, stats.CONTRADICTED]) == stats.CONTRADICTED


# ------------------------------------------------------------------------------------------ records
SCORES = {  # method -> accuracy per seed 1, 2, 3 (x100 in the table)
    "sparsegrad": (0.80, 0.81, 0.82),
    "lora": (0.75, 0.76, 0.775),  # SG - LoRA = 5, 5, 4.5: interval well above 0 -> confirmed
    "meprop": (0.85, 0.865, 0.865),  # SG - MeProp = -5, -5.5, -4.5: well below 0 -> contradicted
    "full": (0.78, 0.83, 0.80),  # SG - FT = 2, -2, 2: interval straddles -1 -> inconclusive
}
MEMORY = {"lora": (900, 905, 895), "sparsegrad": (1000, 1010, 990), "full": (1200, 1190, 1210), "meprop": (1000,) * 3}
SPEED = {"lora": (3.0, 3.1, 2.9), "sparsegrad": (2.0, 2.1, 1.9), "full": (2.5, 2.6, 2.4), "meprop": (2.0,) * 3}


def fixture_records(model="minilm", train_non_mlp=True, train_head=False) -> list[dict]:
    rs = []
    for method, scores in SCORES.items():
        rs.append(record("sweep", method, "movie_sentiment", 42, scores[0], model=model))
        for i, seed in enumerate((1, 2, 3)):
            r = record("seeds", method, "movie_sentiment", seed, scores[i], model=model, sps=SPEED[method][i],
                       mem_mb=MEMORY[method][i])
            r["config"]["model"] = {"train_non_mlp": train_non_mlp, "train_head": train_head}
            r["training"]["stop_reason"] = "early stopping: no improvement in 4 evaluations"
            rs.append(r)
    return rs


ANALYSIS = {  # HOSVD share above the original in every layer -> (f) confirmed
    "model": "minilm", "task": "movie_sentiment",
    "energy_top_share": {"original": 0.5, "hosvd": 0.7},
    "energy_top_share_by_layer": {f"layer{i}": {"original": 0.5 + 0.01 * i, "hosvd": 0.7 + 0.012 * i}
                                  for i in range(6)},
}


def by_claim(fs):
    return {(f.claim, f.model): f for f in fs}


def test_known_verdicts_on_fixture_records():
    fs = by_claim(findings.build(fixture_records(), ANALYSIS, {"models": {"minilm": "bert_base"}}))
    a, b, c = fs[("a", "minilm")], fs[("b", "minilm")], fs[("c", "minilm")]
    assert a.verdict == stats.CONFIRMED
    assert a.parts[0][1].mean == pytest.approx(14.5 / 3)
    half = T2 * math.sqrt(1 / 12) / math.sqrt(3)  # sample sd of 5, 5, 4.5 is sqrt(1/12)
    assert a.parts[0][1].lo == pytest.approx(14.5 / 3 - half)
    assert a.paper.startswith("+1.0 (bert_base")  # Table 5/9: 82.6 vs 81.6
    assert b.verdict == stats.CONTRADICTED and b.parts[0][1].hi < 0
    assert c.verdict == stats.INCONCLUSIVE and c.n == 3
    assert fs[("d", "minilm")].verdict == stats.CONFIRMED  # 900 < 1000 < 1200 MB
    e = fs[("e", "minilm")]
    assert e.verdict == stats.CONTRADICTED  # SparseGrad slower than full FT here
    assert [v for _, _, v in e.parts] == [stats.CONFIRMED, stats.CONTRADICTED]
    assert fs[("f", "minilm")].verdict == stats.CONFIRMED and fs[("f", "minilm")].n == 6
    assert ("g", "minilm") not in fs  # (g) is for loss tasks only


def test_mlp_only_setting_gets_its_own_rows():
    rs = fixture_records() + fixture_records("minilm_mlp", train_non_mlp=False, train_head=True)
    fs = by_claim(findings.build(rs))
    assert fs[("a", "minilm")].setting.startswith("paper")
    assert fs[("a", "minilm_mlp")].setting == "MLP only (+ task head)"
    assert fs[("a", "minilm_mlp")].verdict == stats.CONFIRMED


def test_runs_at_the_step_cap_are_noted():
    rs = fixture_records()
    rs[1]["training"]["stop_reason"] = "max_steps reached"  # a sparsegrad seed run
    f = by_claim(findings.build(rs))[("a", "minilm")]
    assert "1/6 runs stopped by the step cap or the end of the epochs" in f.notes[0]


def test_runs_at_the_step_cap_say_how_far_from_converged_they_were():
    """Each method's runs that did not converge: the slope of their selection curve at the end, per 10 steps."""
    rs = chat_records({"sparsegrad": (1.20, 1.21, 1.19), "lora": (1.30, 1.32, 1.31)})
    for r, tail in zip(rs, ([1.30, 1.28, 1.26], [1.3, 1.3, 1.3], [1.24, 1.22, 1.20],  # sparsegrad: -0.02, 0, -0.02
                            [1.5, 1.45, 1.4], [1.5, 1.46, 1.42], [1.6, 1.5, 1.4])):   # lora: -0.05, -0.04, -0.1
        r["training"]["stop_reason"] = "max_steps reached"
        r["evaluations"] = [{"step": 10 * (i + 8), "epoch": 0.1, "split": "validation", "role": "selection",
                             "checkpoint": "current", "metrics": {"loss": v}} for i, v in enumerate(tail)]
    f = by_claim(findings.build(rs, None, {"models": {"smollm2": "llama2_7b"}, "tasks": {"chat": "oasst1"}}))[("a", "smollm2")]
    assert "still moving when they stopped" in f.notes[0] and "lora -0.050, sparsegrad -0.020" in f.notes[0]


def chat_records(losses: dict[str, tuple[float, ...]]) -> list[dict]:
    """Seed runs of smollm2 on chat: method -> validation loss per seed 1, 2, 3 (lower is better)."""
    rs = []
    for method, vs in losses.items():
        for seed, v in zip((1, 2, 3), vs):
            r = record("seeds", method, "chat", seed, v, model="smollm2", metric="loss")
            r["main_metric"]["higher_is_better"] = False
            r["config"]["method"] = {"name": method, "kind": method.split("_")[0]}
            rs.append(r)
    return rs


def test_loss_task_claims_and_table6_row():
    rs = chat_records({"sparsegrad": (1.20, 1.21, 1.19), "lora": (1.30, 1.32, 1.31), "full": (1.25, 1.26, 1.24),
                       "meprop": (1.202, 1.22, 1.18)})
    fs = by_claim(findings.build(rs, None, {"models": {"smollm2": "llama2_7b"}, "tasks": {"chat": "oasst1"}}))
    assert fs[("a", "smollm2")].verdict == stats.CONFIRMED  # lower loss than LoRA
    assert fs[("b", "smollm2")].verdict == stats.INCONCLUSIVE  # MeProp about the same
    assert ("c", "smollm2") not in fs
    g = fs[("g", "smollm2")]
    assert g.verdict == stats.INCONCLUSIVE  # lowest against LoRA and FT, not clearly against MeProp
    assert g.paper.startswith("sparsegrad 1.247")


def test_markdown_and_tables_md_start_with_findings(tmp_path):
    from sparsegrad.suite.report import tables

    (tmp_path / "analysis").mkdir()
    import json

    (tmp_path / "analysis" / "sparsity.json").write_text(json.dumps(ANALYSIS), encoding="utf-8")
    tables.write_all(fixture_records(), tmp_path, profile_name="fixture")
    text = (tmp_path / "findings.md").read_text(encoding="utf-8")
    assert "| (a) SparseGrad ≥ LoRA" in text and "**confirmed**" in text and "**contradicted**" in text
    assert "Verdict rule" in text and "t(0.975, n−1)" in text
    summary = (tmp_path / "tables.md").read_text(encoding="utf-8")
    assert summary.index("### Findings") < summary.index("### Table 3")


def test_table6_shows_the_interval_over_seeds():
    from sparsegrad.suite.report import tables

    rs = []
    for seed, v in zip((1, 2, 3), (1.0, 2.0, 3.0)):
        r = record("seeds", "sparsegrad", "chat", seed, v, model="smollm2", metric="loss")
        r["main_metric"]["higher_is_better"] = False
        rs.append(r)
    t6 = tables.table6(rs, tables.Paper.load(), tables.Analogue())
    half = T2 / math.sqrt(3)
    assert t6.rows[0][6] == f"[{2 - half:.3f}, {2 + half:.3f}]"


def test_a_variant_fills_its_kinds_role():
    # the llama profiles run MeProp as the authors did (dense AdamW: method meprop_adamw, kind meprop)
    rs = chat_records({"sparsegrad": (1.20, 1.21, 1.19), "lora": (1.30, 1.32, 1.31), "full": (1.25, 1.26, 1.24),
                       "meprop_adamw": (1.30, 1.31, 1.29)})
    fs = by_claim(findings.build(rs))
    assert fs[("b", "smollm2")].verdict == stats.CONFIRMED  # 0.1 lower than MeProp on every seed
    g = fs[("g", "smollm2")]
    assert g.verdict == stats.CONFIRMED and "meprop: the meprop_adamw variant" in g.notes
    assert not any("variant" in n for n in fs[("a", "smollm2")].notes)  # (a) does not involve MeProp
    # with the plain method present as well, the plain one fills the role
    plain = [dict(r, method="meprop", config={**r["config"], "method": {"name": "meprop", "kind": "meprop"}})
             for r in rs if r["method"] == "meprop_adamw"]
    for r, v in zip(plain, (1.10, 1.11, 1.09)):
        r["best"] = {**r["best"], "score": v}
    fs = by_claim(findings.build(rs + plain))
    assert fs[("b", "smollm2")].verdict == stats.CONTRADICTED


# ------------------------------------------------------------------------------------------- power
def _hand_mde(sd, n, level=0.95, power=0.80):
    from scipy.stats import t

    return (t.ppf(0.5 + level / 2, n - 1) + t.ppf(power, n - 1)) * sd / math.sqrt(n)


def _hand_seeds(difference, sd):
    n = 2
    while _hand_mde(sd, n) > abs(difference):
        n += 1
    return n


def test_detectable_difference_and_seeds_needed_by_hand():
    from scipy.stats import t

    assert stats.detectable_difference(2.0, 5) == pytest.approx((t.ppf(0.975, 4) + t.ppf(0.8, 4)) * 2.0 / math.sqrt(5))
    assert stats.detectable_difference(2.0, 1) is None and stats.detectable_difference(None, 3) is None
    # sd 1, difference 1: n = 10 ((2.262 + 0.883)/√10 = 0.995), n = 9 falls short ((2.306 + 0.889)/3 = 1.065)
    assert stats.seeds_needed(1.0, 1.0) == 10 == _hand_seeds(1.0, 1.0)
    assert stats.seeds_needed(-0.5, 1.0) == _hand_seeds(0.5, 1.0)  # the sign does not matter
    assert stats.seeds_needed(0.01, 5.0) is None  # beyond MAX_SEEDS
    assert stats.seeds_needed(1.0, 0.0) == 2


def test_each_row_states_its_power_in_the_claims_units():
    fs = by_claim(findings.build(fixture_records(), ANALYSIS, {"models": {"minilm": "bert_base"}}))
    a = fs[("a", "minilm")].power[0]
    sd = math.sqrt(1 / 12)  # paired differences 5, 5, 4.5
    assert a.detectable == pytest.approx(_hand_mde(sd, 3))
    assert a.paper_difference == pytest.approx(1.0, abs=1e-9)  # bert_base GLUE avg 82.6 vs 81.6
    assert a.seeds_needed == _hand_seeds(1.0, sd) == 3  # n = 2: (12.71 + 1.38)·0.289/√2 = 2.9 > 1
    c = fs[("c", "minilm")].power[0]  # SparseGrad - FT = 2, -2, 2: sd 4/√3; the paper's +0.1 is 1.1 above -1
    assert c.paper_difference == pytest.approx(1.1, abs=1e-9)
    assert c.seeds_needed == _hand_seeds(1.1, 4 / math.sqrt(3))
    d = fs[("d", "minilm")].power  # FT - SparseGrad: the paper's (1345 - 1016)/1016 of our SparseGrad mean (1000 MB)
    assert d[1].paper_difference == pytest.approx((1345 - 1016) / 1016 * 1000)
    assert d[1].detectable == pytest.approx(_hand_mde(statistics_sd([200, 180, 220]), 3))
    text = findings.markdown(list(fs.values()))
    assert "| detectable (80% power) | seeds for the paper's Δ |" in text and "MDE = (t(0.975, n−1) + t(0.80, n−1))" in text
    assert "unavailable" in text  # these fixture records hold no per-example results


def statistics_sd(values):
    import statistics

    return statistics.stdev(values)


# --------------------------------------------------------------------------------------- bootstrap
def _with_examples(rs, correct_by_method, n=400):
    """Per-example results: method -> a function (seed, i) -> correct?; labels all 1."""
    from sparsegrad.suite.run import examples as examples_lib

    for r in rs:
        if r["_stage"] != "seeds":
            continue
        f = correct_by_method[r["method"]]
        preds = [1 if f(r["seed"], i) else 0 for i in range(n)]
        r["examples"] = examples_lib.entry("classification", "test", "best", predictions=preds, labels=[1] * n)
        r["best"]["score"] = sum(preds) / n
    return rs


def test_test_split_bootstrap_matches_the_normal_approximation():
    import numpy as np

    n = 400
    rng = np.random.default_rng(5)
    table = {m: rng.random((4, n)) < p for m, p in (("sparsegrad", 0.8), ("lora", 0.7), ("meprop", 0.8),
                                                      ("full", 0.8))}
    rs = _with_examples(fixture_records(), {m: (lambda s, i, m=m: bool(table[m][s, i])) for m in table}, n)
    cells, _ = findings.by_role(findings.seed_runs(rs))
    lo, hi = findings.test_split_bootstrap(cells, "minilm", ["movie_sentiment"], "sparsegrad", "lora")
    # the statistic is the mean over examples of d_i = 100 * mean over seeds of (c_sg - c_lora): its sd is sd(d)/√n
    d = 100 * np.mean([table["sparsegrad"][s].astype(float) - table["lora"][s] for s in (1, 2, 3)], axis=0)
    half = 1.959964 * d.std(ddof=1) / math.sqrt(n)
    assert (hi - lo) / 2 == pytest.approx(half, rel=0.1)
    assert lo < d.mean() < hi
    again = findings.test_split_bootstrap(cells, "minilm", ["movie_sentiment"], "sparsegrad", "lora")
    assert again == (lo, hi)  # a fixed stream: the table is a pure function of the records
    row = by_claim(findings.build(rs))[("a", "minilm")]
    assert findings._fmt_test_split(row.power[0], row) == f"±{(hi - lo) / 2:.1f}"


def test_bootstrap_is_unavailable_for_records_without_per_example_results():
    rs = _with_examples(fixture_records(), {m: (lambda s, i: i % 2 == 0) for m in SCORES})
    next(r for r in rs if r["method"] == "lora" and r["_stage"] == "seeds").pop("examples")
    cells, _ = findings.by_role(findings.seed_runs(rs))
    assert findings.test_split_bootstrap(cells, "minilm", ["movie_sentiment"], "sparsegrad", "lora") == "unavailable"


# ------------------------------------------------------------------------------------------ memory
def _rss_records():
    """Records from before the live-bytes gauge: peak RSS, SparseGrad's inflated by its basis phase."""
    rs = fixture_records()
    base = {"full": 440, "lora": 440, "sparsegrad": 593, "meprop": 440}
    added = {"full": 827, "lora": 700, "sparsegrad": 780, "meprop": 800}
    for r in rs:
        m = r["method"]
        r["memory"] = {"device_type": "cpu", "how": "peak process RSS", "baseline_bytes": base[m] * 2**20,
                       "train_peak_bytes": (base[m] + added[m] + r["seed"] % 3) * 2**20}
    return rs


def test_memory_claim_falls_back_to_what_training_added_for_rss_records_and_says_so():
    d = by_claim(findings.build(_rss_records()))[("d", "minilm")]
    ft_minus_sg = d.parts[1][1]
    assert ft_minus_sg.mean == pytest.approx(827 - 780)  # not (440 + 827) - (593 + 780) = -106
    assert d.verdict == stats.CONFIRMED
    assert "predate the live-tensor-bytes gauge" in d.notes[0] and "-106 MB" in d.notes[0]


def test_memory_claim_uses_live_bytes_and_names_the_basis_phase():
    rs = fixture_records()
    for r in rs:
        if r["method"] == "sparsegrad":
            r["memory"]["basis_peak_bytes"] = 1500 * 2**20
    d = by_claim(findings.build(rs))[("d", "minilm")]
    assert d.notes[0] == "memory: the training phase's peak of live tensor bytes"
    assert "preliminary (basis) phase, not part of the claim: peak 1500 MB" in d.notes[1]
    from sparsegrad.suite.report import tables

    t3 = tables.table3(rs, tables.Paper.load(), [])
    basis = [row for row in t3.rows if "preliminary phase" in row[1]]
    assert basis and basis[0][7] == "1500"


def test_memory_claim_is_checked_against_make_bench(tmp_path):
    import json

    from sparsegrad.suite.report.table_inputs import load_bench_memory

    def bench(name, full, sparsegrad, **extra):
        (tmp_path / name).write_text(json.dumps({
            "device": "cpu", **extra, "shape_defs": [{"key": "minilm bs16x128 movie-padded", "model": "minilm"}],
            "summary": {"minilm bs16x128 movie-padded": {"methods": {"full": {"peak_mb": full},
                                                                      "sparsegrad": {"peak_mb": sparsegrad}}}}}))

    bench("cpu-old.json", 900, 1000)  # an RSS bench: SparseGrad above FT, against the records (FT above)
    bench("cpu-new.json", 1000, 900, memory_gauge="live_tensor_bytes")
    d = by_claim(findings.build(fixture_records(), bench=load_bench_memory(tmp_path)))[("d", "minilm")]
    new = next(n for n in d.notes if "cpu-new.json" in n)
    old = next(n for n in d.notes if "cpu-old.json" in n)
    assert "FT − SparseGrad +100 MB" in new and "the direction of this row" in new
    assert "the opposite of this row: the gauges differ" in old
    none = by_claim(findings.build(fixture_records("smollm2"), bench=load_bench_memory(tmp_path)))
    assert "no run of smollm2 in results/bench (it holds minilm)" in none[("d", "smollm2")].notes[-1]


def test_fixed_budget_runs_say_the_final_checkpoint_is_scored():
    rs = fixture_records()
    for r in rs:
        r["config"].setdefault("trainer", {})["checkpoint"] = "final"
        r["training"].update(optimizer_steps=250, stop_reason="budget done: the linear schedule ended at step 250 (learning rate 0)")
    f = by_claim(findings.build(rs))[("a", "minilm")]
    assert any("(the final checkpoint scored)" in n for n in f.notes)
    assert not any("best checkpoint" in n or "step cap" in n for n in f.notes)
    rs[1]["config"]["trainer"]["checkpoint"] = "best"  # mixed policies: the best-checkpoint wording
    f = by_claim(findings.build(rs))[("a", "minilm")]
    assert any("best checkpoint at median step" in n for n in f.notes)
