#!/usr/bin/env bash
# The whole GPU check of the `cuda` backend in one command, for an H100/H200 machine
# with a CUDA toolkit, compute-sanitizer and torch installed (no network needed):
#
#   bash bench/gpu_check.sh          # from the repository root; logs and results in ${OUT:-bench/out}
#
# Stages, each with its own log and a share of a 10-minute budget (later stages get what is
# left): build the extension for this GPU, the whole test suite, compute-sanitizer memcheck and
# racecheck on bench/sanitize_case.py, then bench/run.py. Exit status: 0 only if every stage passed.
set -u
cd "$(dirname "$0")/.."
OUT="${OUT:-bench/out}"
mkdir -p "$OUT"
PY="${PYTHON:-python}"
export CUDA_HOME="${CUDA_HOME:-/usr/local/cuda}"
export PATH="$CUDA_HOME/bin:$PATH"
BUDGET="${GPU_CHECK_BUDGET_S:-590}"
START=$SECONDS
FAILED=()

# run NAME MAX_SECONDS CMD...: runs CMD with at most MAX_SECONDS (and no more than the budget left)
run() {
  local name=$1 max=$2; shift 2
  local left=$((BUDGET - (SECONDS - START)))
  local limit=$((max < left ? max : left))
  if ((limit < 10)); then
    echo "== $name: skipped, budget spent" | tee -a "$OUT/gpu_check.log"; FAILED+=("$name"); return
  fi
  echo "== $name (limit ${limit}s): $*" | tee -a "$OUT/gpu_check.log"
  local t0=$SECONDS
  timeout --kill-after=10 "$limit" "$@" >"$OUT/$name.log" 2>&1
  local rc=$?
  echo "== $name: rc=$rc in $((SECONDS - t0))s" | tee -a "$OUT/gpu_check.log"
  tail -n 15 "$OUT/$name.log"
  ((rc == 0)) || FAILED+=("$name")
}

: >"$OUT/gpu_check.log"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee -a "$OUT/gpu_check.log"
# Build only for the GPU at hand (fast); override with TORCH_CUDA_ARCH_LIST.
ARCH="${TORCH_CUDA_ARCH_LIST:-$($PY -c 'import torch; print("%d.%d" % torch.cuda.get_device_capability())')}"
export TORCH_CUDA_ARCH_LIST="$ARCH" MAX_JOBS="${MAX_JOBS:-$(nproc)}"

# A regular install builds sgdc_kernels._C for this GPU and maps triton_ops/ into the package
# (the device README's recipe). `python -m`/`-c` put the working directory first on sys.path, so
# what imports the package runs from /tmp, not from the checkout's source tree.
run install 300 $PY -m pip install --no-build-isolation --no-deps -v .
run info 30 bash -c "cd /tmp && $PY -m sgdc_kernels.info"
run memcheck 60 env PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool memcheck --error-exitcode 1 $PY bench/sanitize_case.py
run racecheck 60 compute-sanitizer --tool racecheck --racecheck-report all --error-exitcode 1 $PY bench/sanitize_case.py
run pytest 300 bash -c "cd /tmp && $PY -m pytest $PWD/tests -q"
run bench 150 $PY bench/run.py --device cuda --out "$OUT/bench.json"
run bench_cl 60 $PY bench/run.py --device cuda --shapes 8x256x128x128x4x7 --layouts channels_last --no-peer --out "$OUT/bench_channels_last.json"
run train_step 120 $PY bench/train_step.py --device cuda --out "$OUT/train_step.json"

echo "== total $((SECONDS - START))s; failed: ${FAILED[*]:-none}" | tee -a "$OUT/gpu_check.log"
((${#FAILED[@]} == 0))
