// CUDA upsample + argmax: one thread per output pixel loops over the K labels, blending the four source taps with
// PyTorch's CUDA bilinear formula h0 * (w0 * x00 + w1 * x01) + h1 * (w0 * x10 + w1 * x11) in fp32 (fp16 / bf16
// logits are read and interpolated in fp32, never rounded back: the labels are those of
// F.interpolate(logits.float()).argmax(1)) and keeping the first maximum (NaN wins, as torch.argmax). The
// (B, K, H, W) upsampled logits never exist.

#include "../cuda_kernels.h"
#include "common.cuh"

namespace segformer_fast {
namespace cuda {
namespace {

constexpr int THREADS = 256;

template <typename T>
__global__ void __launch_bounds__(THREADS)
    upsample_argmax_kernel(const T* __restrict__ logits, int64_t* __restrict__ labels, int num_labels, int in_h,
                           int in_w, int out_h, int out_w, float scale_h, float scale_w) {
  const int x = blockIdx.x * THREADS + threadIdx.x;
  const int y = blockIdx.y;
  const int64_t b = blockIdx.z;
  if (x >= out_w) return;
  const Taps ty = linear_taps(scale_h, y, in_h);
  const Taps tx = linear_taps(scale_w, x, in_w);
  const int64_t plane = static_cast<int64_t>(in_h) * in_w;
  const T* src = logits + b * num_labels * plane;
  const int o00 = ty.i0 * in_w + tx.i0, o01 = ty.i0 * in_w + tx.i1;
  const int o10 = ty.i1 * in_w + tx.i0, o11 = ty.i1 * in_w + tx.i1;
  float best = 0.0f;
  int best_label = 0;
  for (int k = 0; k < num_labels; ++k) {
    const T* p = src + k * plane;
    const float v = ty.lambda0 * (tx.lambda0 * to_float(p[o00]) + tx.lambda1 * to_float(p[o01])) +
                    ty.lambda1 * (tx.lambda0 * to_float(p[o10]) + tx.lambda1 * to_float(p[o11]));
    if (k == 0 || v > best || (isnan(v) && !isnan(best))) {
      best = v;
      best_label = k;
    }
  }
  labels[(b * out_h + y) * out_w + x] = best_label;
}

template <typename T>
cudaError_t launch(const UpsampleArgmaxArgs& args, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>((args.out_width + THREADS - 1) / THREADS),
                  static_cast<unsigned>(args.out_height), static_cast<unsigned>(args.batch));
  upsample_argmax_kernel<T><<<grid, THREADS, 0, stream>>>(
      static_cast<const T*>(args.logits), args.labels, static_cast<int>(args.num_labels),
      static_cast<int>(args.in_height), static_cast<int>(args.in_width), static_cast<int>(args.out_height),
      static_cast<int>(args.out_width), static_cast<float>(args.in_height) / static_cast<float>(args.out_height),
      static_cast<float>(args.in_width) / static_cast<float>(args.out_width));
  return cudaGetLastError();
}

}  // namespace

cudaError_t upsample_argmax(const UpsampleArgmaxArgs& args, cudaStream_t stream) {
  if (args.batch == 0 || args.out_height == 0 || args.out_width == 0) return cudaSuccess;
  switch (args.dtype) {
    case DType::kFloat32:
      return launch<float>(args, stream);
    case DType::kFloat16:
      return launch<__half>(args, stream);
    default:
      return launch<__nv_bfloat16>(args, stream);
  }
}

}  // namespace cuda
}  // namespace segformer_fast
