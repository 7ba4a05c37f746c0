"""How sparse are MLP gradients, in the original space and in SparseGrad's transition basis (Figures 2-3)?

    python -m experiments.sparsity_analysis --out results/default/analysis/sparsity.json
    python -m experiments.sparsity_analysis --model bert_base --task sst2 --out sparsity.json   # Hub

Composes the suite settings of (model, sparsegrad, task) from the Hydra configs and writes the JSON
record of :func:`sparsegrad.suite.run.sparsity.analyse` (what it measures is described there), which
``sparsegrad.suite.report.figures`` turns into Figures 2 and 3. Offline by default (MiniLM on movie-review
sentences, 2 CPU cores: about a minute).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"


def compose_settings(model: str, task: str, extra: list[str]):
    """Suite settings for (model, sparsegrad, task) from the project's Hydra configs."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from sparsegrad.suite.run.runner import settings_from_config

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("config", overrides=[f"model={model}", f"task={task}", "method=sparsegrad", "logger=none", *extra])
    resolved = OmegaConf.to_container(cfg, resolve=True)
    return settings_from_config(resolved, "unused")


def main(argv: list[str] | None = None) -> int:
    from sparsegrad.suite.run import sparsity

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="the JSON record to write")
    parser.add_argument("--model", default="minilm")
    parser.add_argument("--task", default="movie_sentiment")
    parser.add_argument("--steps", type=int, default=12, help="batches for the transition basis")
    parser.add_argument("--eval-batches", type=int, default=4, help="other batches whose gradients are analysed")
    parser.add_argument("--train-steps", type=int, default=16, help="SparseGrad training steps (Figure 3)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--layer", default=None, help="the module shown in the heat maps (default: the first target)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("override", nargs="*", help="extra Hydra overrides, e.g. task.max_length=64")
    args = parser.parse_args(argv)
    opts = sparsity.Options(**{k: v for k, v in vars(args).items() if k not in ("out", "override")})
    try:
        result = sparsity.analyse(compose_settings(args.model, args.task, args.override), opts)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; nothing written", file=sys.stderr)
        return 130
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    tmp.replace(out)
    e = result["energy_top_share"]
    print(f"[sparsity] top-1% energy share: original {e['original']:.3f}, hosvd {e['hosvd']:.3f}, "
          f"official {e['official']:.3f}, random {e['random']:.3f}; {result['seconds']:.0f} s -> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
