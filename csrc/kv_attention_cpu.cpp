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
#include <cstring>
#include <vector>

#include "cpu_dispatch.h"

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

// bf16 inputs on a CPU with AVX512-BF16: both products as bf16 pair dot products (vdpbf16ps, fp32 accumulators),
// twice the multiply-adds of fp32 FMAs per instruction. k is packed as k_pairs (d/2, Nkv, 2): the two channels of
// a pair side by side for every key, so one 32-bit lane holds one key's pair; v as v_pairs (Nkv/2, d, 2), two keys
// side by side for every channel. The probabilities are rounded to bf16 for the second product, as eager bf16
// attention rounds them.
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bf16,fma")
namespace attention_bf16 {

using attention_avx512::lanes_of;

inline __m512 pair_dot(__m512 acc, __m512i pairs, __m512i other) {
  return _mm512_dpbf16_ps(acc, reinterpret_cast<__m512bh>(pairs), reinterpret_cast<__m512bh>(other));
}

inline int32_t load_pair(const c10::BFloat16* pair) {
  int32_t bits;
  std::memcpy(&bits, pair, sizeof(bits));
  return bits;
}

// scores[r, :] = q[r, :] kᵀ for kRows query rows (bf16, stride d), 64 keys at a time.
template <int kRows>
inline void score_rows(const c10::BFloat16* q, int64_t d, const c10::BFloat16* k_pairs, int64_t num_kv,
                       float* scores) {
  for (int64_t j = 0; j < num_kv; j += 64) {
    __mmask16 lanes[4];
    for (int c = 0; c < 4; ++c) {
      lanes[c] = j + 16 * c < num_kv ? lanes_of(num_kv - j - 16 * c) : static_cast<__mmask16>(0);
    }
    __m512 acc[kRows][4];
    for (int r = 0; r < kRows; ++r) {
      for (int c = 0; c < 4; ++c) {
        acc[r][c] = _mm512_setzero_ps();
      }
    }
    for (int64_t p = 0; p < d / 2; ++p) {
      __m512i key[4];
      for (int c = 0; c < 4; ++c) {
        key[c] = _mm512_maskz_loadu_epi32(lanes[c], k_pairs + 2 * (p * num_kv + j + 16 * c));
      }
      for (int r = 0; r < kRows; ++r) {
        const __m512i query = _mm512_set1_epi32(load_pair(q + r * d + 2 * p));
        for (int c = 0; c < 4; ++c) {
          acc[r][c] = pair_dot(acc[r][c], query, key[c]);
        }
      }
    }
    for (int r = 0; r < kRows; ++r) {
      for (int c = 0; c < 4; ++c) {
        if (lanes[c]) {
          _mm512_mask_storeu_ps(scores + r * num_kv + j + 16 * c, lanes[c], acc[r][c]);
        }
      }
    }
  }
}

// out[r, :] = (probabilities[r, :] v) * inv_sum[r] for kRows rows; probabilities bf16 with stride num_pairs * 2
// (a zero after an odd last key), d = 16 * kVectors.
template <int kRows, int kVectors>
inline void value_rows(const c10::BFloat16* probabilities, int64_t num_pairs, const c10::BFloat16* v_pairs,
                       int64_t d, const float* inv_sum, float* out) {
  __m512 acc[kRows][kVectors];
  for (int r = 0; r < kRows; ++r) {
    for (int c = 0; c < kVectors; ++c) {
      acc[r][c] = _mm512_setzero_ps();
    }
  }
  for (int64_t t = 0; t < num_pairs; ++t) {
    __m512i value[kVectors];
    for (int c = 0; c < kVectors; ++c) {
      value[c] = _mm512_loadu_si512(v_pairs + 2 * (t * d + 16 * c));
    }
    for (int r = 0; r < kRows; ++r) {
      const __m512i p = _mm512_set1_epi32(load_pair(probabilities + r * 2 * num_pairs + 2 * t));
      for (int c = 0; c < kVectors; ++c) {
        acc[r][c] = pair_dot(acc[r][c], p, value[c]);
      }
    }
  }
  for (int r = 0; r < kRows; ++r) {
    const __m512 scale = _mm512_set1_ps(inv_sum[r]);
    for (int c = 0; c < kVectors; ++c) {
      _mm512_storeu_ps(out + r * d + 16 * c, _mm512_mul_ps(acc[r][c], scale));
    }
  }
}

template <int kVectors>
inline void value_block(const c10::BFloat16* probabilities, int64_t rows, int64_t num_pairs,
                        const c10::BFloat16* v_pairs, int64_t d, const float* inv_sum, float* out) {
  constexpr int kBlockRows = kVectors <= 2 ? 8 : 4;
  int64_t r = 0;
  for (; r + kBlockRows <= rows; r += kBlockRows) {
    value_rows<kBlockRows, kVectors>(probabilities + r * 2 * num_pairs, num_pairs, v_pairs, d, inv_sum + r,
                                     out + r * d);
  }
  for (; r < rows; ++r) {
    value_rows<1, kVectors>(probabilities + r * 2 * num_pairs, num_pairs, v_pairs, d, inv_sum + r, out + r * d);
  }
}

// One row block: q_rows (rows, d) bf16 -> out_rows (rows, d) fp32. scores: rows * num_kv floats; probabilities:
// rows * 2 * num_pairs bf16.
inline void attend_block(const c10::BFloat16* q_rows, int64_t rows, int64_t d, const c10::BFloat16* k_pairs,
                         const c10::BFloat16* v_pairs, int64_t num_kv, float* scores,
                         c10::BFloat16* probabilities, float* out_rows) {
  const int64_t num_pairs = (num_kv + 1) / 2;
  float inv_sum[attention_avx512::kRowBlock];
  int64_t r = 0;
  for (; r + 4 <= rows; r += 4) {
    score_rows<4>(q_rows + r * d, d, k_pairs, num_kv, scores + r * num_kv);
  }
  for (; r < rows; ++r) {
    score_rows<1>(q_rows + r * d, d, k_pairs, num_kv, scores + r * num_kv);
  }
  for (r = 0; r < rows; ++r) {
    float* row = scores + r * num_kv;
    inv_sum[r] = 1.0f / attention_avx512::softmax_numerators(row, num_kv);
    c10::BFloat16* rounded = probabilities + r * 2 * num_pairs;
    int64_t j = 0;
    for (; j + 16 <= num_kv; j += 16) {
      const __m256bh packed = _mm512_cvtneps_pbh(_mm512_loadu_ps(row + j));
      std::memcpy(rounded + j, &packed, sizeof(packed));
    }
    for (; j < 2 * num_pairs; ++j) {
      rounded[j] = j < num_kv ? c10::BFloat16(row[j]) : c10::BFloat16(0.0f);
    }
  }
  switch (d / 16) {
    case 1:
      value_block<1>(probabilities, rows, num_pairs, v_pairs, d, inv_sum, out_rows);
      break;
    case 2:
      value_block<2>(probabilities, rows, num_pairs, v_pairs, d, inv_sum, out_rows);
      break;
    case 3:
      value_block<3>(probabilities, rows, num_pairs, v_pairs, d, inv_sum, out_rows);
      break;
    default:
      value_block<4>(probabilities, rows, num_pairs, v_pairs, d, inv_sum, out_rows);
      break;
  }
}

}  // namespace attention_bf16
#pragma GCC pop_options
#endif

