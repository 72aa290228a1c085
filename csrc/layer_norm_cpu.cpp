// CPU implementation of segformer_fast::layer_norm: LayerNorm over the last dimension of contiguous rows, fp32
// statistics for every dtype. ATen's CPU LayerNorm spends most of its time per row at SegFormer's narrow channel
// counts (C = 32..512; 2-9 GB/s for bf16 rows of 32 to 512 channels on the AMD EPYC we measure on,
// benchmarks/NOTES.md); here a row is a few AVX-512 vectors, normalized in three passes over L1, and rows are split
// across threads in blocks of about 32 Ki elements. A channel-major input (the first patch-embed conv's NCHW output
// viewed as tokens) is normalized as it is, 16 tokens per vector, instead of being transposed by a copy first.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <type_traits>
#include <vector>

#include "cpu_dispatch.h"

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#include <immintrin.h>
#define SEGFORMER_FAST_NORM_DISPATCH 1
#endif

namespace segformer_fast {
namespace norm_base {
#include "layer_norm_cpu_kernels.h"
}  // namespace norm_base

#ifdef SEGFORMER_FAST_NORM_DISPATCH
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,fma")
#define SEGFORMER_FAST_NORM_AVX512 1
namespace norm_avx512 {
#include "layer_norm_cpu_kernels.h"
}  // namespace norm_avx512
#undef SEGFORMER_FAST_NORM_AVX512
#pragma GCC pop_options
#endif

namespace {

constexpr int64_t kElementsPerTask = 32 * 1024;
// Tokens per task of the channel-major path (a multiple of its 16-token tiles).
constexpr int64_t kChannelMajorTokens = 256;

bool use_avx512() {
#ifdef SEGFORMER_FAST_NORM_DISPATCH
  static const bool supported = !cpu_baseline_forced() && __builtin_cpu_supports("avx512f") &&
                                __builtin_cpu_supports("avx512bw") &&
                                __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("fma");
  return supported;
#else
  return false;
#endif
}

// Whether x (B, N, C) is the channel-major view of a contiguous (B, C, N) tensor: the patch-embed conv's NCHW
// output flattened and transposed to tokens.
bool is_channel_major(const at::Tensor& x) {
  return x.dim() == 3 && x.size(1) > 1 && x.size(2) > 1 && x.stride(1) == 1 && x.stride(2) == x.size(1) &&
         (x.size(0) == 1 || x.stride(0) == x.size(1) * x.size(2));
}

void check_layer_norm_inputs(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias) {
  TORCH_CHECK(x.dim() >= 1, "layer_norm: x must have at least one dimension (..., C), got a 0-D tensor");
  const int64_t channels = x.size(-1);
  TORCH_CHECK(channels >= 1, "layer_norm: x must have C >= 1 channels in its last dimension, got shape ", x.sizes());
  const auto dtype = x.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16,
              "layer_norm: expected a float32, float16 or bfloat16 x, got ", dtype);
  TORCH_CHECK(weight.dim() == 1 && weight.size(0) == channels, "layer_norm: weight must have shape (C,) = (",
              channels, ",) for x of shape ", x.sizes(), ", got ", weight.sizes());
  TORCH_CHECK(bias.dim() == 1 && bias.size(0) == channels, "layer_norm: bias must have shape (C,) = (", channels,
              ",) for x of shape ", x.sizes(), ", got ", bias.sizes());
  TORCH_CHECK(weight.scalar_type() == dtype && bias.scalar_type() == dtype, "layer_norm: dtype mismatch: x is ",
              dtype, " but weight is ", weight.scalar_type(), " and bias is ", bias.scalar_type());
  TORCH_CHECK(x.device().is_cpu() && weight.device().is_cpu() && bias.device().is_cpu(),
              "layer_norm (CPU kernel): expected CPU tensors, got x on ", x.device(), ", weight on ", weight.device(),
              " and bias on ", bias.device());
  TORCH_CHECK(x.is_contiguous() || is_channel_major(x), "layer_norm: x must be contiguous, or (B, N, C) with strides "
              "(C*N, 1, N) (a (B, C, N) tensor transposed), got shape ", x.sizes(), " and strides ", x.strides(),
              "; call .contiguous()");
}

template <typename scalar_t>
void layer_norm_kernel(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias, double eps,
                       at::Tensor& out) {
  const int64_t channels = x.size(-1);
  const int64_t rows = x.numel() / channels;
  // weight and bias in fp32, padded with zeros to whole vectors (the AVX-512 tail reads a full last vector)
  const int64_t padded = (channels + 15) / 16 * 16;
  std::vector<float> affine(2 * padded, 0.0f);
  const at::Tensor weight_c = weight.contiguous(), bias_c = bias.contiguous();
  const scalar_t* weight_ptr = weight_c.data_ptr<scalar_t>();
  const scalar_t* bias_ptr = bias_c.data_ptr<scalar_t>();
  for (int64_t c = 0; c < channels; ++c) {
    affine[c] = static_cast<float>(weight_ptr[c]);
    affine[padded + c] = static_cast<float>(bias_ptr[c]);
  }
  const float* weight_f = affine.data();
  const float* bias_f = weight_f + padded;
  const scalar_t* x_ptr = x.data_ptr<scalar_t>();
  scalar_t* out_ptr = out.data_ptr<scalar_t>();
  const float eps_f = static_cast<float>(eps);
  const bool avx512 = use_avx512() && !std::is_same<scalar_t, c10::Half>::value;
  if (is_channel_major(x)) {
    const int64_t tokens = x.size(1);
    const int64_t tiles = (tokens + kChannelMajorTokens - 1) / kChannelMajorTokens;
    at::parallel_for(0, x.size(0) * tiles, 1, [&](int64_t begin, int64_t end) {
      std::vector<float> tile(padded * 16);
      for (int64_t task = begin; task < end; ++task) {
        const int64_t b = task / tiles;
        const int64_t first = (task % tiles) * kChannelMajorTokens;
        const int64_t last = std::min(tokens, first + kChannelMajorTokens);
        const scalar_t* source = x_ptr + b * tokens * channels;
        scalar_t* target = out_ptr + b * tokens * channels;
#ifdef SEGFORMER_FAST_NORM_DISPATCH
        if constexpr (!std::is_same<scalar_t, c10::Half>::value) {
          if (avx512) {
            norm_avx512::normalize_channel_major(source, tokens, first, last, weight_f, bias_f, target, channels,
                                                 eps_f, tile.data());
            continue;
          }
        }
#endif
        norm_base::normalize_channel_major(source, tokens, first, last, weight_f, bias_f, target, channels, eps_f,
                                           tile.data());
      }
    });
    return;
  }
  const int64_t grain = std::max<int64_t>(1, kElementsPerTask / channels);
  at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
    std::vector<float> row_f(padded);
    const int64_t offset = begin * channels;
#ifdef SEGFORMER_FAST_NORM_DISPATCH
    if constexpr (!std::is_same<scalar_t, c10::Half>::value) {
      if (avx512) {
        norm_avx512::normalize_rows(x_ptr + offset, weight_f, bias_f, out_ptr + offset, end - begin, channels, eps_f,
                                    row_f.data());
        return;
      }
    }
#endif
    norm_base::normalize_rows(x_ptr + offset, weight_f, bias_f, out_ptr + offset, end - begin, channels, eps_f,
                              row_f.data());
  });
  (void)avx512;
}

at::Tensor layer_norm_cpu(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias, double eps) {
  check_layer_norm_inputs(x, weight, bias);
  auto out = at::empty(x.sizes(), x.options().memory_format(at::MemoryFormat::Contiguous));
  if (out.numel() == 0) {
    return out;
  }
  switch (x.scalar_type()) {
    case at::kFloat:
      layer_norm_kernel<float>(x, weight, bias, eps, out);
      break;
    case at::kBFloat16:
      layer_norm_kernel<c10::BFloat16>(x, weight, bias, eps, out);
      break;
    default:
      layer_norm_kernel<c10::Half>(x, weight, bias, eps, out);
      break;
  }
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(segformer_fast, CPU, m) {
  m.impl("layer_norm", &layer_norm_cpu);
}

}  // namespace segformer_fast
