#!/usr/bin/env bash
# Refreshes the lock of tested versions: bash tools/lock.sh
# Resolves pyproject.toml's dependencies with the dev and report extras to the newest releases that fit
# its ranges (torch held at requirements/torch.txt) with uv's resolver, for CPython 3.11 on Linux, into
# requirements/lock.txt. Then run `bash .ci/run`: the lock lands only where the tests pass with it.
set -euo pipefail
cd "$(dirname "$0")/.."
tmp="$(mktemp -d "${TMPDIR:-/tmp}/streamkv-lock.XXXXXX")"
trap 'rm -rf "$tmp"' EXIT
python3 -m venv "$tmp/venv"
"$tmp/venv/bin/pip" install --disable-pip-version-check -q "uv>=0.9,<1"
"$tmp/venv/bin/uv" pip compile pyproject.toml --extra dev --extra report \
  --constraint requirements/torch.txt --python-version 3.11 --python-platform x86_64-unknown-linux-gnu \
  --upgrade --no-header --quiet --output-file "$tmp/lock.txt"
{ echo "# The versions streamkv's CI tested (CPython 3.11, Linux x86_64): install.sh installs with"
  echo "# --constraint this file; STREAMKV_UNLOCKED=1 bash install.sh ignores it. Refresh: bash tools/lock.sh"
  cat "$tmp/lock.txt"; } > requirements/lock.txt
echo "requirements/lock.txt: $(grep -cE '^[A-Za-z0-9]' requirements/lock.txt) packages;" \
  "$(grep -E '^(torch|transformers|lm-eval|hydra-core)==' requirements/lock.txt | tr '\n' ' ')"
