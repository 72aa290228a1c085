// Inner loop of the CPU layer_norm op, on raw pointers only. layer_norm_cpu.cpp includes this file twice: in
// namespace `norm_base` (the build's baseline ISA, scalar loops) and, on x86-64 GCC, in namespace `norm_avx512`
// inside `#pragma GCC target("avx512f,avx512bw,avx512vl,fma")` with SEGFORMER_FAST_NORM_AVX512 defined. Do not include
// other headers here but avx512_io.h (<immintrin.h>, <cmath> and c10's BFloat16 come first in the .cpp).
//
// Every row is normalized on its own: mean, then the variance as the mean of squared deviations (two passes over
// the row, which stays in L1), both in fp32, then y = (x - mean) * rstd * weight + bias stored in the row's dtype. weight and bias come in fp32 (converted
// once per call).

#ifdef SEGFORMER_FAST_NORM_AVX512
#include "avx512_io.h"

// rows x (C channels): source and target rows `channels` apart; weight_f and bias_f (C,) already in fp32;
// row_f: C floats of scratch. The row is read once (converted to fp32 into row_f, summed on the way); the variance
// and the normalization read row_f from L1. Full vectors everywhere but a masked tail.
template <typename scalar_t>
inline void normalize_rows(const scalar_t* source, const float* weight_f, const float* bias_f, scalar_t* target,
                           int64_t rows, int64_t channels, float eps, float* row_f) {
  const float inv_channels = 1.0f / static_cast<float>(channels);
  const int64_t full = channels - channels % 16;
  const __mmask16 tail = lanes_of(channels - full);
  for (int64_t r = 0; r < rows; ++r) {
    const scalar_t* x = source + r * channels;
    scalar_t* y = target + r * channels;
    __m512 sum = _mm512_setzero_ps();
    for (int64_t c = 0; c < full; c += 16) {
      const __m512 values = load16(x + c, static_cast<__mmask16>(0xFFFF));
      _mm512_storeu_ps(row_f + c, values);
      sum = _mm512_add_ps(sum, values);
    }
    if (tail) {
      const __m512 values = load16(x + full, tail);
      _mm512_storeu_ps(row_f + full, values);  // row_f has room for the whole last vector
      sum = _mm512_add_ps(sum, values);
    }
    const __m512 mean = _mm512_set1_ps(_mm512_reduce_add_ps(sum) * inv_channels);
    __m512 squares = _mm512_setzero_ps();
    for (int64_t c = 0; c < full; c += 16) {
      const __m512 deviation = _mm512_sub_ps(_mm512_loadu_ps(row_f + c), mean);
      squares = _mm512_fmadd_ps(deviation, deviation, squares);
    }
    if (tail) {
      const __m512 deviation = _mm512_maskz_sub_ps(tail, _mm512_loadu_ps(row_f + full), mean);
      squares = _mm512_fmadd_ps(deviation, deviation, squares);
    }
    const __m512 rstd = _mm512_set1_ps(1.0f / std::sqrt(_mm512_reduce_add_ps(squares) * inv_channels + eps));
    for (int64_t c = 0; c < full; c += 16) {
      const __m512 normalized = _mm512_mul_ps(_mm512_sub_ps(_mm512_loadu_ps(row_f + c), mean), rstd);
      store16(y + c, _mm512_fmadd_ps(normalized, _mm512_loadu_ps(weight_f + c), _mm512_loadu_ps(bias_f + c)),
              static_cast<__mmask16>(0xFFFF));
    }
    if (tail) {
      const __m512 normalized = _mm512_mul_ps(_mm512_sub_ps(_mm512_loadu_ps(row_f + full), mean), rstd);
      store16(y + full,
              _mm512_fmadd_ps(normalized, _mm512_loadu_ps(weight_f + full), _mm512_loadu_ps(bias_f + full)), tail);
    }
  }
}

