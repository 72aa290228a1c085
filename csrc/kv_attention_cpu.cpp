// CPU implementation of segformer_fast::kv_attention: softmax(q kᵀ) v per head for the merged k/v of spatial-
// reduction attention, the (N, Nkv) score matrix never written to memory.
//
// q (B, N, C) is already projected and scaled; kv (B, Nkv, 2C) = [k | v]; heads split C head-major. k and v are
// packed once per call to fp32 k_t (B, heads, d, Nkv) and v (B, heads, Nkv, d); then each task takes a block of
// query rows of one (image, head): scores into a thread-local fp32 buffer (rows x Nkv, at most 32 rows), softmax in
// place, the product with v scaled by the inverse row sum, stored in the tokens' dtype. Against the eager path (two
// oneDNN GEMMs and ATen's softmax per head) it saves writing and re-reading the scores and the per-head copies.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <string>
#include <vector>

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#include <immintrin.h>
#define SEGFORMER_FAST_ATTENTION_DISPATCH 1
#endif

namespace segformer_fast {
namespace attention_base {
#include "kv_attention_cpu_kernels.h"
}  // namespace attention_base

#ifdef SEGFORMER_FAST_ATTENTION_DISPATCH
#pragma GCC push_options
#pragma GCC target("avx512f,fma")
#define SEGFORMER_FAST_ATTENTION_AVX512 1
namespace attention_avx512 {
#include "kv_attention_cpu_kernels.h"
}  // namespace attention_avx512
#undef SEGFORMER_FAST_ATTENTION_AVX512
#pragma GCC pop_options
#endif

namespace {

bool use_avx512() {
#ifdef SEGFORMER_FAST_ATTENTION_DISPATCH
  // SEGFORMER_FAST_CPU_BASELINE=1 keeps the baseline loops (read once; the tests compare both paths)
  static const bool supported = [] {
    const char* baseline = std::getenv("SEGFORMER_FAST_CPU_BASELINE");
    const bool forced = baseline != nullptr && std::string(baseline) == "1";
    return !forced && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("fma");
  }();
  return supported;
#else
  return false;
#endif
}

void check_kv_attention_inputs(const at::Tensor& q, const at::Tensor& kv, int64_t heads) {
  TORCH_CHECK(q.dim() == 3, "kv_attention: q must be 3-D (B, N, C), got a ", q.dim(), "-D tensor of shape ",
              q.sizes());
  TORCH_CHECK(kv.dim() == 3, "kv_attention: kv must be 3-D (B, Nkv, 2C), got a ", kv.dim(), "-D tensor of shape ",
              kv.sizes());
  const int64_t channels = q.size(2);
  TORCH_CHECK(kv.size(0) == q.size(0) && kv.size(2) == 2 * channels, "kv_attention: kv must have shape (B, Nkv, 2C) = (",
              q.size(0), ", Nkv, ", 2 * channels, ") for q of shape ", q.sizes(), ", got ", kv.sizes());
  TORCH_CHECK(kv.size(1) >= 1, "kv_attention: kv must have at least one token, got shape ", kv.sizes());
  TORCH_CHECK(heads >= 1 && channels % heads == 0, "kv_attention: heads must divide C = ", channels, ", got ", heads);
  const auto dtype = q.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16,
              "kv_attention: expected float32, float16 or bfloat16 inputs, got ", dtype);
  TORCH_CHECK(kv.scalar_type() == dtype, "kv_attention: dtype mismatch: q is ", dtype, " but kv is ",
              kv.scalar_type());
  TORCH_CHECK(q.device().is_cpu() && kv.device().is_cpu(), "kv_attention (CPU kernel): expected CPU tensors, got q on ",
              q.device(), " and kv on ", kv.device());
  TORCH_CHECK(q.is_contiguous() && kv.is_contiguous(), "kv_attention: q and kv must be contiguous, got strides ",
              q.strides(), " and ", kv.strides(), "; call .contiguous()");
}

template <typename scalar_t>
void kv_attention_kernel(const at::Tensor& q, const at::Tensor& kv, int64_t heads, at::Tensor& out) {
  const int64_t batch = q.size(0), tokens = q.size(1), channels = q.size(2), num_kv = kv.size(1);
  const int64_t d = channels / heads;
  const at::Tensor kv_f = kv.to(at::kFloat);
  // k_t (B, heads, d, Nkv) and v (B, heads, Nkv, d), fp32, contiguous
  const at::Tensor k_t = kv_f.narrow(2, 0, channels).view({batch, num_kv, heads, d}).permute({0, 2, 3, 1}).contiguous();
  const at::Tensor v = kv_f.narrow(2, channels, channels).view({batch, num_kv, heads, d}).permute({0, 2, 1, 3})
                           .contiguous();
  const float* k_t_ptr = k_t.data_ptr<float>();
  const float* v_ptr = v.data_ptr<float>();
  const scalar_t* q_ptr = q.data_ptr<scalar_t>();
  scalar_t* out_ptr = out.data_ptr<scalar_t>();
  const bool avx512 = use_avx512();
  const int64_t kRows = attention_base::kRowBlock;
  const int64_t row_blocks = (tokens + kRows - 1) / kRows;
  at::parallel_for(0, batch * heads * row_blocks, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> q_rows(kRows * d), out_rows(kRows * d), scores(kRows * num_kv);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t image_head = task / row_blocks;
      const int64_t b = image_head / heads, h = image_head % heads;
      const int64_t row_begin = (task % row_blocks) * kRows;
      const int64_t rows = std::min(kRows, tokens - row_begin);
      for (int64_t r = 0; r < rows; ++r) {
        const scalar_t* source = q_ptr + (b * tokens + row_begin + r) * channels + h * d;
        for (int64_t c = 0; c < d; ++c) {
          q_rows[r * d + c] = static_cast<float>(source[c]);
        }
      }
      const float* k_t_head = k_t_ptr + image_head * d * num_kv;
      const float* v_head = v_ptr + image_head * num_kv * d;
#ifdef SEGFORMER_FAST_ATTENTION_DISPATCH
      if (avx512 && attention_avx512::vectorized_head_dim(d)) {
        attention_avx512::attend_block(q_rows.data(), rows, d, k_t_head, v_head, num_kv, scores.data(),
                                       out_rows.data());
      } else {
        attention_base::attend_block(q_rows.data(), rows, d, k_t_head, v_head, num_kv, scores.data(),
                                     out_rows.data());
      }
#else
      attention_base::attend_block(q_rows.data(), rows, d, k_t_head, v_head, num_kv, scores.data(), out_rows.data());
#endif
      for (int64_t r = 0; r < rows; ++r) {
        scalar_t* target = out_ptr + (b * tokens + row_begin + r) * channels + h * d;
        for (int64_t c = 0; c < d; ++c) {
          target[c] = static_cast<scalar_t>(out_rows[r * d + c]);
        }
      }
    }
  });
  (void)avx512;
}

at::Tensor kv_attention_cpu(const at::Tensor& q, const at::Tensor& kv, int64_t heads) {
  check_kv_attention_inputs(q, kv, heads);
  auto out = at::empty_like(q);
  if (out.numel() == 0) {
    return out;
  }
  switch (q.scalar_type()) {
    case at::kFloat:
      kv_attention_kernel<float>(q, kv, heads, out);
      break;
    case at::kBFloat16:
      kv_attention_kernel<c10::BFloat16>(q, kv, heads, out);
      break;
    default:
      kv_attention_kernel<c10::Half>(q, kv, heads, out);
      break;
  }
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(segformer_fast, CPU, m) {
  m.impl("kv_attention", &kv_attention_cpu);
}

}  // namespace segformer_fast
