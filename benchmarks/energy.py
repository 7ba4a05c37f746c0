"""Where do the top-k entries of dL/dW~ sit? A measurement on real gradients (the report's energy section).

The transition basis orders its directions by gradient energy (eigenvalues of the Gram matrices,
descending), so the largest entries of the rotated gradient dL/dW~ = u_out^T (dL/dW) R may sit in the
leading rows and columns. If they do, a layer that trains only the leading r x c block of W~
(:class:`sparsegrad.methods.leading_block.layer.LeadingBlockLinear`) captures most of what the exact method keeps,
at about LoRA's cost.

Procedure: a model with real pretrained weights (MiniLM, the ``minilm`` asset) and a fresh
2-class head on movie-review sentences (label: mean score > 0), dynamic padding. The basis is
estimated on ``basis_batches`` batches (the method layer's :func:`sparsegrad.estimate_basis`), then
on ``eval_batches`` *other* batches the weight gradient of every MLP linear is rotated and we
report, per group and block size, averaged over layers and batches:

* ``entries``: share of the top-k entries of |dL/dW~| that lie in the leading r x c block;
* ``topk_energy``: share of the top-k entries' squared magnitude that lies in the block;
* ``block_energy``: share of the whole gradient's energy inside the block;
* ``block_topk_energy``: energy of the block's own top-k entries / energy of the global top-k
  (what a "top-k inside the leading block" layer keeps relative to the exact method).

It also reports the same top-k energy concentration in the original space and in the official
orientation, and the overlap of the top-k supports of consecutive batches (how stable a fixed
support would be).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

K_FRACTION = 28000 / (768 * 3072)  # the paper's k for base-size encoders (1.19 % of each MLP matrix)
BLOCK_FRACTIONS = ((1 / 32, 1 / 32), (1 / 16, 1 / 16), (1 / 8, 1 / 8), (1 / 4, 1 / 4), (1 / 2, 1 / 2),
                   (1 / 8, 1 / 2), (1 / 2, 1 / 8))  # fmt: skip


def _topk_mask(mat: torch.Tensor, k: int) -> torch.Tensor:
    flat = mat.abs().reshape(-1)
    idx = flat.topk(k, sorted=False).indices
    mask = torch.zeros_like(flat, dtype=torch.bool)
    mask[idx] = True
    return mask.view_as(mat)


def block_shares(g: torch.Tensor, k: int, rows: int, cols: int) -> dict[str, float]:
    """Shares of the top-k entries / energy of ``g`` inside its leading ``rows x cols`` block."""
    mask = _topk_mask(g, k)
    sq = g.double().pow(2)
    top_energy = float(sq[mask].sum())
    block = torch.zeros_like(mask)
    block[:rows, :cols] = True
    inside = mask & block
    k_block = min(k, rows * cols)
    block_top = _topk_mask(g[:rows, :cols], k_block)
    return {
        "entries": float(inside.sum()) / k,
        "topk_energy": float(sq[inside].sum()) / top_energy,
        "block_energy": float(sq[:rows, :cols].sum() / sq.sum()),
        "block_topk_energy": float(sq[:rows, :cols][block_top].sum()) / top_energy,
    }


def topk_energy(g: torch.Tensor, k: int) -> float:
    sq = g.double().pow(2).reshape(-1)
    return float(sq.topk(k).values.sum() / sq.sum())


def _batches(tokenizer, rows, batch_size: int, n: int, offset: int, max_len: int = 128):
    out = []
    for b in range(n):
        chunk = rows[offset + b * batch_size: offset + (b + 1) * batch_size]
        enc = tokenizer([t for _, _, t in chunk], padding=True, truncation=True, max_length=max_len,
                        return_tensors="pt")  # fmt: skip
        enc = dict(enc)
        enc["labels"] = torch.tensor([int(s > 0) for _, s, _ in chunk])
        out.append(enc)
    return out


MICRO_BATCHES = (4, 2)  # estimate_basis(micro_batch=...): the same sentences, more and smaller slices


def measure(basis_batches: int = 8, eval_batches: int = 4, batch_size: int = 16, seed: int = 0,
            progress: bool = True) -> dict:
    """Run the measurement on MiniLM + movie sentences; returns a JSON-able dict."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    import sparsegrad
    from sparsegrad.suite.run.assets import asset_path, load_movie_reviews

    start = time.perf_counter()
    torch.manual_seed(seed)
    path = asset_path("minilm")
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)
    rows = load_movie_reviews()
    gen = torch.Generator().manual_seed(seed)
    rows = [rows[i] for i in torch.randperm(len(rows), generator=gen).tolist()]
    b_basis = _batches(tokenizer, rows, batch_size, basis_batches, 0)
    b_eval = _batches(tokenizer, rows, batch_size, eval_batches, basis_batches * batch_size)
    targets = sparsegrad.find_targets(model)
    basis = sparsegrad.estimate_basis(model, b_basis, targets)
    micro = {mb: sparsegrad.estimate_basis(model, b_basis, targets, micro_batch=mb) for mb in MICRO_BATCHES}
    modules = {t.name: model.get_submodule(t.name) for t in targets}
    for p in model.parameters():
        p.requires_grad_(False)
    for m in modules.values():
        m.weight.requires_grad_(True)
    model.train()

    acc: dict = {}
    spaces: dict = {}
    overlaps: dict = {}
    previous: dict = {}
    shapes: dict = {}

    def add(store, key, values):
        slot = store.setdefault(key, {})
        for name, v in values.items():
            slot.setdefault(name, []).append(v)

    for i, batch in enumerate(b_eval):
        model.zero_grad(set_to_none=True)
        model(**batch).loss.backward()
        for t in targets:
            g = modules[t.name].weight.grad.detach().double()
            u_in, u_out = basis.for_layer(t.name, t.group)
            u_in, u_out = u_in.double(), u_out.double()
            out_f, in_f = g.shape
            shapes[t.group] = (out_f, in_f)
            k = max(1, round(K_FRACTION * out_f * in_f))
            g_hosvd = u_out.t() @ g @ u_in
            g_official = u_out.t() @ g @ u_in.t()
            add(spaces, t.group, {"original": topk_energy(g, k), "hosvd": topk_energy(g_hosvd, k),
                                  "official": topk_energy(g_official, k)})  # fmt: skip
            for mb, b_mb in micro.items():
                m_in, m_out = b_mb.for_layer(t.name, t.group)
                add(spaces, t.group, {f"hosvd_micro{mb}": topk_energy(m_out.double().t() @ g @ m_in.double(), k)})
            for fr, fc in BLOCK_FRACTIONS:
                r, c = max(1, round(fr * out_f)), max(1, round(fc * in_f))
                add(acc, (t.group, f"{r}x{c}"), block_shares(g_hosvd, k, r, c))
            # the k-sized and 4k-sized blocks of the variant (aspect chosen below)
            for mult in (1, 2, 4):
                r, c = variant_block(out_f, in_f, mult * k)
                add(acc, (t.group, f"{r}x{c} ({mult}k)"), block_shares(g_hosvd, k, r, c))
            mask = _topk_mask(g_hosvd, k)
            if t.name in previous:
                inter = float((mask & previous[t.name]).sum())
                add(overlaps, t.group, {"consecutive_overlap": inter / k})
            previous[t.name] = mask
        if progress:
            print(f"[energy] batch {i + 1}/{len(b_eval)} done", flush=True)

    def mean(d):
        return {k2: sum(v) / len(v) for k2, v in d.items()}

    return {
        "model": "minilm (all-MiniLM-L6-v2, pretrained) + fresh 2-class head",
        "data": "movie-review sentences (label: mean score > 0), dynamic padding",
        "basis_batches": basis_batches, "eval_batches": eval_batches, "batch_size": batch_size,
        "k_fraction": K_FRACTION, "shapes": {g: list(s) for g, s in shapes.items()},
        "basis_seconds": basis.stats.get("seconds"),
        "spaces_topk_energy": {g: mean(v) for g, v in spaces.items()},
        "blocks": [{"group": g, "block": b, **mean(v)} for (g, b), v in acc.items()],
        "support_overlap": {g: mean(v) for g, v in overlaps.items()},
        "seconds": time.perf_counter() - start,
    }  # fmt: skip


