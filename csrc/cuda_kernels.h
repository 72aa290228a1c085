// Plain C++ entry points of the CUDA kernels in csrc/cuda/*.cu (no ATen types, so the .cu files build without
// the torch headers). The launcher (cuda_launch.cpp) checks the tensors and fills these argument structs.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

namespace segformer_fast {
namespace cuda {

enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

// maps[i]: (batch, heights[i], widths[i], dim) contiguous; bias: (dim,); cls_weight: (num_labels, dim);
// cls_bias: (num_labels,); logits: (batch, num_labels, heights[0], widths[0]) contiguous; all of `dtype`.
struct FusedDecodeArgs {
  const void* maps[4];
  int64_t heights[4];
  int64_t widths[4];
  const void* bias;
  const void* cls_weight;
  const void* cls_bias;
  void* logits;
  int64_t batch;
  int64_t dim;
  int64_t num_labels;
  DType dtype;
};

// Launches on `stream` and returns the launch status: cudaErrorInvalidValue when `dim` needs more shared memory
// than the current device allows a block (dim <= 768 fits sm_80 and sm_90).
cudaError_t fused_decode(const FusedDecodeArgs& args, cudaStream_t stream);

// logits: (batch, num_labels, in_height, in_width) contiguous of `dtype`; labels: (batch, out_height, out_width).
struct UpsampleArgmaxArgs {
  const void* logits;
  int64_t* labels;
  int64_t batch;
  int64_t num_labels;
  int64_t in_height;
  int64_t in_width;
  int64_t out_height;
  int64_t out_width;
  DType dtype;
};

cudaError_t upsample_argmax(const UpsampleArgmaxArgs& args, cudaStream_t stream);

}  // namespace cuda
}  // namespace segformer_fast
