"""One benchmark run in a fresh process: one method on one model shape; prints/writes a JSON result.

Run by :mod:`experiments.benchmark` as ``python -m experiments._bench_worker --spec JSON --out FILE``.
Everything a run measures:

* ``steps_per_s``: timed training steps (forward, backward, optimizer step, zero_grad) after
  ``warmup`` untimed ones; on CUDA every step is bracketed by ``torch.cuda.synchronize``;
* memory: on CUDA the allocator peak over the training steps (``reset_peak_memory_stats`` before,
  ``max_memory_allocated`` after) and the bytes allocated once the model was loaded; on CPU the peak
  resident set size over the training steps, sampled every 2 ms by a thread, minus the resident size
  once the model was loaded (``malloc_trim`` is called before training so memory freed by earlier
  phases is not charged to training);
* ``optimizer_state_bytes`` (the method layer's ``state_bytes()``) and ``method_buffer_bytes``
  (transition matrices, cached effective weights, masks held by the swapped layers);
* for methods with a transition basis: its estimation time and extra peak memory, measured in the
  run that estimates it (later runs of the same shape load it from ``basis_cache``).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import threading
import time
from dataclasses import asdict, dataclass, field

METHODS = ("full", "lora", "meprop", "sparsegrad", "sparsegrad_rotated", "sparsegrad_regular", "leading_block")
BASIS_METHODS = ("sparsegrad", "sparsegrad_rotated", "sparsegrad_regular", "leading_block")

# Token counts of the 10,605 movie-review sentences under the MiniLM (bert-base-uncased) tokenizer,
# [CLS] and [SEP] included: length -> number of sentences. Used when the asset is not available.
MOVIE_LENGTHS = {
    4: 7, 5: 22, 6: 56, 7: 82, 8: 113, 9: 142, 10: 167, 11: 201, 12: 218, 13: 233, 14: 250, 15: 242,
    16: 276, 17: 271, 18: 347, 19: 342, 20: 339, 21: 313, 22: 350, 23: 377, 24: 368, 25: 339, 26: 382,
    27: 368, 28: 385, 29: 351, 30: 303, 31: 312, 32: 314, 33: 272, 34: 266, 35: 252, 36: 283, 37: 232,
    38: 184, 39: 188, 40: 174, 41: 184, 42: 133, 43: 129, 44: 118, 45: 104, 46: 95, 47: 76, 48: 61,
    49: 59, 50: 48, 51: 36, 52: 58, 53: 45, 54: 31, 55: 28, 56: 12, 57: 19, 58: 9, 59: 8, 60: 6, 61: 2,
    62: 8, 63: 5, 64: 4, 65: 1, 66: 1, 67: 1, 68: 1, 72: 1, 79: 1,
}  # fmt: skip

# Architecture configs (random init; no download). bert/roberta: transformers defaults = base size.
MODEL_SHAPES = {
    "minilm": {"model_type": "bert", "hidden_size": 384, "num_hidden_layers": 6, "num_attention_heads": 12,
               "intermediate_size": 1536, "vocab_size": 30522},
    "bert-base": {"model_type": "bert"},
    "roberta-base": {"model_type": "roberta", "vocab_size": 50265, "max_position_embeddings": 514,
                     "pad_token_id": 1, "bos_token_id": 0, "eos_token_id": 2, "type_vocab_size": 1},
    "smollm2": {"model_type": "llama", "hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30,
                "num_attention_heads": 9, "num_key_value_heads": 3, "vocab_size": 49152, "head_dim": 64,
                "tie_word_embeddings": True, "pad_token_id": 2, "rms_norm_eps": 1e-5},
    "llama2-7b": {"model_type": "llama", "hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
                  "num_attention_heads": 32, "num_key_value_heads": 32, "vocab_size": 32000,
                  "tie_word_embeddings": False, "pad_token_id": 0},
    # tiny shapes for the harness tests
    "tiny-bert": {"model_type": "bert", "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
                  "intermediate_size": 64, "vocab_size": 1000},
    "tiny-llama": {"model_type": "llama", "hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 4,
                   "num_attention_heads": 2, "num_key_value_heads": 2, "vocab_size": 1000, "pad_token_id": 0,
                   "tie_word_embeddings": False},
}  # fmt: skip
# The paper's settings per family: LoRA rank and k (Table 5/6 budgets); LLaMA: every 3rd block, MLP only.
FAMILY = {
    "bert": {"lora_rank": 7, "k": 28000 / (768 * 3072), "every_nth_block": None, "train_non_mlp": True},
    "roberta": {"lora_rank": 7, "k": 28000 / (768 * 3072), "every_nth_block": None, "train_non_mlp": True},
    "llama": {"lora_rank": 32, "k": 100000 / (4096 * 11008), "every_nth_block": 3, "train_non_mlp": False},
}


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
    extra: dict = field(default_factory=dict)


def movie_lengths(n: int, seq: int, seed: int) -> list[int]:
    """``n`` sequence lengths drawn from the real movie-sentence length distribution, capped at seq."""
    rng = random.Random(seed)
    lengths, counts = zip(*sorted(MOVIE_LENGTHS.items()))
    return [min(seq, x) for x in rng.choices(lengths, weights=counts, k=n)]


def real_movie_lengths() -> list[int] | None:
    """Token counts of the movie sentences with the MiniLM tokenizer, or None without the assets."""
    try:
        from transformers import AutoTokenizer

        from sparsegrad.suite.assets import asset_path, load_movie_reviews

        tok = AutoTokenizer.from_pretrained(asset_path("minilm"))
        return [len(ids) for ids in tok([t for _, _, t in load_movie_reviews()])["input_ids"]]
    except Exception:  # noqa: BLE001 - any missing asset or tokenizer problem: use the stored histogram
        return None


def make_batches(spec: Spec, config, n: int, seed: int, trim: bool = False) -> list[dict]:
    """``n`` batches of random token ids with the spec's padding; ``trim``: cut to the longest row."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    causal = config.model_type == "llama"
    pad_id = config.pad_token_id if config.pad_token_id is not None else 0
    batches = []
    for i in range(n):
        if spec.padding == "movie":
            lengths = torch.tensor(movie_lengths(spec.batch, spec.seq, seed * 1000 + i))
        elif spec.padding == "none":
            lengths = torch.full((spec.batch,), spec.seq)
        else:
            raise ValueError(f"unknown padding {spec.padding!r}; valid: movie, none")
        seq = int(lengths.max()) if trim else spec.seq
        ids = torch.randint(5, config.vocab_size, (spec.batch, seq), generator=gen)
        mask = (torch.arange(seq)[None, :] < lengths[:, None]).long()
        ids = ids.masked_fill(mask == 0, pad_id)
        batch = {"input_ids": ids, "attention_mask": mask}
        if causal:
            batch["labels"] = ids.masked_fill(mask == 0, -100)
        else:
            batch["labels"] = torch.randint(0, 2, (spec.batch,), generator=gen)
        batches.append(batch)
    return batches


