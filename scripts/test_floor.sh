#!/usr/bin/env bash
# The test suite again on the oldest supported transformers (pyproject.toml's floor), in its own
# venv, with the same CPU torch: proves the stated floor is real. Called by .ci/run.
set -euo pipefail
cd "$(dirname "$0")/.."
LORAKIT_VENV="${LORAKIT_FLOOR_VENV:-.venv-floor}" source scripts/setup_env.sh test
set -u
python -m pip install --quiet "transformers==5.1.0"
python -m pip list 2>/dev/null | grep -iE '^(torch|transformers|peft) ' || true
python -m pytest -q -p no:cacheprovider "$@"
