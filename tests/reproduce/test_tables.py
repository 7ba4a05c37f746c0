"""Table builders on hand-made run records: exact Markdown and CSV, and the paper column."""

from pathlib import Path

import pytest

from sparsegrad.suite.report import tables
from tests.reproduce.fixture_records import ANALOGUE, glue_like_records, record


def build():
    return {t.key: t for t in tables.build_all(glue_like_records(), analogue=tables.Analogue(**ANALOGUE))}


ANALOGUE_NOTE = ("- Offline stand-ins: the paper column holds the closest paper analogue (minilm ↔ bert_base, "
                 "movie_score ↔ stsb, movie_sentiment ↔ sst2). Our runs are far shorter and smaller than the "
                 "paper's, so compare trends, not absolute values.")

TABLE9_MD = f"""### Table 9 — BERT-base per task (mean ± std over seeds)

| model | method | task | paper task | score | seeds | paper score | Δ |
|---|---|---|---|---|---|---|---|
| minilm | Regular FT | movie_sentiment | sst2 | 82.0 ± 1.6 | 3 | 92.7 ± 0.1 | -10.7 |
| minilm | Regular FT | movie_score | stsb | 61.0 ± 1.0 | 2 | 89.3 ± 0.6 | -28.3 |
| minilm | SparseGrad | movie_sentiment | sst2 | 80.0 ± 1.0 | 2 | 92.4 ± 0.1 | -12.4 |
| minilm | SparseGrad | movie_score | stsb | 65.0 ± 1.0 | 2 | 89.2 ± 0.4 | -24.2 |

- Score: the main metric ×100 of the best checkpoint (selected on held-out data) on the reported split; ± is the population std over seeds.
{ANALOGUE_NOTE}
- Runs that diverged or failed (left out of the means): minilm/sparsegrad/movie_sentiment: 1.
"""

TABLE9_CSV = """model,method,task,paper task,score,seeds,paper score,Δ
minilm,Regular FT,movie_sentiment,sst2,82.0 ± 1.6,3,92.7 ± 0.1,-10.7
minilm,Regular FT,movie_score,stsb,61.0 ± 1.0,2,89.3 ± 0.6,-28.3
minilm,SparseGrad,movie_sentiment,sst2,80.0 ± 1.0,2,92.4 ± 0.1,-12.4
minilm,SparseGrad,movie_score,stsb,65.0 ± 1.0,2,89.2 ± 0.4,-24.2
"""

TABLE13_CSV = """model,method,task,trials completed,not completed,best batch,best lr,best objective,paper batch,paper lr,lr tried,edge
minilm,Regular FT,movie_sentiment,2,0,16,1.00e-04,81.0,—,—,1.0e-05–1.0e-04,EDGE: lr highest tried
minilm,Regular FT,movie_score,1,0,16,2.00e-04,50.0,—,—,2.0e-04–2.0e-04,
minilm,SparseGrad,movie_sentiment,1,1,8,3.00e-04,79.0,32,1.47e-05,3.0e-04–1.0e-02,EDGE: lr lowest tried
minilm,SparseGrad,movie_score,1,0,16,5.00e-04,55.0,32,1.24e-04,5.0e-04–5.0e-04,
"""

TABLE3_CSV = """model,method,device,steps/s,paper steps/s,steps/s ÷ FT,paper ÷ FT,peak MB,paper peak MB,memory ÷ FT,paper ÷ FT,runs
minilm,Regular FT,cpu x86_64,2.00,4.11,1.00,1.00,1200,1345,1.00,1.00,5
minilm,SparseGrad,cpu x86_64,1.10,4.30,0.55,1.05,1350,1016,1.12,0.76,4
"""

TABLE7_CSV = """model,method,task,paper task,device,steps/s,paper steps/s,runs
minilm,Regular FT,movie_sentiment,sst2,cpu x86_64,2.00,5.10,3
minilm,Regular FT,movie_score,stsb,cpu x86_64,2.00,2.90,2
minilm,SparseGrad,movie_sentiment,sst2,cpu x86_64,1.00,6.20,2
minilm,SparseGrad,movie_score,stsb,cpu x86_64,1.20,3.80,2
"""

