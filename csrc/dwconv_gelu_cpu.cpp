// CPU implementation of segformer_fast::dwconv_gelu: Mix-FFN's depthwise 3x3 conv (padding 1) + bias + exact GELU
// in one pass over channels-last tokens.
//
// Per task, a range of output rows: each output row is accumulated in fp32 from the three input rows around it
// (the (W, C) row is a few KiB to a few hundred KiB, so the taps are re-read from cache), then GELU is applied and
// the row is stored once in the tokens' dtype. Eager PyTorch instead writes the conv output (a permuted NCHW view),
// reads it back for GELU and writes again, and rounds the conv output to bf16 / fp16 before GELU.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <cmath>
#include <cstdlib>
#include <string>
#include <cstdint>
#include <type_traits>
#include <vector>

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#include <immintrin.h>
#define SEGFORMER_FAST_AVX512_DISPATCH 1
#endif

namespace segformer_fast {
namespace dwconv_base {
#include "dwconv_gelu_cpu_kernels.h"
}  // namespace dwconv_base

#ifdef SEGFORMER_FAST_AVX512_DISPATCH
#pragma GCC push_options
#pragma GCC target("avx512f,fma")
#define SEGFORMER_FAST_GELU_AVX512 1
namespace dwconv_avx512 {
#include "dwconv_gelu_cpu_kernels.h"
}  // namespace dwconv_avx512
#undef SEGFORMER_FAST_GELU_AVX512
#pragma GCC pop_options
#endif

namespace {

bool baseline_forced() {
  const char* value = std::getenv("SEGFORMER_FAST_CPU_BASELINE");
  return value != nullptr && std::string(value) == "1";
}

bool use_avx512() {
#ifdef SEGFORMER_FAST_AVX512_DISPATCH
  // SEGFORMER_FAST_CPU_BASELINE=1 keeps the baseline loops (read once; the tests compare both paths)
  static const bool supported = !baseline_forced() && __builtin_cpu_supports("avx512f") &&
                                __builtin_cpu_supports("fma");
  return supported;
#else
  return false;
#endif
}

void check_dwconv_gelu_inputs(const at::Tensor& tokens, int64_t height, int64_t width, const at::Tensor& weight,
                              const at::Tensor& bias) {
  TORCH_CHECK(tokens.dim() == 3, "dwconv_gelu: tokens must be 3-D (B, H*W, C), got a ", tokens.dim(),
              "-D tensor of shape ", tokens.sizes());
  TORCH_CHECK(height > 0 && width > 0, "dwconv_gelu: height and width must be positive, got (", height, ", ", width,
              ")");
  TORCH_CHECK(tokens.size(1) == height * width, "dwconv_gelu: tokens have ", tokens.size(1), " tokens but the grid is ",
              height, " x ", width, " = ", height * width);
  const int64_t channels = tokens.size(2);
  TORCH_CHECK(weight.dim() == 4 && weight.size(0) == channels && weight.size(1) == 1 && weight.size(2) == 3 &&
                  weight.size(3) == 3,
              "dwconv_gelu: weight must have shape (C, 1, 3, 3) = (", channels, ", 1, 3, 3), got ", weight.sizes());
  TORCH_CHECK(bias.dim() == 1 && bias.size(0) == channels, "dwconv_gelu: bias must have shape (C,) = (", channels,
              ",), got ", bias.sizes());
  const auto dtype = tokens.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16,
              "dwconv_gelu: expected float32, float16 or bfloat16 tokens, got ", dtype);
  TORCH_CHECK(weight.scalar_type() == dtype && bias.scalar_type() == dtype, "dwconv_gelu: dtype mismatch: tokens are ",
              dtype, ", weight ", weight.scalar_type(), ", bias ", bias.scalar_type());
  TORCH_CHECK(tokens.device().is_cpu() && weight.device().is_cpu() && bias.device().is_cpu(),
              "dwconv_gelu (CPU kernel): expected CPU tensors, got tokens on ", tokens.device(), ", weight on ",
              weight.device(), ", bias on ", bias.device());
  TORCH_CHECK(tokens.is_contiguous(), "dwconv_gelu: tokens must be contiguous (B, H*W, C), got strides ",
              tokens.strides(), " for shape ", tokens.sizes(), "; call .contiguous()");
}

template <typename scalar_t>
void dwconv_gelu_kernel(const at::Tensor& tokens, int64_t height, int64_t width, const at::Tensor& weight,
                        const at::Tensor& bias, at::Tensor& out) {
  const int64_t channels = tokens.size(2);
  const int64_t rows = tokens.size(0) * height;
  // taps (9, C) in fp32: tap-major, so the inner loop over channels reads contiguous weights
  const at::Tensor taps = weight.to(at::kFloat).reshape({channels, 9}).t().contiguous();
  const at::Tensor bias_f = bias.to(at::kFloat).contiguous();
  const float* taps_ptr = taps.data_ptr<float>();
  const float* bias_ptr = bias_f.data_ptr<float>();
  const scalar_t* in_ptr = tokens.data_ptr<scalar_t>();
  scalar_t* out_ptr = out.data_ptr<scalar_t>();
  const bool avx512 = use_avx512();
  const int64_t row_size = width * channels;
  // grain: about 32 Ki outputs per task, at least one row
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 15) / row_size);
  at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
    std::vector<float> scratch(std::is_same_v<scalar_t, float> ? 0 : 4 * row_size);
#ifdef SEGFORMER_FAST_AVX512_DISPATCH
    if (avx512) {
      dwconv_avx512::dwconv_gelu_rows<scalar_t>(in_ptr, taps_ptr, bias_ptr, out_ptr, height, width, channels, begin,
                                                end, scratch.data());
      return;
    }
#endif
    dwconv_base::dwconv_gelu_rows<scalar_t>(in_ptr, taps_ptr, bias_ptr, out_ptr, height, width, channels, begin, end,
                                            scratch.data());
  });
  (void)avx512;
}

at::Tensor dwconv_gelu_cpu(const at::Tensor& tokens, int64_t height, int64_t width, const at::Tensor& weight,
                           const at::Tensor& bias) {
  check_dwconv_gelu_inputs(tokens, height, width, weight, bias);
  auto out = at::empty_like(tokens);
  if (out.numel() == 0) {
    return out;
  }
  switch (tokens.scalar_type()) {
    case at::kFloat:
      dwconv_gelu_kernel<float>(tokens, height, width, weight, bias, out);
      break;
    case at::kBFloat16:
      dwconv_gelu_kernel<c10::BFloat16>(tokens, height, width, weight, bias, out);
      break;
    default:
      dwconv_gelu_kernel<c10::Half>(tokens, height, width, weight, bias, out);
      break;
  }
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(segformer_fast, CPU, m) {
  m.impl("dwconv_gelu", &dwconv_gelu_cpu);
}

}  // namespace segformer_fast
