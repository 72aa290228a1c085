// CUDA implementations of the segformer_fast ops: tensor checks, then the raw-pointer kernels of csrc/cuda/*.cu
// on the current stream. Compiled only in CUDA builds (setup.py defines SEGFORMER_FAST_WITH_CUDA).
#ifdef SEGFORMER_FAST_WITH_CUDA

#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <array>

#include "checks.h"
#include "cuda_kernels.h"

namespace segformer_fast {
namespace {

cuda::DType to_kernel_dtype(at::ScalarType dtype) {
  switch (dtype) {
    case at::kFloat:
      return cuda::DType::kFloat32;
    case at::kHalf:
      return cuda::DType::kFloat16;
    default:
      return cuda::DType::kBFloat16;
  }
}

constexpr int64_t MAX_INT = 2147483647;
constexpr int64_t MAX_GRID_YZ = 65535;

at::Tensor fused_decode_cuda(const at::Tensor& p1, const at::Tensor& p2, const at::Tensor& p3, const at::Tensor& p4,
                             const at::Tensor& bias, const at::Tensor& cls_weight, const at::Tensor& cls_bias) {
  const std::array<const at::Tensor*, 4> maps = {&p1, &p2, &p3, &p4};
  check_fused_decode_inputs(maps, bias, cls_weight, cls_bias);
  TORCH_CHECK(p1.is_cuda(), "fused_decode (CUDA kernel): expected CUDA tensors, got p1 on ", p1.device());
  const c10::cuda::CUDAGuard guard(p1.device());
  const int64_t batch = p1.size(0), num_labels = cls_weight.size(0);
  TORCH_CHECK(batch <= MAX_GRID_YZ, "fused_decode (CUDA kernel): batch must be <= ", MAX_GRID_YZ, ", got ", batch);
  auto out = at::empty({batch, num_labels, p1.size(1), p1.size(2)}, p1.options());
  cuda::FusedDecodeArgs args{};
  for (int s = 0; s < 4; ++s) {
    TORCH_CHECK(maps[s]->size(1) * maps[s]->size(2) <= MAX_INT, "fused_decode (CUDA kernel): p", s + 1,
                " has too many pixels per image: shape ", maps[s]->sizes());
    args.maps[s] = maps[s]->data_ptr();
    args.heights[s] = maps[s]->size(1);
    args.widths[s] = maps[s]->size(2);
  }
  args.bias = bias.data_ptr();
  args.cls_weight = cls_weight.data_ptr();
  args.cls_bias = cls_bias.data_ptr();
  args.logits = out.data_ptr();
  args.batch = batch;
  args.dim = p1.size(3);
  args.num_labels = num_labels;
  args.dtype = to_kernel_dtype(p1.scalar_type());
  const cudaError_t status = cuda::fused_decode(args, c10::cuda::getCurrentCUDAStream());
  TORCH_CHECK(status != cudaErrorInvalidValue, "fused_decode (CUDA kernel): decoder dim D=", args.dim,
              " in ", p1.scalar_type(), " needs more shared memory per block than this GPU allows");
  TORCH_CHECK(status == cudaSuccess, "fused_decode (CUDA kernel): launch failed: ", cudaGetErrorString(status));
  return out;
}

at::Tensor upsample_argmax_cuda(const at::Tensor& logits, int64_t height, int64_t width) {
  check_upsample_argmax_inputs(logits, height, width);
  TORCH_CHECK(logits.is_cuda(), "upsample_argmax (CUDA kernel): expected a CUDA tensor, got logits on ",
              logits.device());
  TORCH_CHECK(height <= MAX_GRID_YZ && logits.size(0) <= MAX_GRID_YZ,
              "upsample_argmax (CUDA kernel): output height and batch must be <= ", MAX_GRID_YZ, ", got height ",
              height, " and batch ", logits.size(0));
  TORCH_CHECK(logits.size(2) * logits.size(3) <= MAX_INT && width <= MAX_INT,
              "upsample_argmax (CUDA kernel): logits too large per channel: ", logits.sizes());
  const c10::cuda::CUDAGuard guard(logits.device());
  auto labels = at::empty({logits.size(0), height, width}, logits.options().dtype(at::kLong));
  cuda::UpsampleArgmaxArgs args{};
  args.logits = logits.data_ptr();
  args.labels = labels.data_ptr<int64_t>();
  args.batch = logits.size(0);
  args.num_labels = logits.size(1);
  args.in_height = logits.size(2);
  args.in_width = logits.size(3);
  args.out_height = height;
  args.out_width = width;
  args.dtype = to_kernel_dtype(logits.scalar_type());
  const cudaError_t status = cuda::upsample_argmax(args, c10::cuda::getCurrentCUDAStream());
  TORCH_CHECK(status == cudaSuccess, "upsample_argmax (CUDA kernel): launch failed: ", cudaGetErrorString(status));
  return labels;
}

}  // namespace

TORCH_LIBRARY_IMPL(segformer_fast, CUDA, m) {
  m.impl("fused_decode", &fused_decode_cuda);
  m.impl("upsample_argmax", &upsample_argmax_cuda);
}

}  // namespace segformer_fast

#endif  // SEGFORMER_FAST_WITH_CUDA