namespace {

bool use_avx512() {
#ifdef SEGFORMER_FAST_ATTENTION_DISPATCH
  static const bool supported =
      !cpu_baseline_forced() && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("fma");
  return supported;
#else
  return false;
#endif
}

// One task of the parallel loop: a block of at most kRowBlock query rows of one (image, head).
struct RowBlock {
  int64_t image_head;      // b * heads + h: the index of the packed k / v of this (image, head)
  int64_t first_token;     // b * N + the block's first row: q and out rows are first_token + r
  int64_t first_channel;   // h * d: the head's channels in q and out
  int64_t rows;
};

RowBlock row_block(int64_t task, int64_t row_blocks, int64_t heads, int64_t tokens, int64_t head_dim) {
  const int64_t image_head = task / row_blocks;
  const int64_t row_begin = (task % row_blocks) * attention_base::kRowBlock;
  return {image_head, (image_head / heads) * tokens + row_begin, (image_head % heads) * head_dim,
          std::min(attention_base::kRowBlock, tokens - row_begin)};
}

// The bf16 pair-dot-product path: bf16 inputs, AVX512-BF16, head size a multiple of 16 up to 64.
bool use_bf16_pairs(at::ScalarType dtype, int64_t head_dim) {
#ifdef SEGFORMER_FAST_ATTENTION_DISPATCH
  static const bool supported = use_avx512() && __builtin_cpu_supports("avx512bf16");
  return supported && dtype == at::kBFloat16 && head_dim % 16 == 0 && head_dim <= 64;
#else
  (void)dtype;
  (void)head_dim;
  return false;
#endif
}

#ifdef SEGFORMER_FAST_ATTENTION_DISPATCH
void kv_attention_bf16_pairs(const at::Tensor& q, const at::Tensor& kv, int64_t heads, at::Tensor& out) {
  const int64_t batch = q.size(0), tokens = q.size(1), channels = q.size(2), num_kv = kv.size(1);
  const int64_t d = channels / heads;
  const int64_t num_pairs = (num_kv + 1) / 2;
  // k_pairs (B, heads, d/2, Nkv, 2); v_pairs (B, heads, Nkv/2, d, 2) over v padded with a zero key to even Nkv
  const at::Tensor k = kv.narrow(2, 0, channels).view({batch, num_kv, heads, d / 2, 2});
  const at::Tensor k_pairs = k.permute({0, 2, 3, 1, 4}).contiguous();
  at::Tensor v = kv.narrow(2, channels, channels);
  if (num_kv % 2) {
    v = at::cat({v, at::zeros({batch, 1, channels}, v.options())}, 1);
  }
  const at::Tensor v_pairs = v.reshape({batch, num_pairs, 2, heads, d}).permute({0, 3, 1, 4, 2}).contiguous();
  const auto* q_ptr = q.data_ptr<c10::BFloat16>();
  const auto* k_ptr = k_pairs.data_ptr<c10::BFloat16>();
  const auto* v_ptr = v_pairs.data_ptr<c10::BFloat16>();
  auto* out_ptr = out.data_ptr<c10::BFloat16>();
  const int64_t kRows = attention_avx512::kRowBlock;
  const int64_t row_blocks = (tokens + kRows - 1) / kRows;
  at::parallel_for(0, batch * heads * row_blocks, 1, [&](int64_t begin, int64_t end) {
    std::vector<c10::BFloat16> q_rows(kRows * d), probabilities(kRows * 2 * num_pairs);
    std::vector<float> out_rows(kRows * d), scores(kRows * num_kv);
    for (int64_t task = begin; task < end; ++task) {
      const RowBlock block = row_block(task, row_blocks, heads, tokens, d);
      for (int64_t r = 0; r < block.rows; ++r) {
        std::memcpy(q_rows.data() + r * d, q_ptr + (block.first_token + r) * channels + block.first_channel,
                    d * sizeof(c10::BFloat16));
      }
      attention_bf16::attend_block(q_rows.data(), block.rows, d, k_ptr + block.image_head * d * num_kv,
                                   v_ptr + block.image_head * 2 * num_pairs * d, num_kv, scores.data(),
                                   probabilities.data(), out_rows.data());
      for (int64_t r = 0; r < block.rows; ++r) {
        c10::BFloat16* target = out_ptr + (block.first_token + r) * channels + block.first_channel;
        for (int64_t c = 0; c < d; ++c) {
          target[c] = c10::BFloat16(out_rows[r * d + c]);
        }
      }
    }
  });
}
#endif

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
      const RowBlock block = row_block(task, row_blocks, heads, tokens, d);
      const int64_t rows = block.rows;
      for (int64_t r = 0; r < rows; ++r) {
        const scalar_t* source = q_ptr + (block.first_token + r) * channels + block.first_channel;
        for (int64_t c = 0; c < d; ++c) {
          q_rows[r * d + c] = static_cast<float>(source[c]);
        }
      }
      const float* k_t_head = k_t_ptr + block.image_head * d * num_kv;
      const float* v_head = v_ptr + block.image_head * num_kv * d;
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
        scalar_t* target = out_ptr + (block.first_token + r) * channels + block.first_channel;
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
#ifdef SEGFORMER_FAST_ATTENTION_DISPATCH
      if (use_bf16_pairs(q.scalar_type(), q.size(2) / heads)) {
        kv_attention_bf16_pairs(q, kv, heads, out);
        break;
      }
#endif
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
