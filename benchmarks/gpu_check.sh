#!/usr/bin/env bash
# The GPU figures in one go, on a GPU machine that has only the working tree and a Python with torch
# (no .venv, no ../shared, no network, no mlflow/optuna needed). From the repository root:
#
#     ARCHIVE=path/to/cifar10-jpeg-train.tar.gz OUT=bench-gpu-out bash benchmarks/gpu_check.sh
#
# Copy the archive into the tree first when the machine receives only the tree. It runs
# python -m benchmarks.gpu_check --device cuda (stops at once when no CUDA GPU is visible) and
# writes $OUT/gpu_check.jsonl: cuDNN / torch.compile warm-up, steady img/s per architecture next to
# the classic DataLoader loop, seconds to 90% / 93% validation accuracy for the ResNet-9 recipe on
# the archive, and peak GPU memory per section. About 3-4 minutes on one H200.
#
# BENCH_TINY=1 runs a CPU smoke test on a generated archive (figures meaningless).
# Knobs: DEVICE (cuda | cuda:K), EPOCHS (16), BATCH (512), LR (0.2), EMA (0.99), ROUNDS (2),
# COMPILE (1: also time torch.compile's warm-up), PY (default .venv/bin/python if present, else python).
set -euo pipefail
cd "$(dirname "$0")/.."

OUT="${OUT:-bench-gpu-out}"
mkdir -p "$OUT"
PY="${PY:-.venv/bin/python}"
[ -x "$PY" ] || PY=python
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

{ nvidia-smi 2>&1 || echo "no nvidia-smi"; } > "$OUT/nvidia-smi.txt"
"$PY" -c 'import torch; print("torch", torch.__version__, "cuda", torch.cuda.is_available())' | tee "$OUT/env.txt"
# What the core needs besides torch; say what is missing before anything runs.
"$PY" - <<'PYEOF'
import importlib.util, sys
missing = [m for m in ("numpy", "torchvision", "PIL", "sklearn", "pandas", "tqdm") if importlib.util.find_spec(m) is None]
if missing:
    sys.exit(f"error: this Python lacks {', '.join(missing)}, which the pipeline core imports; install them or set PY=")
PYEOF

start=$(date +%s)
args=(--out "$OUT" --device "${DEVICE:-cuda}")
[ -n "${ARCHIVE:-}" ] && args+=(--archive "$ARCHIVE")
"$PY" -m benchmarks.gpu_check "${args[@]}" 2> "$OUT/gpu_check.log" || {
    echo "gpu_check failed; see $OUT/gpu_check.log"; tail -20 "$OUT/gpu_check.log"; exit 1; }
echo "== done in $(( $(date +%s) - start )) s; results in $OUT/gpu_check.jsonl"
