#!/usr/bin/env bash
# The test command: installs what the tests need into .venv, then runs pytest (args pass through).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup_env.sh test
set -u
# The llama.cpp tests (tests/export/test_llama_cpp.py) skip unless llama-cpp-python is installed:
# `bash scripts/build_llama_cpp.sh` builds it once (~5-13 min); .ci/run does.
python -m pip list 2>/dev/null | grep -iE '^(torch|transformers|peft|bitsandbytes|safetensors) ' || true
set +e
python -m pytest -q "$@"
rc=$?
set -e
if [ "$rc" -eq 5 ]; then
  echo "pytest collected no tests (exit 5): nothing to run"
  exit 0
fi
exit "$rc"
