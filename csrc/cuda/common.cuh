// Device helpers shared by the decoder kernels: dtype conversion and bilinear source index/weights.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

namespace segformer_fast {
namespace cuda {

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T>
__device__ __forceinline__ T from_float(float v);
template <>
__device__ __forceinline__ float from_float<float>(float v) { return v; }
template <>
__device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

// Bilinear (align_corners=False) source taps along one axis, written like PyTorch's CUDA kernel for
// F.interpolate(size=...): scale = in / out (computed on the host in float), src = max(scale * (o + 0.5) - 0.5, 0),
// i0 = (int) src, i1 = i0 + (i0 < in - 1), lambda1 = src - i0, lambda0 = 1 - lambda1.
struct Taps {
  int i0;
  int i1;
  float lambda0;
  float lambda1;
};

__device__ __forceinline__ Taps linear_taps(float scale, int out_index, int in_size) {
  float src = scale * (out_index + 0.5f) - 0.5f;
  src = src < 0.0f ? 0.0f : src;
  Taps t;
  t.i0 = static_cast<int>(src);
  t.i1 = t.i0 + (t.i0 < in_size - 1 ? 1 : 0);
  t.lambda1 = src - t.i0;
  t.lambda0 = 1.0f - t.lambda1;
  return t;
}

}  // namespace cuda
}  // namespace segformer_fast
