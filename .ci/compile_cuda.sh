#!/usr/bin/env bash
# Compile every csrc/cuda/*.cu for sm_80 and sm_90 (object files only, into a temp dir) and fail on any error.
# The kernels use raw pointers and cudaStream_t only, so this needs nvcc but neither torch's CUDA headers nor a GPU.
# The C++ standard is setup.py's (build_support.cxx_standard) for the torch the venv (or $PYTHON) has, or for the
# pinned torch 2.13 where none is importable yet; CXX_STD=c++17 overrides it.
set -euo pipefail
cd "$(dirname "$0")/.."
NVCC="${NVCC:-nvcc}"
command -v "$NVCC" >/dev/null || { echo "compile_cuda.sh: nvcc not found (set NVCC=/path/to/nvcc)" >&2; exit 1; }
if [ -x .venv/bin/python ]; then PYTHON="${PYTHON:-.venv/bin/python}"; else PYTHON="${PYTHON:-python3}"; fi
if [ -z "${CXX_STD:-}" ]; then
  torch_version="$("$PYTHON" -c "import torch; print(torch.__version__)" 2>/dev/null || echo 2.13.0)"
  CXX_STD="$("$PYTHON" -c "import sys, build_support; print(build_support.cxx_standard(sys.argv[1]))" "$torch_version")"
fi
OUT_DIR="$(mktemp -d)"
trap 'rm -rf "$OUT_DIR"' EXIT
shopt -s nullglob
sources=(csrc/cuda/*.cu)
if [ ${#sources[@]} -eq 0 ]; then
  echo "compile_cuda.sh: no csrc/cuda/*.cu files" >&2
  exit 1
fi
for source in "${sources[@]}"; do
  echo "nvcc -std=$CXX_STD: $source"
  "$NVCC" -c -std="$CXX_STD" -O3 -Werror all-warnings \
    -gencode arch=compute_80,code=sm_80 -gencode arch=compute_90,code=sm_90 \
    -o "$OUT_DIR/$(basename "$source" .cu).o" "$source"
done
echo "compile_cuda.sh: ${#sources[@]} CUDA source(s) compiled for sm_80 and sm_90 (-std=$CXX_STD)"
