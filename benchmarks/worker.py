"""One benchmark run in a fresh process: one method on one model shape; writes a JSON result.

Run by :mod:`benchmarks.runner` as ``python -m benchmarks.worker --spec JSON --out FILE``.
Everything a run measures:

* ``steps_per_s``: timed training steps (forward, backward, optimizer step, zero_grad) after
  ``warmup`` untimed ones; on CUDA every step is bracketed by ``torch.cuda.synchronize``;
* memory, gauged as the training runs gauge it (see :mod:`benchmarks.measure`): on CUDA the allocator
  peak over the training steps (``reset_peak_memory_stats`` before, ``max_memory_allocated`` after) and
  the bytes allocated once the model was loaded; on CPU the peak of live tensor bytes over the warm-up
  steps and one more untimed step after the timed ones (the gauge slows every tensor operation, so
  timed steps run without it), and the bytes of the loaded model's tensors; the peak resident set size
  over all steps beside it (``rss_*``);
* ``optimizer_state_bytes`` (the method layer's ``state_bytes()``) and ``method_buffer_bytes``
  (transition matrices, cached effective weights, masks held by the swapped layers);
* for methods with a transition basis: its estimation time and extra peak memory, measured in the
  run that estimates it (later runs of the same shape load it from ``basis_cache``).

The method itself comes from its row in :mod:`benchmarks.methods`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import asdict, dataclass, field

from benchmarks import methods
from benchmarks.measure import (
    PeakMeter,
    current_bytes,
    gauge_name,
    method_buffer_bytes,
    profile_step,
    release_freed_memory,
    rss,
)
from benchmarks.shapes import build_model, family_of, make_batches


@dataclass
class Spec:
    model: str = "minilm"
    layers: int | None = None  # override num_hidden_layers (truncated models)
    batch: int = 16
    seq: int = 128
    padding: str = "movie"  # movie: lengths of the real movie sentences, padded to seq | none
    method: str = "full"
    steps: int = 3
    warmup: int = 1
    device: str = "cpu"
    dtype: str = "float32"
    threads: int | None = None
    seed: int = 0
    basis_steps: int = 8
    basis_micro_batch: int | None = None  # estimate_basis(micro_batch=...): rows per backward pass
    basis_cache: str | None = None  # a file: load the basis if it exists, else estimate and save it
    block_factor: float = 2.0  # leading_block: block of block_factor * k entries, top-k inside
    sparse_state: str = "compact"  # LazySparseAdam layout for sparsegrad / meprop
    pretrained: bool = False  # minilm / smollm2: real weights from the asset cache when present
    profile: bool = False  # torch.profiler over one extra step; top ops in the result
    basis_only: bool = False  # measure the basis estimation alone (no cache, no training)
    gauge_basis: bool = True  # CPU: count live tensor bytes while estimating the basis (slows it a little)
    extra: dict = field(default_factory=dict)


def get_basis(spec: Spec, model, device, result: dict):
    """Load the cached basis, or estimate it here (timed, with its extra peak memory) and cache it."""
    import torch

    import sparsegrad

    fam = family_of(model)
    targets = sparsegrad.find_targets(model, every_nth_block=fam["every_nth_block"])
    if spec.basis_cache and os.path.exists(spec.basis_cache):
        basis = sparsegrad.Basis.load(spec.basis_cache, map_location=device)
        result["basis"] = {"loaded_from_cache": True}
        return basis, targets
    # The basis batches use the same lengths trimmed to their longest row (dynamic padding): the same
    # gradients as the padded batches (padding receives no gradient), less compute.
    basis_spec = Spec(**{**asdict(spec), "padding": "movie"})
    rss_before = rss()
    batches = make_batches(basis_spec, model.config, spec.basis_steps, seed=spec.seed + 7, trim=True)
    before = current_bytes(device, model)
    with PeakMeter(device, watch=(model,)) as meter, meter.gauged(spec.gauge_basis):
        start = time.perf_counter()
        basis = sparsegrad.estimate_basis(model, batches, targets, steps=spec.basis_steps,
                                          micro_batch=spec.basis_micro_batch)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds = time.perf_counter() - start
    gauged = device.type == "cuda" or spec.gauge_basis
    result["basis"] = {
        "loaded_from_cache": False,
        "seconds": seconds,
        "seconds_backward": basis.stats.get("seconds_backward"),
        "seconds_eigh": basis.stats.get("seconds_eigh"),
        "extra_peak_bytes": int(meter.peak - before) if gauged else None,
        "gauged": gauged,  # CPU: its seconds include the live-bytes gauge's bookkeeping
        "rss_extra_peak_bytes": None if device.type == "cuda" else int(meter.rss_peak - rss_before),
        "steps": spec.basis_steps,
        "micro_batch": spec.basis_micro_batch,
        "batch": spec.batch,
        "tokens_per_batch": [int(b["attention_mask"].sum()) for b in batches],
        "padded_width": [int(b["input_ids"].shape[1]) for b in batches],
    }
    if spec.basis_cache:
        basis.save(spec.basis_cache)
    return basis, targets


def apply(spec: Spec, model, device, result: dict):
    """The row's method on the model, and its optimizer."""
    row = methods.get(spec.method)
    fam = family_of(model)
    k = float(spec.extra.get("k", fam["k"]))
    basis = None
    if row.needs_basis:
        basis, _ = get_basis(spec, model, device, result)
        release_freed_memory()
    model = row.apply(model, basis, k, fam, spec)
    del basis
    model.to(device)
    opt = row.optimizer(model, spec)
    result["trainable_params"] = int(sum(p.numel() for p in model.parameters() if p.requires_grad))
    result["k"] = k
    return model, opt


