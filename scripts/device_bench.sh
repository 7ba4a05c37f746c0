#!/usr/bin/env bash
# The GPU benchmark: `python -m experiments.benchmark --preset gpu --device cuda`, about 7-8 minutes
# of wall time on one H100 (the preset skips runs that would overrun its 6.5-minute budget and rewrites its
# report after every run, so a stopped run still leaves one).
#
#   bash scripts/device_bench.sh         # -> $OUT/cuda-<gpu>.md/.json/.log when OUT is set, else results/bench/
#
# Needs no network and installs nothing: it uses the first Python whose torch sees a GPU ($PYTHON, python3,
# .venv/bin/python), with transformers, peft and psutil; models are built from architecture configs with
# random weights, so no asset cache is needed.
set -uo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 WANDB_MODE=disabled TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
PY=""
for cand in "${PYTHON:-}" python3 .venv/bin/python python; do
  [ -n "$cand" ] || continue
  if "$cand" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" >/dev/null 2>&1; then
    PY="$cand"
    break
  fi
done
if [ -z "$PY" ]; then
  echo "device_bench: no Python with a CUDA-enabled torch found (tried \$PYTHON, python3, .venv/bin/python)" >&2
  exit 2
fi
OUT_DIR="${OUT:-results/bench}"
mkdir -p "$OUT_DIR"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || true
"$PY" - <<'PYEOF' || exit 3
import peft, psutil, torch, transformers
print(f"python {torch.__file__.split('/lib/')[0]}: torch {torch.__version__} (CUDA {torch.version.cuda}), "
      f"transformers {transformers.__version__}, peft {peft.__version__}, GPU {torch.cuda.get_device_name(0)}")
PYEOF
# The preset's own budget ends the runs after ~6.5 min; the timeout only guards against a hang.
timeout 560 "$PY" -m experiments.benchmark --preset gpu --device cuda --out-dir "$OUT_DIR" --run-timeout 150 \
  2>&1 | tee "$OUT_DIR/device_bench.log"
status=${PIPESTATUS[0]}
ls -l "$OUT_DIR"
exit "$status"