def build_model(spec: Spec):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

    if spec.model not in MODEL_SHAPES:
        raise ValueError(f"unknown model {spec.model!r}; valid: {', '.join(MODEL_SHAPES)}")
    shape = dict(MODEL_SHAPES[spec.model])
    model_type = shape.pop("model_type")
    if spec.layers:
        shape["num_hidden_layers"] = spec.layers
    dtype = getattr(torch, spec.dtype)
    causal = model_type == "llama"
    source = "random init from the architecture config"
    model = None
    if spec.pretrained and spec.model in ("minilm", "smollm2"):
        try:
            from sparsegrad.suite.assets import asset_path

            path = asset_path(spec.model)
            kwargs = {"num_hidden_layers": spec.layers} if spec.layers else {}
            if causal:
                model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, **kwargs)
            else:
                model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2, dtype=dtype, **kwargs)
            source = f"pretrained weights from {path}"
        except Exception as exc:  # noqa: BLE001 - fall back to the config shape
            source = f"random init (pretrained asset unavailable: {type(exc).__name__})"
            model = None
    if model is None:
        torch.manual_seed(spec.seed)
        if causal:
            config = AutoConfig.for_model(model_type, **shape)
        else:
            config = AutoConfig.for_model(model_type, num_labels=2, **shape)
        auto = AutoModelForCausalLM if causal else AutoModelForSequenceClassification
        with torch.device(spec.device):  # initialise on the device: a 7B-shaped layer stack in seconds
            model = auto.from_config(config)
        if dtype != torch.float32:
            model = model.to(dtype)
    if causal and model.config.pad_token_id is None:
        model.config.pad_token_id = 0
    return model, source


def _rss() -> int:
    import psutil

    return int(psutil.Process(os.getpid()).memory_info().rss)


def _malloc_trim() -> None:
    from sparsegrad.basis import release_freed_memory

    release_freed_memory()