TABLE5_CSV = """model,method,trainable,paper trainable,AVG,paper AVG,Δ,tasks
minilm,Regular FT,22.7 M,109 M,71.5,82.5,-11.0,"movie_sentiment, movie_score"
minilm,SparseGrad,15.8 M,54 M,72.5,82.6,-10.1,"movie_sentiment, movie_score"
"""

TABLE11_CSV = """model,task,paper task,% kept,score,runs,paper score,Δ
minilm,movie_score,stsb,1.00,61.0,1,89.7 ± 0.6,-28.7
minilm,movie_score,—,2.28,65.0 ± 1.0,2,—,—
minilm,movie_score,stsb,4.20,67.0,1,89.3 ± 0.3,-22.3
"""


def test_table9_markdown_and_csv_exact():
    t = build()["table09"]
    assert t.markdown() == TABLE9_MD
    assert t.csv() == TABLE9_CSV


def test_best_settings_table_exact():
    assert build()["table13_15"].csv() == TABLE13_CSV


def test_speed_memory_tables_exact():
    ts = build()
    assert ts["table03"].csv() == TABLE3_CSV
    assert ts["table07"].csv() == TABLE7_CSV


def test_average_and_kept_fraction_tables_exact():
    ts = build()
    assert ts["table05"].csv() == TABLE5_CSV
    assert ts["table11_12"].csv() == TABLE11_CSV


def test_tables_without_records_say_so():
    ts = build()
    assert ts["table10"].rows == [] and "No run records" in ts["table10"].markdown()
    assert ts["table06"].rows == []


def test_paper_profile_names_need_no_analogue_note():
    rs = [record("seeds", "lora", "cola", s, v, model="roberta_base", metric="matthews_correlation")
          for s, v in ((1, 0.60), (2, 0.62))]
    t = {t.key: t for t in tables.build_all(rs)}["table10"]
    assert t.rows == [["roberta_base", "LoRA (peft, α = r)", "cola", "cola", "61.0 ± 1.0", "2", "60.6 ± 1.7", "+0.4"]]
    assert not any("stand-ins" in n for n in t.notes)


def test_cuda_bench_records_are_used_and_named(tmp_path):
    (tmp_path / "cuda-h100.json").write_text(
        '{"device": "cuda:0 NVIDIA H100", "results": [{"model": "roberta_base", "method": "full", '
        '"steps_per_second": 8.0, "peak_memory_mb": 2000}, {"model": "roberta_base", "method": "lora", '
        '"steps_per_second": 10.0, "peak_memory_mb": 1500}]}', encoding="utf-8")
    bench = tables.load_bench(tmp_path)
    t = tables.table3([], tables.Paper.load(), bench)
    assert [r[:4] for r in t.rows] == [["roberta_base", "Regular FT", "cuda:0 NVIDIA H100 (cuda-h100.json)", "8.00"],
                                       ["roberta_base", "LoRA (peft, α = r)", "cuda:0 NVIDIA H100 (cuda-h100.json)",
                                        "10.00"]]
    assert t.rows[1][5] == "1.25"  # 10 / 8 steps/s relative to full fine-tuning on the same device


def test_write_all_writes_markdown_csv_latex(tmp_path):
    written = tables.write_all(glue_like_records(), tmp_path, profile_name="fixture", analogue=ANALOGUE)
    names = {p.name for p in written}
    for stem in ("table03", "table05", "table07", "table08", "table09", "table10", "table04", "table13_15",
                 "table11_12", "table06"):
        assert {f"{stem}.md", f"{stem}.csv", f"{stem}.tex"} <= names
    tex = (tmp_path / "tables" / "table09.tex").read_text(encoding="utf-8")
    assert r"\begin{tabular}" in tex and r"$\pm$" in tex
    assert "Table 9" in (tmp_path / "tables.md").read_text(encoding="utf-8")
    assert Path(tmp_path / "tables" / "table09.csv").read_text(encoding="utf-8") == TABLE9_CSV


