#!/usr/bin/env bash
# The GPU machine's side of benchmarks/gpu_check.py (see its docstring): one prepared run.
#
# Installs the carried wheels offline (benchmarks/gpu_check_wheels.sh made them), runs the
# check on cuda:0 within GPU_CHECK_BUDGET_S seconds (default 300) and turns the results into
# an H200 preset. Everything lands in $OUT/gpu-h200 (6 files: what the device tool brings back).
set -uo pipefail
cd "$(dirname "$0")/.."
DIR="${OUT:-/tmp/gpu-check-out}/gpu-h200"
mkdir -p "$DIR"
if ! python3 -c "import gymnasium" 2>/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        .whl/gymnasium-*.whl .whl/farama_notifications-*.whl \
        || { echo "error: cannot install the carried wheels; run benchmarks/gpu_check_wheels.sh and carry .whl"; exit 2; }
    export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
# Small problems: numpy is as quick as numba and skips its compile (same results bit for bit).
export PYTHONUNBUFFERED=1 PLACER_DISABLE_NUMBA=1 PLACER_CACHE_DIR=/tmp/placer-cache
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv > "$DIR/nvidia-smi.txt" 2>&1
python3 benchmarks/gpu_check.py --device cuda:0 --out "$DIR" --budget-s "${GPU_CHECK_BUDGET_S:-300}" -v 2>&1 \
    | tee "$DIR/log.txt"
rc=${PIPESTATUS[0]}
python3 benchmarks/gpu_check.py --to-preset "$DIR" "$DIR/H200.yaml" 2>&1 | tee -a "$DIR/log.txt"
exit "$rc"
