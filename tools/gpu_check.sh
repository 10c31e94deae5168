#!/usr/bin/env bash
# The GPU check of the Triton read path, in one call (~5 minutes on one H200): from the repository root,
#
#     OUT=/some/dir bash tools/gpu_check.sh        # results in $OUT (default: ./gpu_check_out)
#
# Installs nothing: it uses the torch/triton/transformers already there (no Hydra needed). Steps, each
# under its own time limit so that a slow one still leaves the others' results:
#   1. versions and the GPU;
#   2. tests/test_triton.py compiled on CUDA (TRITON_INTERPRET=0), if pytest is installed;
#   3. the triton backend against the reference read at the Llama-3.1-8B layout (5 storages x float32/bf16
#      x decode/prefill, host synchronisation debugging set to "error"): verify.txt, verify.json;
#   4. the kernel benchmark (contexts 8k/32k/128k x batch 1/4/16; sdpa, triton, fused, dense):
#      bench_attention.md, bench_attention.json.
# GPU_CHECK_SMOKE=1 runs the same steps with tiny shapes under Triton's interpreter on the CPU (plumbing only).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-$PWD/gpu_check_out}"
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 WANDB_MODE=disabled
SMOKE=()
if [ "${GPU_CHECK_SMOKE:-0}" = 1 ]; then
  export TRITON_INTERPRET=1; SMOKE=(--smoke)
else
  export TRITON_INTERPRET=0
  python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" \
    || { echo "no CUDA device here: this check is for a GPU machine (GPU_CHECK_SMOKE=1 for a CPU dry run)"; exit 2; }
fi
: > "$OUT/summary.txt"
status=0
step() { echo "== $1 (exit $2)" | tee -a "$OUT/summary.txt"; [ "$2" = 0 ] || status=1; }

{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  python -c "import sys, torch, triton, transformers; print('python', sys.version.split()[0], '| torch', torch.__version__, 'cuda', torch.version.cuda, '| triton', triton.__version__, '| transformers', transformers.__version__); import streamkv; print('streamkv from', streamkv.__file__)"
} 2>&1 | tee "$OUT/env.txt"
step "environment" "${PIPESTATUS[0]}"

if python -c "import pytest" 2>/dev/null; then
  timeout 170 python -m pytest tests/test_triton.py -q -rA -p no:cacheprovider -p no:hydra_pytest --durations=5 \
      --junitxml="$OUT/tests.xml" 2>&1 | tail -60 > "$OUT/tests.txt"
  step "tests/test_triton.py on CUDA" "${PIPESTATUS[0]}"
else
  echo "pytest is not installed here: tests skipped (step 3 checks the kernels without it)" | tee "$OUT/tests.txt"
fi

timeout 100 python -m runners.bench_attention --verify "${SMOKE[@]}" --out "$OUT" 2>&1 | tee "$OUT/verify.txt" | tail -3
step "verify against the reference read" "${PIPESTATUS[0]}"

timeout 240 python -m runners.bench_attention "${SMOKE[@]}" --out "$OUT" --warmup 5 --repeats 20 2>&1 | tee "$OUT/bench.txt" | tail -45
step "kernel benchmark" "${PIPESTATUS[0]}"

cat "$OUT/summary.txt"
exit $status
