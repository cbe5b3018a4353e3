#!/usr/bin/env bash
# The test command: installs what the tests need into .venv, then runs pytest (args pass through).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup_env.sh test
set -u
# llama.cpp for the slow GGUF tests (cached wheel after the first build; they skip without it).
# LORAKIT_NO_LLAMA_CPP=1 skips the build.
if [ -z "${LORAKIT_NO_LLAMA_CPP:-}" ]; then bash scripts/build_llama_cpp.sh; fi
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