def test_cuda_benchmark_report_format_is_read(tmp_path):
    import json

    shape = "roberta-base bs32x128 movie-padded"
    report = {"machine": {"device": "cuda", "gpu": "NVIDIA H100 80GB HBM3"},
              "shape_defs": [{"key": shape, "model": "roberta-base"}],
              "summary": {shape: {"methods": {
                  "full": {"steps_per_s": 10.0, "peak_mb": 4000.0},
                  "sparsegrad": {"steps_per_s": 9.0, "peak_mb": 3000.0},
                  "sparsegrad_regular": {"steps_per_s": 2.0, "peak_mb": 3500.0},
                  "lora": {"error": "oom", "runs": 1}}}}}
    (tmp_path / "cuda-nvidia-h100.json").write_text(json.dumps(report), encoding="utf-8")
    t = tables.table3([], tables.Paper.load(), tables.load_bench(tmp_path))
    device = f"NVIDIA H100 80GB HBM3 (cuda-nvidia-h100.json, {shape})"
    assert [r[:5] for r in t.rows] == [
        ["roberta_base", "Regular FT", device, "10.00", "4.11"],
        ["roberta_base", "SparseGrad", device, "9.00", "4.30"],
        ["roberta_base", "SparseGrad (regular matmul)", device, "2.00", "0.90"],
    ]
    assert t.rows[1][5] == "0.90" and t.rows[1][9] == "0.75"


def test_leading_block_variant_sits_after_sparsegrad_with_empty_paper_columns():
    assert tables.METHOD_ORDER.index("leading_block") == tables.METHOD_ORDER.index("sparsegrad") + 1
    assert tables.METHOD_LABEL["leading_block"] == "SparseGrad, leading block (variant)"
    lb = [record("sweep", "leading_block", "movie_sentiment", 42, 0.77, lr=3e-4, bs=8, objective=0.78),
          *[record("seeds", "leading_block", "movie_sentiment", s, v, lr=3e-4, bs=8, sps=1.5, mem_mb=1250,
                   dense=15_600_000, budget=161_280, k=13440) for s, v in ((1, 0.76), (2, 0.78))]]
    ts = {t.key: t for t in tables.build_all(glue_like_records() + lb, analogue=tables.Analogue(**ANALOGUE))}
    label = "SparseGrad, leading block (variant)"
    t9 = ts["table09"]
    assert [r[1] for r in t9.rows] == ["Regular FT", "Regular FT", "SparseGrad", "SparseGrad", label]
    assert t9.rows[-1] == ["minilm", label, "movie_sentiment", "—", "77.0 ± 1.0", "2", "—", "—"]
    assert ts["table05"].rows[-1] == ["minilm", label, "15.8 M", "—", "77.0", "—", "—", "movie_sentiment"]
    assert ts["table13_15"].rows[-1] == ["minilm", label, "movie_sentiment", "1", "0", "8", "3.00e-04", "78.0",
                                         "—", "—", "3.0e-04–3.0e-04", ""]
    assert ts["table03"].rows[-1][:5] == ["minilm", label, "cpu x86_64", "1.50", "—"]
    assert ts["table03"].rows[-1][6] == "—" and ts["table03"].rows[-1][10] == "—"
    assert ts["table07"].rows[-1][1:7] == [label, "movie_sentiment", "—", "cpu x86_64", "1.50", "—"]
    assert ts["table11_12"].csv() == TABLE11_CSV  # the kept-fraction table is SparseGrad's alone
    for key in ("table03", "table07", "table08", "table05", "table09", "table13_15"):
        assert any(n.startswith(label + ": this repository's variant") for n in ts[key].notes), key
    assert not any("variant" in n for n in build()["table09"].notes)  # no variant row, no note
    assert r"SparseGrad, leading block (variant) & movie\_sentiment" in t9.latex()