class PeakMeter:
    """Peak memory over a block: CUDA allocator peak, or sampled RSS on CPU."""

    def __init__(self, device):
        self.device = device
        self.cuda = device.type == "cuda"
        self.peak = 0
        self._stop = threading.Event()
        self._thread = None

    def _run(self):
        while not self._stop.wait(0.002):
            self.peak = max(self.peak, _rss())

    def __enter__(self):
        import torch

        if self.cuda:
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            self.peak = _rss()
            self._thread = threading.Thread(target=self._run, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc):
        import torch

        if self.cuda:
            torch.cuda.synchronize(self.device)
            self.peak = int(torch.cuda.max_memory_allocated(self.device))
        else:
            self._stop.set()
            self._thread.join()
            self.peak = max(self.peak, _rss())
        return False


def current_bytes(device) -> int:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)
        return int(torch.cuda.memory_allocated(device))
    return _rss()


def _family(model) -> dict:
    return FAMILY["llama" if model.config.model_type == "llama" else model.config.model_type]


def get_basis(spec: Spec, model, device, result: dict):
    """Load the cached basis, or estimate it here (timed, with its extra peak memory) and cache it."""
    import torch

    import sparsegrad

    fam = _family(model)
    targets = sparsegrad.find_targets(model, every_nth_block=fam["every_nth_block"])
    if spec.basis_cache and os.path.exists(spec.basis_cache):
        basis = sparsegrad.Basis.load(spec.basis_cache, map_location=device)
        result["basis"] = {"loaded_from_cache": True}
        return basis, targets
    # The basis batches use the same lengths trimmed to their longest row (dynamic padding): the same
    # gradients as the padded batches (padding receives no gradient), less compute.
    basis_spec = Spec(**{**asdict(spec), "padding": "movie"})
    batches = make_batches(basis_spec, model.config, spec.basis_steps, seed=spec.seed + 7, trim=True)
    before = current_bytes(device)
    with PeakMeter(device) as meter:
        start = time.perf_counter()
        basis = sparsegrad.estimate_basis(model, batches, targets, steps=spec.basis_steps,
                                          micro_batch=spec.basis_micro_batch)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds = time.perf_counter() - start
    result["basis"] = {
        "loaded_from_cache": False,
        "seconds": seconds,
        "seconds_backward": basis.stats.get("seconds_backward"),
        "seconds_eigh": basis.stats.get("seconds_eigh"),
        "extra_peak_bytes": int(meter.peak - before),
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
    """The method on the model, and its optimizer."""
    import torch

    import sparsegrad

    fam = _family(model)
    common = {"train_non_mlp": fam["train_non_mlp"]}
    if fam["every_nth_block"]:
        common["every_nth_block"] = fam["every_nth_block"]
    k = float(spec.extra.get("k", fam["k"]))
    basis = None
    if spec.method in BASIS_METHODS:
        basis, _ = get_basis(spec, model, device, result)
        _malloc_trim()
    if spec.method == "full":
        model = sparsegrad.apply_method(model, {"name": "full", **common})
    elif spec.method == "lora":
        model = sparsegrad.apply_method(model, {"name": "lora", "lora_rank": int(spec.extra.get("lora_rank", fam["lora_rank"])), **common})
    elif spec.method == "meprop":
        model = sparsegrad.apply_method(model, {"name": "meprop", "k": k, **common})
    elif spec.method in ("sparsegrad", "sparsegrad_rotated", "sparsegrad_regular"):
        formulation = "regular" if spec.method == "sparsegrad_regular" else "auto"
        storage = "weight" if spec.method == "sparsegrad" else "rotated"
        sd = spec.method != "sparsegrad_regular"  # the paper's "Reg" runs the 3-product layer with a dense backward
        model = sparsegrad.apply_method(model, {"name": "sparsegrad", "k": k, "formulation": formulation,
                                                "storage": storage, "sparse_by_dense": sd, **common},
                                        basis=basis)  # fmt: skip
    elif spec.method == "leading_block":
        from sparsegrad.fixed_support import apply_leading_block

        model = apply_leading_block(model, basis, k, block_factor=spec.block_factor,
                                    every_nth_block=fam["every_nth_block"], train_non_mlp=fam["train_non_mlp"])  # fmt: skip
    else:
        raise ValueError(f"unknown method {spec.method!r}; valid: {', '.join(METHODS)}")
    del basis
    model.to(device)
    lr = 1e-5
    if spec.method == "leading_block":
        from sparsegrad.fixed_support import build_optimizer

        opt = build_optimizer(model, lr=lr, schedule="constant")
    else:
        opt = sparsegrad.build_optimizer(model, lr=lr, schedule="constant", sparse_state=spec.sparse_state)
    n_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    result["trainable_params"] = int(n_trainable)
    result["k"] = k
    _ = torch
    return model, opt


def method_buffer_bytes(model) -> int:
    """Bytes of buffers the method adds to the swapped layers (basis, caches, masks), shared ones once."""
    from sparsegrad.fixed_support import LeadingBlockLinear
    from sparsegrad.layers import MePropLinear, SparseGradLinear

    seen, total = set(), 0
    for m in model.modules():
        if isinstance(m, (SparseGradLinear, MePropLinear, LeadingBlockLinear)):
            for name, b in m.named_buffers(recurse=False):
                if b is None or (isinstance(m, LeadingBlockLinear) and name == "weight"):
                    continue  # the variant's weight buffer replaces the original weight
                key = (b.untyped_storage().data_ptr(), b.dtype)
                if key in seen:
                    continue
                seen.add(key)
                total += b.numel() * b.element_size()
    return total


def run(spec: Spec) -> dict:
    import torch

    if spec.threads:
        torch.set_num_threads(spec.threads)
    device = torch.device(spec.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda but torch.cuda.is_available() is False")
    result: dict = {"spec": asdict(spec), "torch_threads": torch.get_num_threads()}
    torch.manual_seed(spec.seed)
    rss_start = _rss()
    model, source = build_model(spec)
    model.to(device)
    result["model_source"] = source
    result["model_params"] = int(sum(p.numel() for p in model.parameters()))
    result["model_layers"] = int(model.config.num_hidden_layers)
    _malloc_trim()
    loaded = current_bytes(device)
    result["rss_start_bytes"] = rss_start
    result["loaded_bytes"] = loaded
    config = model.config
    if spec.basis_only:
        get_basis(Spec(**{**asdict(spec), "basis_cache": None}), model, device, result)
        return result
    model, opt = apply(spec, model, device, result)
    model.train()
    batches = [{k: v.to(device) for k, v in b.items()} for b in make_batches(spec, config, 4, seed=spec.seed + 1)]
    result["tokens_per_batch"] = [int(b["attention_mask"].sum()) for b in batches]
    result["padded_tokens_per_batch"] = int(batches[0]["attention_mask"].numel())
    _malloc_trim()
    result["before_train_bytes"] = current_bytes(device)

    def step(batch):
        loss = model(**batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    times = []
    cpu_times = []  # process CPU time (all threads): robust to other processes time-slicing the cores
    losses = []
    with PeakMeter(device) as meter:
        for i in range(spec.warmup + spec.steps):
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            t0, c0 = time.perf_counter(), time.process_time()
            loss = step(batches[i % len(batches)])
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            dt, dc = time.perf_counter() - t0, time.process_time() - c0
            losses.append(float(loss.detach()))
            if i >= spec.warmup:
                times.append(dt)
                cpu_times.append(dc)
            print(f"    step {i + 1}/{spec.warmup + spec.steps}: {dt:.3f} s{' (warm-up)' if i < spec.warmup else ''}",
                  file=sys.stderr, flush=True)  # fmt: skip
    result["step_seconds"] = times
    result["steps_per_s"] = len(times) / sum(times) if times else None
    result["cpu_seconds_per_step"] = cpu_times
    result["cpu_s_per_step"] = sum(cpu_times) / len(cpu_times) if cpu_times else None
    result["losses"] = losses
    result["peak_train_bytes"] = int(meter.peak)
    result["peak_above_loaded_bytes"] = int(meter.peak - loaded)
    result["optimizer_state_bytes"] = int(opt.state_bytes())
    result["optimizer_state_by_part"] = {k: int(v) for k, v in opt.state_bytes_by_part().items()}
    result["method_buffer_bytes"] = int(method_buffer_bytes(model))
    if spec.profile:
        result["profile"] = profile_step(step, batches[0], device)
    return result


def profile_step(step, batch, device, top: int = 25) -> list[dict]:
    """Self time of the top operators over one training step (torch.profiler)."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        step(batch)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    rows = []
    key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    events = sorted(prof.key_averages(), key=lambda e: getattr(e, key, 0), reverse=True)[:top]
    for e in events:
        rows.append({"op": e.key, "calls": int(e.count), "self_ms": getattr(e, key, 0) / 1000.0})
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="one benchmark run (used by experiments.benchmark)")
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
