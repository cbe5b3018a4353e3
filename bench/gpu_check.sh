#!/usr/bin/env bash
# The prepared GPU check (issue 15). On a machine with a CUDA device, from the repository root:
#
#     bash bench/gpu_check.sh          # <= 8 minutes on one H200; needs no network
#
# 1. checks that torch sees a CUDA device (else: one line, exit 2);
# 2. installs what is missing (bitsandbytes, pytest, triton) from wheels carried in bench/wheels/
#    (git-ignored; fill it on a machine with network access:
#        pip download bitsandbytes==0.50.2 --no-deps -d bench/wheels && pip download pytest -d bench/wheels);
# 3. runs the gpu-marked tests: pytest -m gpu (Triton kernels bit for bit on CUDA, Linear4bit on
#    streams, the fused loss with GPU blocks, 8-bit/paged optimizers without host syncs, ...);
# 4. runs bench/bench_gpu.py: dequantize GB/s against bitsandbytes, then training steps of a
#    Llama-3-8B-shaped model, lorakit vs transformers + PEFT + bitsandbytes, and writes bench/GPU.md.
# Output: the table on stdout and bench/GPU.md (also copied into $OUT when that is set).
# Environment: PYTHON (default python3), GPU_CHECK_SECONDS (default 470, the whole script's budget),
# GPU_CHECK_SMOKE=1 (tests this script on a CPU: no CUDA check, bench_gpu.py --smoke; measures nothing).
set -uo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
BUDGET="${GPU_CHECK_SECONDS:-470}"
START=$(date +%s)
say() { echo "gpu_check: $*"; }
left() { echo $(( BUDGET - ($(date +%s) - START) )); }

if ! "$PY" -c "import torch" 2>/dev/null; then
  say "FAIL: '$PY' cannot import torch; nothing measured"; exit 2
fi
SMOKE=()
[ "${GPU_CHECK_SMOKE:-0}" = 1 ] && SMOKE=(--smoke --out /tmp/lorakit-GPU-smoke.md)
if [ ${#SMOKE[@]} = 0 ] && ! timeout 120 "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 3)" 2>/dev/null; then
  say "FAIL: no CUDA device visible to torch ($(timeout 60 "$PY" -c 'import torch; print("torch", torch.__version__, "CUDA build", torch.version.cuda)' 2>&1 | tail -1)); nothing measured"
  exit 2
fi

for pkg in bitsandbytes pytest triton; do
  if ! "$PY" -c "import $pkg" 2>/dev/null; then
    if ls bench/wheels/"$pkg"-*.whl >/dev/null 2>&1; then
      deps=(); [ "$pkg" = bitsandbytes ] && deps=(--no-deps)  # its torch/numpy are the machine's own
      if "$PY" -m pip install --quiet --no-index --find-links bench/wheels "${deps[@]}" "$pkg" >/tmp/lorakit-pip.log 2>&1; then
        say "installed $pkg from bench/wheels"
      else
        say "could not install $pkg from bench/wheels: $(tail -1 /tmp/lorakit-pip.log)"
      fi
    else
      say "$pkg is missing and bench/wheels has no wheel for it (its part is skipped)"
    fi
  fi
done
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
"$PY" -c "import torch, triton, bitsandbytes, transformers, peft; print('gpu_check: torch', torch.__version__, '| triton', triton.__version__, '| bitsandbytes', bitsandbytes.__version__, '| transformers', transformers.__version__, '| peft', peft.__version__)" 2>/dev/null || true

PYTEST_LINE="not run (pytest missing)"
if "$PY" -c "import pytest" 2>/dev/null; then
  say "pytest -m gpu (at most 150 s)"
  timeout 150 "$PY" -m pytest -m gpu -q -p no:cacheprovider tests >/tmp/lorakit-gpu-pytest.log 2>&1
  rc=$?
  grep -E "^(FAILED|ERROR)" /tmp/lorakit-gpu-pytest.log | head -20
  PYTEST_LINE="$(grep -E "[0-9]+ (passed|failed|error|skipped|deselected)" /tmp/lorakit-gpu-pytest.log | tail -1)"
  [ "$rc" = 124 ] && PYTEST_LINE="timed out after 150 s; last line: $(tail -1 /tmp/lorakit-gpu-pytest.log)"
  [ -z "$PYTEST_LINE" ] && PYTEST_LINE="rc $rc: $(tail -1 /tmp/lorakit-gpu-pytest.log)"
  say "pytest -m gpu: $PYTEST_LINE"
fi

REMAIN=$(left)
if [ "$REMAIN" -lt 60 ]; then say "FAIL: only ${REMAIN} s left for the benchmark"; exit 1; fi
timeout "$REMAIN" "$PY" bench/bench_gpu.py --budget $(( REMAIN - 15 )) --pytest-line "$PYTEST_LINE" "${SMOKE[@]}"
rc=$?
[ "$rc" = 124 ] && say "FAIL: bench/bench_gpu.py ran past the budget"
if [ -n "${OUT:-}" ] && [ -f bench/GPU.md ]; then
  cp bench/GPU.md /tmp/lorakit-gpu-pytest.log "$OUT"/ 2>/dev/null
fi
say "done in $(( $(date +%s) - START )) s (rc $rc)"
exit "$rc"
