#!/usr/bin/env bash
# The README's main command: installs lorakit into .venv (CPU torch) and runs the built-in demo.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup_env.sh ""   # explicit: no extras (a sourced script would inherit "$@")
set -u
lorakit demo "$@"
