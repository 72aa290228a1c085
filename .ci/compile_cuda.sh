#!/usr/bin/env bash
# Compile every csrc/cuda/*.cu for sm_80 and sm_90 (object files only, into a temp dir) and fail on any error.
# The kernels use raw pointers and cudaStream_t only, so this needs nvcc but neither torch's CUDA headers nor a GPU.
set -euo pipefail
cd "$(dirname "$0")/.."
NVCC="${NVCC:-nvcc}"
command -v "$NVCC" >/dev/null || { echo "compile_cuda.sh: nvcc not found (set NVCC=/path/to/nvcc)" >&2; exit 1; }
OUT_DIR="$(mktemp -d)"
trap 'rm -rf "$OUT_DIR"' EXIT
shopt -s nullglob
sources=(csrc/cuda/*.cu)
if [ ${#sources[@]} -eq 0 ]; then
  echo "compile_cuda.sh: no csrc/cuda/*.cu files" >&2
  exit 1
fi
for source in "${sources[@]}"; do
  echo "nvcc: $source"
  "$NVCC" -c -std=c++17 -O3 -Werror all-warnings \
    -gencode arch=compute_80,code=sm_80 -gencode arch=compute_90,code=sm_90 \
    -o "$OUT_DIR/$(basename "$source" .cu).o" "$source"
done
echo "compile_cuda.sh: ${#sources[@]} CUDA source(s) compiled for sm_80 and sm_90"