def variant_block(out_f: int, in_f: int, budget: int) -> tuple[int, int]:
    """(rows, cols) of a leading block with about ``budget`` entries and the matrix's aspect ratio.

    Equal-aspect blocks (rows/out = cols/in) balance the two projection costs ``T out rows`` and
    ``T in cols`` only when out = in; this keeps the matrix's shape, which is also what the
    measurement shows to hold the energy.
    """
    scale = math.sqrt(budget / (out_f * in_f))
    rows = min(out_f, max(1, round(out_f * scale)))
    cols = min(in_f, max(1, math.ceil(budget / rows)))
    return rows, cols


def to_markdown(res: dict) -> str:
    lines = [
        "## Where the top-k of dL/dW~ sits (real gradients)",
        "",
        f"{res['model']}; {res['data']}; basis from {res['basis_batches']} batches of "
        f"{res['batch_size']}, measured on {res['eval_batches']} other batches; k = "
        f"{res['k_fraction'] * 100:.2f}% of each matrix; averaged over the layers of a group and batches. "
        f"Shapes (out x in): {res['shapes']}.",
        "",
        "Top-k energy (share of the gradient's squared norm carried by its k largest entries):",
        "",
        "| group | original space | HOSVD orientation | official orientation | HOSVD, basis from micro-batches |",
        "|---|---|---|---|---|",
    ]
    for g, v in res["spaces_topk_energy"].items():
        micro = ", ".join(f"{v[key]:.3f} ({key.removeprefix('hosvd_micro')} rows per slice)"
                          for key in v if key.startswith("hosvd_micro")) or "–"  # fmt: skip
        lines.append(f"| {g} | {v['original']:.3f} | {v['hosvd']:.3f} | {v['official']:.3f} | {micro} |")
    lines += [
        "",
        "Leading r x c block of dL/dW~ (HOSVD orientation): share of the global top-k entries, of their "
        "energy, of the whole gradient energy, and energy of the block's own top-k relative to the "
        "global top-k:",
        "",
        "| group | block r x c | block / matrix | top-k entries inside | top-k energy inside | block energy | block's top-k / global top-k |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in res["blocks"]:
        out_f, in_f = res["shapes"][row["group"]]
        r, c = (int(x) for x in row["block"].split(" ")[0].split("x"))
        lines.append(
            f"| {row['group']} | {row['block']} | {r * c / (out_f * in_f) * 100:.1f}% | {row['entries']:.3f} | "
            f"{row['topk_energy']:.3f} | {row['block_energy']:.3f} | {row['block_topk_energy']:.3f} |"
        )
    lines += ["", "Overlap of the top-k supports of consecutive batches: " + ", ".join(
        f"{g} {v['consecutive_overlap']:.3f}" for g, v in res["support_overlap"].items()), ""]
    return "\n".join(lines)



def section(mode: str, out_dir: Path) -> tuple[str | None, dict | None]:
    """The measurement for the report: ``mode`` skip, cached (reuse ``energy_minilm.json``), run, or auto
    (run when the MiniLM and movie-review assets are present); in a fresh process. (Markdown, result)."""
    from benchmarks.machine import ROOT
    from benchmarks.runner import worker_env

    cached = out_dir / "energy_minilm.json"
    if mode == "skip":
        return None, None
    if mode == "cached":
        if not cached.exists():
            return None, None
        result = json.loads(cached.read_text())
        return to_markdown(result), result
    if mode == "auto":
        try:
            from sparsegrad.suite.run.assets import is_ready

            if not (is_ready("minilm") and is_ready("movie_reviews")):
                return None, None
        except Exception:  # noqa: BLE001 - no asset cache: nothing to measure on
            return None, None
    print("[energy] measuring where the top-k of dL/dW~ sits (MiniLM, movie sentences) ...", flush=True)
    cmd = [sys.executable, "-m", "benchmarks.energy", "--json", str(cached), "--eval-batches", "2"]
    proc = subprocess.run(cmd, cwd=ROOT, env=worker_env(), capture_output=True, text=True)
    if proc.returncode != 0 or not cached.exists():
        print(f"[energy] failed: {proc.stderr.strip().splitlines()[-1:]}", flush=True)
        return None, None
    result = json.loads(cached.read_text())
    return to_markdown(result), result


if __name__ == "__main__":
    import argparse

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--basis-batches", type=int, default=8)
    parser.add_argument("--eval-batches", type=int, default=4)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", os.cpu_count() or 1)))
    result = measure(args.basis_batches, args.eval_batches)
    print(to_markdown(result))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(result, fh, indent=1)
