"""How sparse are MLP gradients, in the original space and in SparseGrad's transition basis?

The measurement behind Figures 2 and 3 (``python -m experiments.sparsity_analysis`` runs it from the
Hydra configs; :mod:`sparsegrad.suite.report.figures` draws the figures from its JSON record).

Writes one JSON record that ``sparsegrad.suite.report.figures`` turns into Figures 2 and 3:

* Figure 2 (paper §3.1): the transition basis is estimated with ``sparsegrad.estimate_basis`` from
  ``steps`` batches; on ``eval_batches`` *other* batches the weight gradient G of every MLP linear
  is rotated into the basis, in the HOSVD orientation (u_out^T G u_in) and in the authors' orientation
  (u_out^T G u_in^T), and into a random orthogonal basis as a control. For each we record the share of
  gradient energy (sum of squares) held by the top 1% of entries, the histogram of log10 |entry|, and a
  block-averaged |G| of one layer for the heat maps.
* Figure 3 (paper §3.3): SparseGrad is applied and trained for ``train_steps`` steps; a hook on every
  SparseGradLinear output records dL/dỸ = dL/dY u_out: the share of its rows (tokens) and entries that
  are non-zero at every step, and the row pattern (batch x token) of the first step.

"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

TOP_FRACTION = 0.01
HIST_EDGES = [x / 2 for x in range(-24, 1)]  # log10(|g| / max|g|) from -12 to 0, half-decade bins


@dataclass
class Options:
    model: str = "minilm"  # names recorded with the result (the settings hold the real configuration)
    task: str = "movie_sentiment"
    steps: int = 12  # batches for the transition basis
    eval_batches: int = 4  # other batches whose gradients are analysed
    train_steps: int = 16  # SparseGrad training steps (Figure 3)
    batch_size: int = 16
    lr: float = 1e-4
    layer: str | None = None  # the module shown in the heat maps (default: the first target)
    seed: int = 0
    threads: int | None = None


def top_share(values, fraction: float = TOP_FRACTION) -> float:
    """Share of the energy (sum of squares) in the largest ``fraction`` of entries."""
    import torch

    sq = values.detach().double().flatten().square()
    n = max(1, math.ceil(fraction * sq.numel()))
    total = float(sq.sum())
    return float(torch.topk(sq, n).values.sum() / total) if total > 0 else 0.0


def log_histogram(values) -> list[int]:
    import torch

    a = values.detach().double().abs().flatten()
    peak = float(a.max())
    if peak == 0:
        return [0] * (len(HIST_EDGES) - 1)
    rel = torch.log10(a.clamp_min(peak * 1e-300) / peak).clamp(HIST_EDGES[0], HIST_EDGES[-1] - 1e-9)
    return torch.histogram(rel, bins=torch.tensor(HIST_EDGES, dtype=torch.float64)).hist.long().tolist()


def pooled(values, rows: int = 96, cols: int = 48) -> list[list[float]]:
    """Block means of |values| (out x in) on a rows x cols grid, scaled to max 1."""
    import torch

    a = values.detach().double().abs()[None, None]
    p = torch.nn.functional.adaptive_avg_pool2d(a, (min(rows, a.shape[2]), min(cols, a.shape[3])))[0, 0]
    p = p / p.max().clamp_min(1e-300)
    return [[round(float(v), 4) for v in row] for row in p]


def rotations(g, group_basis, random_pair):
    u_in, u_out = group_basis.u_in.double(), group_basis.u_out.double()
    r_in, r_out = random_pair
    g = g.double()
    return {
        "original": g,
        "hosvd": u_out.t() @ g @ u_in,
        "official": u_out.t() @ g @ u_in.t(),
        "random": r_out.t() @ g @ r_in,
    }


def random_orthogonal(n: int, gen):
    import torch

    q, r = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=torch.float64))
    return q * torch.sign(torch.diagonal(r))


def analyse(settings, opts: Options) -> dict:
    """The record of Figures 2-3 for the suite settings of (model, sparsegrad, task); see the module doc."""
    import torch
    from transformers import set_seed

    from sparsegrad.suite.run import data as data_lib
    from sparsegrad.suite.run import methods, models, tasks

    t0 = time.perf_counter()
    torch.set_num_threads(max(1, opts.threads or torch.get_num_threads()))
    spec = tasks.get_task(settings.task.name)
    set_seed(opts.seed)
    raw = tasks.load_raw_splits(spec, settings.task)
    split = tasks.arrange_splits(spec, settings.task, raw, "heldout", 0.1, 2000)
    texts = [t for e in split.train for t in e.get("texts", ()) if t]
    tokenizer = models.load_tokenizer(settings.model, texts)
    features = data_lib.encode_classification(split.train, tokenizer, settings.task.max_length)
    pad_id = int(tokenizer.pad_token_id)
    regression = spec.kind == tasks.REGRESSION
    gen = torch.Generator().manual_seed(opts.seed)
    order = data_lib.batch_indices(len(features), opts.batch_size, True, gen)
    need = opts.steps + opts.eval_batches + opts.train_steps
    if len(order) < need:
        raise ValueError(f"{len(features)} examples give {len(order)} batches of {opts.batch_size}; need {need}")
    batches = [data_lib.collate([features[i] for i in idx], pad_id, regression) for idx in order[:need]]
    basis_batches = batches[: opts.steps]
    eval_batches = batches[opts.steps: opts.steps + opts.eval_batches]
    train_batches = batches[opts.steps + opts.eval_batches:]

    model = models.build_model(settings.model, spec, tokenizer)
    settings.method.basis_steps = opts.steps
    basis, basis_seconds = methods.estimate_basis(model, settings.method, iter(basis_batches))
    targets = {name: basis.layer_keys[name] for name in basis.layer_keys}

    # ---------------------------------------------------------------- Figure 2: weight gradients
    rng = torch.Generator().manual_seed(opts.seed + 7)
    random_pairs = {}
    for key, gb in basis.groups.items():
        random_pairs[key] = (random_orthogonal(gb.u_in.shape[0], rng), random_orthogonal(gb.u_out.shape[0], rng))
    spaces = ("original", "hosvd", "official", "random")
    shares = {s: [] for s in spaces}
    shares_by_group: dict[str, dict[str, list[float]]] = {}
    shares_by_layer: dict[str, dict[str, list[float]]] = {}  # the findings table's paired samples
    shown_layer = sorted(targets)[0] if not opts.layer else opts.layer
    heat, hist = {}, {}
    params = list(model.parameters())
    flags = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(False)
    modules = {name: model.get_submodule(name) for name in targets}
    for m in modules.values():
        m.weight.requires_grad_(True)
    model.train()
    for b_i, batch in enumerate(eval_batches):
        model.zero_grad(set_to_none=True)
        model(**batch).loss.backward()
        for name, m in modules.items():
            key = targets[name]
            for space, mat in rotations(m.weight.grad, basis.groups[key], random_pairs[key]).items():
                value = top_share(mat)
                shares[space].append(value)
                shares_by_group.setdefault(key, {s: [] for s in spaces})[space].append(value)
                shares_by_layer.setdefault(name, {s: [] for s in spaces})[space].append(value)
                if name == shown_layer and b_i == 0:
                    heat[space] = pooled(mat)
                    hist[space] = log_histogram(mat)
    for p, f in zip(params, flags):
        p.requires_grad_(f)
        p.grad = None

    def mean(xs):
        return sum(xs) / len(xs) if xs else None

    # ---------------------------------------------------------------- Figure 3: dL/dỸ during training
    model = methods.apply(model, settings.method, basis)
    optimizer = methods.build_optimizer(model, lr=opts.lr, weight_decay=0.0, schedule="constant", warmup_steps=0,
                                        total_steps=opts.train_steps, max_grad_norm=1.0)
    from sparsegrad import SparseGradLinear

    captured: dict[str, object] = {}
    u_out_of = {name: basis.for_layer(name, targets[name]).u_out.float() for name in targets}

    def make_hook(name):
        def forward_hook(module, inputs, output):
            if output.requires_grad:
                output.register_hook(lambda g: captured.__setitem__(name, g.detach()))
        return forward_hook

    handles = [m.register_forward_hook(make_hook(n)) for n, m in model.named_modules()
               if isinstance(m, SparseGradLinear) and n in u_out_of]
    layer_names = sorted(u_out_of)
    per_step = []
    row_pattern, entry_heat = {}, None
    model.train()
    for step, batch in enumerate(train_batches):
        captured.clear()
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        mask = batch["attention_mask"].bool()
        entry = {"step": step, "loss": float(loss.detach()), "tokens": int(mask.sum()), "positions": int(mask.numel()),
                 "layers": {}}
        for name in layer_names:
            g = captured.get(name)
            if g is None:
                continue
            gt = g.float() @ u_out_of[name]  # dL/dỸ = dL/dY u_out
            rows = gt.reshape(-1, gt.shape[-1])
            nonzero_rows = rows.abs().amax(dim=1) > 0
            entry["layers"][name] = {
                "nonzero_rows": float(nonzero_rows.float().mean()),
                "nonzero_entries": float((rows != 0).float().mean()),
            }
            if step == 0 and name in (layer_names[0], opts.layer or layer_names[-1]):
                norms = gt.norm(dim=-1)
                row_pattern[name] = [[round(float(v), 6) for v in r] for r in (norms / norms.max().clamp_min(1e-30))]
                entry_heat = pooled(rows, rows=min(96, rows.shape[0]), cols=48)
        per_step.append(entry)
    for h in handles:
        h.remove()

    return {
        "schema": "sparsity_analysis/1",
        "model": opts.model, "task": opts.task, "seed": opts.seed,
        "basis": {"steps": opts.steps, "batch_size": opts.batch_size, "seconds": basis_seconds,
                  "orientation_note": "hosvd: u_out^T G u_in (Tucker core); official: u_out^T G u_in^T (authors' code)"},
        "top_fraction": TOP_FRACTION,
        "eval_batches": opts.eval_batches,
        "energy_top_share": {s: mean(v) for s, v in shares.items()},
        "energy_top_share_by_group": {k: {s: mean(v) for s, v in d.items()} for k, d in shares_by_group.items()},
        "energy_top_share_by_layer": {k: {s: mean(v) for s, v in d.items()} for k, d in shares_by_layer.items()},
        "shown_layer": shown_layer,
        "heatmaps": heat,
        "histogram_edges_log10_rel": HIST_EDGES,
        "histograms": hist,
        "training": {"steps": opts.train_steps, "lr": opts.lr, "layers": layer_names,
                     "shown_layer": opts.layer or layer_names[-1], "per_step": per_step,
                     "row_patterns_first_step": row_pattern, "entries_first_step": entry_heat},
        "seconds": time.perf_counter() - t0,
    }
