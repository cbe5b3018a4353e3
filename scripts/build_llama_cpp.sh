#!/usr/bin/env bash
# Build llama-cpp-python once (PyPI has only its sdist: CMake builds llama.cpp, ~13 min on 2 busy
# cores) into a wheel cache and install it into the active venv, for the slow llama.cpp tests
# (tests/export/test_llama_cpp.py, test_kquants.py). Usage: source the venv, then
#   bash scripts/build_llama_cpp.sh [cache folder, default .cache/llama-cpp-wheels]
# A portable CPU build (GGML_NATIVE=OFF), 2 parallel jobs. Never fails the caller: without the wheel
# the llama.cpp tests skip.
set -uo pipefail
cd "$(dirname "$0")/.."
VERSION=0.3.36
CACHE="${1:-.cache/llama-cpp-wheels}"
mkdir -p "$CACHE"
if python -c "import llama_cpp, sys; sys.exit(llama_cpp.__version__ != '$VERSION')" 2>/dev/null; then
  echo "llama-cpp-python $VERSION already installed"; exit 0
fi
WHEEL=$(ls "$CACHE"/llama_cpp_python-$VERSION-*.whl 2>/dev/null | head -1)
if [ -z "$WHEEL" ]; then
  if ! command -v cmake >/dev/null 2>&1 && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq cmake g++ >/dev/null) || true
  fi
  start=$(date +%s)
  CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_CUDA=OFF -DGGML_BLAS=OFF -DGGML_METAL=OFF -DLLAVA_BUILD=OFF -DGGML_OPENMP=OFF" \
  CMAKE_BUILD_PARALLEL_LEVEL=2 python -m pip wheel --quiet --no-deps "llama-cpp-python==$VERSION" -w "$CACHE" \
    || { echo "llama-cpp-python build failed: the llama.cpp tests will skip"; exit 0; }
  echo "built llama-cpp-python $VERSION in $(( $(date +%s) - start )) s"
  WHEEL=$(ls "$CACHE"/llama_cpp_python-$VERSION-*.whl | head -1)
fi
python -m pip install --quiet "$WHEEL" || echo "could not install $WHEEL: the llama.cpp tests will skip"
