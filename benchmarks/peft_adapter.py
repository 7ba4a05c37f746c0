"""What the PEFT methods' adapter files hold and how big they are, beside the base model and a LoRA
adapter of the same per-step budget.

    python -m benchmarks.peft_adapter                  # MiniLM and SmolLM2-135M (assets minilm, smollm2)
    python -m benchmarks.peft_adapter --steps 20 --rank 16

For each model the MLP linears (up and down of every block, the targets ``sparsegrad.find_targets``
finds) are adapted by LoRA of rank r and by SparseGrad and MeProp with the same number of trained entries
per layer and step, k = r (in + out) (the paper's comparison: LoRA r=7 on BERT-base against k=28000).
Each adapter trains ``--steps`` steps on random token batches (what a compact SparseGrad file holds
depends on the coordinates the steps touched; nothing else depends on the data), then is saved with
``save_pretrained``. Reported: the bytes of ``adapter_model.safetensors`` against the base model's
``model.safetensors`` (float32) and the LoRA file, and what each file holds (its tensors by kind).
Writes ``results/bench/peft_adapter.md`` and ``peft_adapter.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
MODELS = {"minilm": "bert", "smollm2": "llama"}


def batches_for(model, n: int, rows: int = 2, seq: int = 32, seed: int = 0) -> list[dict]:
    gen = torch.Generator().manual_seed(seed)
    vocab = model.config.vocab_size
    out = []
    for _ in range(n):
        ids = torch.randint(5, vocab, (rows, seq), generator=gen)
        batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
        batch["labels"] = ids.clone() if model.config.model_type == "llama" else torch.randint(0, 2, (rows,), generator=gen)
        out.append(batch)
    return out


def load(name: str):
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    from sparsegrad.suite.run.assets import asset_path

    torch.manual_seed(0)
    if MODELS[name] == "llama":
        return AutoModelForCausalLM.from_pretrained(asset_path(name), dtype=torch.float32)
    return AutoModelForSequenceClassification.from_pretrained(asset_path(name), num_labels=2)


def kind_of(key: str) -> str:
    """A saved tensor's kind: the last part of its name, the basis keys by their part."""
    if key.startswith("sparsegrad_basis."):
        return "basis " + key.rsplit(".", 1)[1]
    if ".lora_" in key:
        return "lora_" + key.split(".lora_")[1].split(".")[0]
    return key.rsplit(".", 1)[1]


def file_report(path: Path) -> dict:
    from safetensors.torch import load_file

    tensors = load_file(path)
    kinds: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for key, tensor in tensors.items():
        kinds[kind_of(key)][0] += 1
        kinds[kind_of(key)][1] += tensor.numel() * tensor.element_size()
    return {"bytes": path.stat().st_size, "kinds": {k: {"tensors": c, "bytes": b} for k, (c, b) in sorted(kinds.items())}}


def adapter(name: str, method: str, rank: int, steps: int, out: Path) -> dict:
    from peft import LoraConfig, get_peft_model

    import sparsegrad
    from sparsegrad.peft_tuner import default_target_modules

    model = load(name)
    targets = default_target_modules()[MODELS[name]]
    found = sparsegrad.find_targets(model)
    layer = model.get_submodule(found[0].name)
    k = rank * (layer.in_features + layer.out_features)
    config = {
        "lora": lambda: LoraConfig(r=rank, lora_alpha=rank, target_modules=targets),
        "sparsegrad": lambda: sparsegrad.SparseGradConfig(k=k, target_modules=targets),
        "sparsegrad_compact": lambda: sparsegrad.SparseGradConfig(k=k, target_modules=targets, compact_save=True),
        "meprop": lambda: sparsegrad.MePropConfig(k=k, target_modules=targets),
    }[method]()
    peft_model = get_peft_model(model, config)
    batches = batches_for(model, steps)
    if method.startswith("sparsegrad"):
        sparsegrad.initialize_sparsegrad_basis(peft_model, batches[:2])
    optimizer = sparsegrad.build_optimizer(peft_model, lr=1e-4, schedule="constant")
    started = time.perf_counter()
    for batch in batches:
        peft_model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    seconds = time.perf_counter() - started
    folder = out / f"{name}-{method}"
    peft_model.save_pretrained(folder)
    report = file_report(folder / "adapter_model.safetensors")
    account = sparsegrad.account(peft_model)
    report.update(k_per_layer=k if method != "lora" else None, rank=rank if method == "lora" else None,
                  layers=len(found), train_seconds=seconds,
                  updated_entries=account.updated_total if method != "lora" else None)  # fmt: skip
    return report


def base_bytes(name: str, out: Path) -> int:
    folder = out / f"{name}-base"
    load(name).save_pretrained(folder)
    return (folder / "model.safetensors").stat().st_size


def markdown(results: dict, args, load_average) -> str:
    lines = [
        "# PEFT adapter files: SparseGrad and MeProp beside LoRA",
        "",
        f"`python -m benchmarks.peft_adapter --steps {args.steps} --rank {args.rank}`; load average "
        f"{load_average[0]:.1f} / {load_average[1]:.1f} / {load_average[2]:.1f}. Targets: the MLP linears (up "
        "and down of every block). k = r (in + out) entries per layer and step, LoRA's number of trained "
        f"parameters per layer; {args.steps} steps at lr 1e-4 on random tokens before saving.",
        "",
        "| model | adapter | file MB | vs base model | vs LoRA | what the file holds |",
        "|---|---|---:|---:|---:|---|",
    ]
    for name, rows in results.items():
        base, lora = rows["base_bytes"], rows["lora"]["bytes"]
        lines.append(f"| {name} | base model (float32) | {base / 1e6:.1f} | 1 | | |")
        for method in ("lora", "sparsegrad", "sparsegrad_compact", "meprop"):
            row = rows[method]
            holds = ", ".join(f"{kind} {v['tensors']} x ({v['bytes'] / 1e6:.2f} MB)" for kind, v in row["kinds"].items())
            lines.append(f"| {name} | {method} | {row['bytes'] / 1e6:.2f} | {row['bytes'] / base:.4f} | "
                         f"{row['bytes'] / lora:.1f} | {holds} |")  # fmt: skip
    lines.append("")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="*", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--rank", type=int, default=8, help="LoRA rank; k = rank (in + out) (default 8)")
    parser.add_argument("--steps", type=int, default=10, help="training steps before saving (default 10)")
    parser.add_argument("--out", default=str(ROOT / "results" / "bench"), help="folder of peft_adapter.md/.json")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(min(4, os.cpu_count() or 1))
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models:
            rows = {"base_bytes": base_bytes(name, Path(tmp))}
            for method in ("lora", "sparsegrad", "sparsegrad_compact", "meprop"):
                rows[method] = adapter(name, method, args.rank, args.steps, Path(tmp))
                print(f"{name} {method}: {rows[method]['bytes'] / 1e6:.2f} MB", flush=True)
            results[name] = rows
    load_average = os.getloadavg()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "peft_adapter.json").write_text(json.dumps({"args": vars(args), "load_average": load_average,
                                                       "results": results}, indent=2) + "\n")  # fmt: skip
    (out / "peft_adapter.md").write_text(markdown(results, args, load_average))
    print(markdown(results, args, load_average))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