// Channel-major input (the NCHW patch-embed conv output viewed as tokens): source (C, N) per image, channel c of
// token t at c * num_tokens + t; target rows (tokens, C). Sixteen tokens at a time: their statistics are plain
// vertical sums over the channels (no horizontal reductions), the normalized values go to a (C, 16) fp32 tile,
// which is read back a token at a time (gathers within L1) into the token's output row.
template <typename scalar_t>
inline void normalize_channel_major(const scalar_t* source, int64_t num_tokens, int64_t first_token,
                                    int64_t last_token, const float* weight_f, const float* bias_f, scalar_t* target,
                                    int64_t channels, float eps, float* tile) {
  const __m512 inv_channels = _mm512_set1_ps(1.0f / static_cast<float>(channels));
  const __m512i tile_index = _mm512_mullo_epi32(
      _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0), _mm512_set1_epi32(16));
  for (int64_t t0 = first_token; t0 < last_token; t0 += 16) {
    const __mmask16 lanes = lanes_of(last_token - t0);
    const scalar_t* x = source + t0;
    __m512 sum = _mm512_setzero_ps();
    for (int64_t c = 0; c < channels; ++c) {
      sum = _mm512_add_ps(sum, load16(x + c * num_tokens, lanes));
    }
    const __m512 mean = _mm512_mul_ps(sum, inv_channels);
    __m512 squares = _mm512_setzero_ps();
    for (int64_t c = 0; c < channels; ++c) {
      const __m512 deviation = _mm512_sub_ps(load16(x + c * num_tokens, lanes), mean);
      squares = _mm512_fmadd_ps(deviation, deviation, squares);
    }
    const __m512 variance = _mm512_fmadd_ps(squares, inv_channels, _mm512_set1_ps(eps));
    const __m512 rstd = _mm512_div_ps(_mm512_set1_ps(1.0f), _mm512_sqrt_ps(variance));
    for (int64_t c = 0; c < channels; ++c) {
      const __m512 normalized = _mm512_mul_ps(_mm512_sub_ps(load16(x + c * num_tokens, lanes), mean), rstd);
      _mm512_storeu_ps(tile + c * 16, _mm512_fmadd_ps(normalized, _mm512_set1_ps(weight_f[c]),
                                                      _mm512_set1_ps(bias_f[c])));
    }
    const int64_t tokens = last_token - t0 < 16 ? last_token - t0 : 16;
    for (int64_t i = 0; i < tokens; ++i) {
      scalar_t* y = target + (t0 + i) * channels;
      for (int64_t c = 0; c < channels; c += 16) {
        const __mmask16 channel_lanes = lanes_of(channels - c);
        const __m512i index = _mm512_add_epi32(tile_index, _mm512_set1_epi32(static_cast<int32_t>(c * 16 + i)));
        store16(y + c, _mm512_mask_i32gather_ps(_mm512_setzero_ps(), channel_lanes, index, tile, 4), channel_lanes);
      }
    }
  }
}

#else

template <typename scalar_t>
inline void normalize_rows(const scalar_t* source, const float* weight_f, const float* bias_f, scalar_t* target,
                           int64_t rows, int64_t channels, float eps, float* row_f) {
  (void)row_f;
  const float inv_channels = 1.0f / static_cast<float>(channels);
  for (int64_t r = 0; r < rows; ++r) {
    const scalar_t* x = source + r * channels;
    scalar_t* y = target + r * channels;
    float sum = 0.0f;
    for (int64_t c = 0; c < channels; ++c) {
      sum += static_cast<float>(x[c]);
    }
    const float mean = sum * inv_channels;
    float squares = 0.0f;
    for (int64_t c = 0; c < channels; ++c) {
      const float deviation = static_cast<float>(x[c]) - mean;
      squares += deviation * deviation;
    }
    const float rstd = 1.0f / std::sqrt(squares * inv_channels + eps);
    for (int64_t c = 0; c < channels; ++c) {
      const float normalized = (static_cast<float>(x[c]) - mean) * rstd;
      y[c] = static_cast<scalar_t>(normalized * weight_f[c] + bias_f[c]);
    }
  }
}

template <typename scalar_t>
inline void normalize_channel_major(const scalar_t* source, int64_t num_tokens, int64_t first_token,
                                    int64_t last_token, const float* weight_f, const float* bias_f, scalar_t* target,
                                    int64_t channels, float eps, float* tile) {
  (void)tile;
  const float inv_channels = 1.0f / static_cast<float>(channels);
  for (int64_t t = first_token; t < last_token; ++t) {
    float sum = 0.0f;
    for (int64_t c = 0; c < channels; ++c) {
      sum += static_cast<float>(source[c * num_tokens + t]);
    }
    const float mean = sum * inv_channels;
    float squares = 0.0f;
    for (int64_t c = 0; c < channels; ++c) {
      const float deviation = static_cast<float>(source[c * num_tokens + t]) - mean;
      squares += deviation * deviation;
    }
    const float rstd = 1.0f / std::sqrt(squares * inv_channels + eps);
    for (int64_t c = 0; c < channels; ++c) {
      const float normalized = (static_cast<float>(source[c * num_tokens + t]) - mean) * rstd;
      target[t * channels + c] = static_cast<scalar_t>(normalized * weight_f[c] + bias_f[c]);
    }
  }
}

#endif
