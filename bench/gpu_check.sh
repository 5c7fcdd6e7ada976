#!/usr/bin/env bash
# The whole GPU check in one command, for an H100/H200 machine with a CUDA toolkit and torch
# (no network needed; MONAI not needed):
#
#   bash bench/gpu_check.sh          # from the repository root; logs and results in ${OUT:-bench/out}
#
# Stages, most valuable first, each with its own log and time limit inside an 8-minute budget
# (GPU_CHECK_BUDGET_S; a stage gets at most what is left):
#   1. build the extension for this GPU only, with every core
#   2. what was built (python -m sgdc_kernels.info)
#   3. GPU correctness of every kernel variant of both fused backends against the float64 oracle
#   4. the benchmark at the paper shape (8x256x128x128, 4 heads, K=7): every variant of cuda and
#      triton beside torch, unfold and the torch.compile peer; fp32 and bf16; NCHW and channels_last
#   5. the SGD-Net training step (skipped with a message where timm or MONAI is missing; a machine
#      without a network installs MONAI from a wheel in .whl/, see below)
#   6. compute-sanitizer memcheck and racecheck on a small case of every variant (skipped with a
#      message where the tool or the device is not supported)
#   7. the benchmark's two other shapes
#   8. optional, only when at least 60 s of the budget are left (else skipped, not a failure):
#      NATTEN's na2d_av at OverLoCK's largest call (overlock-t-s3-k13) through cuda, triton and
#      torch, beside unfold + replicate-pad and its torch.compile; fp32 and bf16
# then prints a short table of the paper-shape results (bench/summary.py).
#
# Wheels in .whl/ at the repository root, if any, are installed first: the way to give a GPU
# machine without a network the packages it lacks. For the training step, download MONAI's wheel
# into the checkout on a machine with a network, keep it out of git and copy .whl/ with the
# checkout: `echo /.whl/ >> .git/info/exclude; python3 -m pip download --no-deps
# --only-binary=:all: --python-version 3.12 -d .whl monai`.
# Exit status 0 only if every stage ran and passed (a skipped stage says why and does not fail).
set -u
cd "$(dirname "$0")/.."
OUT="${OUT:-bench/out}"
mkdir -p "$OUT"
PY="${PYTHON:-python3}"
export CUDA_HOME="${CUDA_HOME:-/usr/local/cuda}"
export PATH="$CUDA_HOME/bin:$PATH"
export PYTHONUNBUFFERED=1
BUDGET="${GPU_CHECK_BUDGET_S:-480}"
START=$SECONDS
FAILED=()
LOG="$OUT/gpu_check.log"

# run NAME MAX_SECONDS CMD...: runs CMD with at most MAX_SECONDS (and no more than the budget left)
run() {
  local name=$1 max=$2; shift 2
  local left=$((BUDGET - (SECONDS - START)))
  local limit=$((max < left ? max : left))
  if ((limit < 10)); then
    echo "== $name: skipped, budget spent" | tee -a "$LOG"; FAILED+=("$name"); return 1
  fi
  echo "== $name (limit ${limit}s): $*" | tee -a "$LOG"
  local t0=$SECONDS
  timeout --kill-after=10 "$limit" "$@" >"$OUT/$name.log" 2>&1
  local rc=$?
  echo "== $name: rc=$rc in $((SECONDS - t0))s" | tee -a "$LOG"
  tail -n 8 "$OUT/$name.log"
  ((rc == 0)) || FAILED+=("$name")
  return $rc
}

: >"$LOG"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee -a "$LOG"
# Wheels for a machine without a network (e.g. .whl/monai-*.whl), if any.
if compgen -G ".whl/*.whl" >/dev/null; then
  $PY -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
fi
ARCH="${TORCH_CUDA_ARCH_LIST:-$($PY -c 'import torch; print("%d.%d" % torch.cuda.get_device_capability())')}"
export TORCH_CUDA_ARCH_LIST="$ARCH" MAX_JOBS="${MAX_JOBS:-$(nproc)}" FORCE_CUDA=1

# 1-2. A regular install builds sgdc_kernels._C for this GPU and maps triton_ops/ into the package;
# what imports the package runs from /tmp, not from the checkout's source tree.
run install 150 $PY -m pip install --no-build-isolation --no-deps -v . || {
  echo "== the build failed: nothing else can run" | tee -a "$LOG"; exit 1; }
run info 20 bash -c "cd /tmp && $PY -m sgdc_kernels.info"

# 3. GPU correctness, every variant (the tests parametrize over them), one stage per backend so
# that a slow one (Triton compiles each configuration) cannot starve the other; no -x, so one
# failure does not hide the others; the slowest tests are listed to size the next run.
run correctness_cuda 120 bash -c "cd /tmp && $PY -m pytest -q --durations=10 $PWD/tests/test_cuda.py"
run correctness_triton 150 bash -c "cd /tmp && $PY -m pytest -q --durations=10 $PWD/tests/test_triton.py"

# 4. the paper shape: every variant, both dtypes and layouts, with unfold and the compiled peer
run bench_paper 140 $PY bench/run.py --device cuda --shapes 8x256x128x128x4x7 --dtypes float32,bfloat16 \
  --layouts nchw,channels_last --backends cuda@all,triton@all,torch,unfold --out "$OUT/bench_paper.json"

# 5. the training step
if $PY -c "import timm, monai" 2>/dev/null; then
  run train_step 90 $PY bench/train_step.py --device cuda --amp bf16 --channels-last --out "$OUT/train_step.json"
else
  echo "== train_step: skipped, timm or monai is not installed here (put monai's wheel in .whl/, see the top of this file)" | tee -a "$LOG"
fi

# 6. compute-sanitizer, where the tool and the device support it
if command -v compute-sanitizer >/dev/null; then
  run memcheck 40 env PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool memcheck --error-exitcode 1 \
    $PY bench/sanitize_case.py
  if grep -q "Device not supported\|not supported on this" "$OUT/memcheck.log"; then
    echo "== sanitizers: compute-sanitizer says the device is not supported here (recorded, not a failure)" | tee -a "$LOG"
    FAILED=("${FAILED[@]/memcheck}")
  else
    run racecheck 40 compute-sanitizer --tool racecheck --racecheck-report all --error-exitcode 1 $PY bench/sanitize_case.py
  fi
else
  echo "== sanitizers: skipped, compute-sanitizer is not on PATH" | tee -a "$LOG"
fi

# 7. the other shapes, with what time is left
run bench_shapes 90 $PY bench/run.py --device cuda --shapes 8x256x64x64x4x7,8x64x128x128x4x13 \
  --dtypes float32,bfloat16 --backends cuda@all,triton@all,torch,unfold --no-peer --out "$OUT/bench_shapes.json"

# 8. optional: the na2d_av drop-in at an OverLoCK shape, if the budget allows
if ((BUDGET - (SECONDS - START) >= 60)); then
  run bench_overlock 90 $PY bench/run.py --device cuda --shapes overlock-t-s3-k13 --dtypes float32,bfloat16 \
    --backends cuda,triton,torch,unfold,"torch.compile(unfold)" --out "$OUT/bench_overlock.json"
else
  echo "== bench_overlock: skipped, less than 60 s of the budget left (optional, not a failure)" | tee -a "$LOG"
fi

echo "== total $((SECONDS - START))s; failed: ${FAILED[*]:-none}" | tee -a "$LOG"
$PY bench/summary.py "$OUT/bench_paper.json" 2>&1 | tee -a "$LOG"
FAILED=(${FAILED[@]})
((${#FAILED[@]} == 0))