def run(spec: Spec) -> dict:
    import torch

    overrides = methods.get(spec.method).spec
    if overrides:
        spec = Spec(**{**asdict(spec), **overrides})
    if spec.threads:
        torch.set_num_threads(spec.threads)
    device = torch.device(spec.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda but torch.cuda.is_available() is False")
    result: dict = {"spec": asdict(spec), "torch_threads": torch.get_num_threads()}
    torch.manual_seed(spec.seed)
    rss_start = rss()
    model, source = build_model(spec)
    model.to(device)
    result["model_source"] = source
    result["model_params"] = int(sum(p.numel() for p in model.parameters()))
    result["model_layers"] = int(model.config.num_hidden_layers)
    release_freed_memory()
    loaded = current_bytes(device, model)
    rss_loaded = rss()
    result["rss_start_bytes"] = rss_start
    result["loaded_bytes"] = loaded
    result["memory_gauge"] = gauge_name(device)
    config = model.config
    if spec.basis_only:
        get_basis(Spec(**{**asdict(spec), "basis_cache": None}), model, device, result)
        return result
    model, opt = apply(spec, model, device, result)
    model.train()
    batches = [{k: v.to(device) for k, v in b.items()} for b in make_batches(spec, config, 4, seed=spec.seed + 1)]
    result["tokens_per_batch"] = [int(b["attention_mask"].sum()) for b in batches]
    result["padded_tokens_per_batch"] = int(batches[0]["attention_mask"].numel())
    release_freed_memory()
    result["before_train_bytes"] = current_bytes(device, model, opt)

    def step(batch):
        loss = model(**batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    times = []
    cpu_times = []  # process CPU time (all threads): robust to other processes time-slicing the cores
    losses = []
    timed_end = spec.warmup + spec.steps
    extra = 0 if device.type == "cuda" else 1  # CPU: one more step, gauged and untimed
    with PeakMeter(device, watch=(model, opt)) as meter:
        for i in range(timed_end + extra):
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            t0, c0 = time.perf_counter(), time.process_time()
            with meter.gauged(not spec.warmup <= i < timed_end):
                loss = step(batches[i % len(batches)])
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            dt, dc = time.perf_counter() - t0, time.process_time() - c0
            losses.append(float(loss.detach()))
            if spec.warmup <= i < timed_end:
                times.append(dt)
                cpu_times.append(dc)
            what = " (warm-up)" if i < spec.warmup else " (memory, untimed)" if i >= timed_end else ""
            print(f"    step {i + 1}/{timed_end + extra}: {dt:.3f} s{what}", file=sys.stderr, flush=True)
    result["step_seconds"] = times
    result["steps_per_s"] = len(times) / sum(times) if times else None
    result["cpu_seconds_per_step"] = cpu_times
    result["cpu_s_per_step"] = sum(cpu_times) / len(cpu_times) if cpu_times else None
    result["losses"] = losses
    result["peak_train_bytes"] = int(meter.peak)
    result["peak_above_loaded_bytes"] = int(meter.peak - loaded)
    if device.type != "cuda":
        result["rss_peak_train_bytes"] = int(meter.rss_peak)
        result["rss_peak_above_loaded_bytes"] = int(meter.rss_peak - rss_loaded)
    result["optimizer_state_bytes"] = int(opt.state_bytes())
    result["optimizer_state_by_part"] = {k: int(v) for k, v in opt.state_bytes_by_part().items()}
    result["method_buffer_bytes"] = int(method_buffer_bytes(model))
    from sparsegrad import account

    result["master_bytes"] = int(account(model).master_bytes)  # float32 copies of a bf16 model's matrices
    if spec.profile:
        result["profile"] = profile_step(step, batches[0], device)
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="one benchmark run (used by benchmarks.runner)")
    parser.add_argument("--spec", required=True, help="JSON of a Spec")
    parser.add_argument("--out", required=True, help="file to write the JSON result to")
    args = parser.parse_args(argv)
    spec = Spec(**json.loads(args.spec))
    result = run(spec)
    with open(args.out, "w") as fh:
        json.dump(result, fh)
    return 0


if __name__ == "__main__":
    sys.exit(main())
