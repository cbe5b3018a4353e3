#!/usr/bin/env bash
# Create (or reuse) the project's virtual environment and install lorakit into it.
# Usage: source scripts/setup_env.sh [extras]     e.g. extras=test
# torch is pinned to the CPU build here only; the package itself accepts any torch >= 2.6 (docs/versions.md).
set -euo pipefail
VENV="${LORAKIT_VENV:-.venv}"
EXTRAS="${1:-}"
if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv "$VENV"
fi
. "$VENV/bin/activate"
python -m pip install --quiet --upgrade pip >/dev/null
python -c "import torch" 2>/dev/null || python -m pip install --quiet "torch==2.13.0"
if [ -n "$EXTRAS" ]; then
  python -m pip install --quiet -e ".[$EXTRAS]"
else
  python -m pip install --quiet -e .
fi
set +u
