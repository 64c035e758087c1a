#!/usr/bin/env bash
# The GPU figures in one go, for a session that has a CUDA GPU (from the repository root):
#
#     OUT=/path/to/results bash benchmarks/gpu_check.sh
#
# 1. the throughput bench (pipeline fit() vs the classic loop) at GPU step counts, on the CIFAR-10
#    JPEG archive decoded once, plus tracking and tuning overhead on the GPU;
# 2. one timed ResNet-9 pretrain on the archive: 45,000 train / 5,000 val, no test split.
# Results land in $OUT: bench.jsonl, pretrain_resnet9.json, logs, nvidia-smi.txt.
# Takes about 5 minutes on one H200 (most of it decoding the archive and the pretrain).
#
# BENCH_TINY=1 shrinks everything to a smoke test that also runs on a CPU (figures meaningless).
# Knobs: STEPS (timed steps, default 100), WARMUP (10), ROUNDS (3), EPOCHS (20), BATCH (512),
# LR (0.2), EMA (0.99), COMPILE (0), PY (the interpreter; default .venv/bin/python, else python).
set -euo pipefail
cd "$(dirname "$0")/.."

OUT="${OUT:-bench-gpu-out}"
mkdir -p "$OUT"
PY="${PY:-.venv/bin/python}"
[ -x "$PY" ] || PY=python
ARCHIVE="${ARCHIVE:-../shared/datasets/cifar10-jpeg-train.tar.gz}"
export MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR=false

{ nvidia-smi 2>&1 || echo "no nvidia-smi"; } > "$OUT/nvidia-smi.txt"
"$PY" -c 'import torch; print("torch", torch.__version__, "cuda", torch.cuda.is_available())' | tee "$OUT/env.txt"

start=$(date +%s)
if [ "${BENCH_TINY:-0}" = "1" ]; then
    bench_args=(--tiny --cases resnet18:imagenet --trials 2)
else
    bench_args=(--data jpeg --archive "$ARCHIVE" --warmup "${WARMUP:-10}" --steps "${STEPS:-100}" --rounds "${ROUNDS:-3}")
fi
echo "== bench: python -m benchmarks.run ${bench_args[*]}"
"$PY" -m benchmarks.run --device auto "${bench_args[@]}" > "$OUT/bench.jsonl" 2> "$OUT/bench.log" || {
    echo "bench failed; see $OUT/bench.log"; tail -20 "$OUT/bench.log"; }
cat "$OUT/bench.jsonl"

echo "== pretrain: resnet9 on $(basename "$ARCHIVE"), val_fraction=0.1 test_fraction=0"
"$PY" -m benchmarks.pretrain_check --out "$OUT" --archive "$ARCHIVE" \
    --epochs "${EPOCHS:-20}" --batch-size "${BATCH:-512}" --lr "${LR:-0.2}" --ema "${EMA:-0.99}" \
    --compile "${COMPILE:-0}" 2> "$OUT/pretrain.log" | tee "$OUT/pretrain.jsonl" || {
    echo "pretrain failed; see $OUT/pretrain.log"; tail -20 "$OUT/pretrain.log"; exit 1; }

echo "== done in $(( $(date +%s) - start )) s; results in $OUT"