def test_rows_say_which_lora_and_which_meprop_optimizer_and_share_the_paper_row():
    """lora / lora_authors and meprop / meprop_adamw are separate rows with their variant in the label;
    the authors' variants are compared with the paper's LoRA and MeProp numbers."""
    runs = [record("seeds", method, "movie_sentiment", s, 0.75, lr=3e-4, bs=8)
            for method in ("lora", "lora_authors", "meprop", "meprop_adamw") for s in (1, 2)]
    ts = {t.key: t for t in tables.build_all(glue_like_records() + runs, analogue=tables.Analogue(**ANALOGUE))}
    rows = {r[1]: r for r in ts["table09"].rows if r[2] == "movie_sentiment"}
    assert {"LoRA (peft, α = r)", "LoRA (authors': α = 1, scale 1/r)", "MeProp (lazy sparse Adam)",
            "MeProp (authors': dense AdamW)"} <= set(rows)
    paper = tables.Paper.load()
    assert paper.get("9", "bert_base", "lora_authors", "sst2", "score") == paper.get("9", "bert_base", "lora", "sst2", "score")
    assert rows["LoRA (authors': α = 1, scale 1/r)"][6] == rows["LoRA (peft, α = r)"][6] != "—"


COMMITTED = sorted(p.parent.name for p in (Path(__file__).resolve().parents[2] / "results").glob("*/tables.md"))


def test_committed_profiles_are_found():
    assert {"default_40steps", "smoke"} <= set(COMMITTED)


@pytest.mark.parametrize("profile", COMMITTED)
def test_committed_tables_rebuild_byte_for_byte(profile, tmp_path):
    """What `make tables PROFILE=<profile>` writes equals the committed tables, byte for byte."""
    from scripts import build_tables

    results = Path(__file__).resolve().parents[2] / "results" / profile
    out = tmp_path / profile
    assert build_tables.main(["--records", str(results / "records"), "--out", str(out), "--analogue", profile]) == 0
    committed = sorted(p.relative_to(results) for p in [results / "tables.md", *(results / "tables").iterdir()])
    rebuilt = sorted(p.relative_to(out) for p in [out / "tables.md", *(out / "tables").iterdir()])
    assert rebuilt == committed
    for rel in committed:
        assert (out / rel).read_bytes() == (results / rel).read_bytes(), rel


def _reference_markdown(columns, rows):
    """The Markdown the tables promise: one space around each cell, no column padding."""
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


def _reference_latex(columns, rows):
    esc = tables.latex_escape
    lines = [r"\begin{tabular}{" + "l" * len(columns) + "}", r"\toprule", " & ".join(map(esc, columns)) + r" \\",
             r"\midrule", *(" & ".join(map(esc, r)) + r" \\" for r in rows), r"\bottomrule", r"\end{tabular}"]
    return "\n".join(lines) + "\n"


def test_pandas_writers_keep_the_plain_formats_on_random_tables():
    import csv
    import io
    import random

    rng = random.Random(0)
    pieces = ["a", " ", "±", "Δ", "÷", "~", "_", "&", "%", "#", "\\", ",", '"', "—", "1", ".", "-", "e", "x y", ""]

    def text(n):
        return "".join(rng.choice(pieces) for _ in range(rng.randint(0, n)))

    for _ in range(300):
        columns = [text(3) for _ in range(rng.randint(1, 5))]
        rows = [[text(4) for _ in columns] for _ in range(rng.randint(1, 4))]
        t = tables.Table("k", "title", columns, rows, ["a note"])
        assert t.markdown() == f"### title\n\n{_reference_markdown(columns, rows)}\n\n- a note\n"
        buf = io.StringIO()
        csv.writer(buf, lineterminator="\n").writerows([columns, *rows])
        assert t.csv() == buf.getvalue()
        assert t.latex() == "% title\n" + _reference_latex(columns, rows) + "% a note\n"
        assert t.rows == rows and t.columns == columns


def test_every_row_that_is_not_the_papers_gets_its_note():
    notes = tables._variant_note(m for m in ["full", "shira", "leading_block"])  # a generator, read once
    assert [n.split(":")[0] for n in notes] == ["SparseGrad, leading block (variant)", "SHiRA (peft, random sparse mask)"]
    assert tables.METHOD_ORDER.index("shira") == tables.METHOD_ORDER.index("leading_block") + 1
