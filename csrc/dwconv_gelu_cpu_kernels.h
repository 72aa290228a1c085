// Inner loops of the CPU dwconv_gelu op, on raw pointers only. dwconv_gelu_cpu.cpp includes this file twice: once
// in namespace `dwconv_base` (the build's baseline ISA; GELU through std::erf) and, on x86-64 GCC, once in
// namespace `dwconv_avx512` inside `#pragma GCC target("avx512f,fma")` with SEGFORMER_FAST_GELU_AVX512 defined,
// where GELU runs 16 lanes at a time (the pragma does not define __AVX512F__ itself). Do not include other headers here (<immintrin.h> and <cmath> come first in the .cpp).
//
// Layout: tokens (B, H, W, C) channels-last, i.e. (B, H*W, C) row-major; taps (9, C) fp32, tap (dy, dx) at row
// dy * 3 + dx; the conv has padding 1, so out-of-image taps contribute nothing.

// acc[x, c] = bias[c] + sum of the in-image taps for one output row; rows[dy] is input row y + dy - 1 as fp32
// (W, C), or nullptr above the first / below the last row.
inline void depthwise_row(const float* const rows[3], const float* taps, const float* bias, int64_t width,
                          int64_t channels, float* acc) {
  for (int64_t x = 0; x < width; ++x) {
    float* out = acc + x * channels;
    for (int64_t c = 0; c < channels; ++c) {
      out[c] = bias[c];
    }
    for (int dy = 0; dy < 3; ++dy) {
      if (rows[dy] == nullptr) {
        continue;
      }
      for (int dx = 0; dx < 3; ++dx) {
        const int64_t source_x = x + dx - 1;
        if (source_x < 0 || source_x >= width) {
          continue;
        }
        const float* in = rows[dy] + source_x * channels;
        const float* w = taps + (dy * 3 + dx) * channels;
        for (int64_t c = 0; c < channels; ++c) {
          out[c] += w[c] * in[c];
        }
      }
    }
  }
}

#ifdef SEGFORMER_FAST_GELU_AVX512
// exp(v) for v <= 0, 16 lanes: 2^n * e^r with n = round(v log2 e), r = v - n ln 2 (two-part ln 2), e^r by its
// degree-6 Taylor polynomial (|r| <= 0.35: relative error below 2e-7), 2^n applied by scalef.
inline __m512 exp_nonpositive(__m512 v) {
  v = _mm512_max_ps(v, _mm512_set1_ps(-87.0f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(v, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693145751953125f), v);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.428606765330187e-06f), r);
  __m512 p = _mm512_set1_ps(1.0f / 720.0f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 120.0f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 24.0f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 6.0f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
  return _mm512_scalef_ps(p, n);
}

// Exact (erf) GELU of 16 lanes: 0.5 x (1 + erf(x / sqrt 2)), erf by Abramowitz & Stegun 7.1.26 (absolute error
// below 1.5e-7): erf(a) = 1 - t (a1 + t (a2 + t (a3 + t (a4 + t a5)))) exp(-a^2), t = 1 / (1 + p a), a = |z|.
// NaN propagates.
inline __m512 gelu16(__m512 x) {
  const __m512 z = _mm512_mul_ps(x, _mm512_set1_ps(0.707106781186547524f));
  // sign handling in integer ops: the float and/or/andnot forms need AVX512DQ
  const __m512i sign_mask = _mm512_set1_epi32(static_cast<int>(0x80000000u));
  const __m512i z_bits = _mm512_castps_si512(z);
  const __m512 a = _mm512_castsi512_ps(_mm512_andnot_si512(sign_mask, z_bits));
  const __m512 t = _mm512_div_ps(_mm512_set1_ps(1.0f), _mm512_fmadd_ps(a, _mm512_set1_ps(0.3275911f),
                                                                         _mm512_set1_ps(1.0f)));
  __m512 poly = _mm512_set1_ps(1.061405429f);
  poly = _mm512_fmadd_ps(poly, t, _mm512_set1_ps(-1.453152027f));
  poly = _mm512_fmadd_ps(poly, t, _mm512_set1_ps(1.421413741f));
  poly = _mm512_fmadd_ps(poly, t, _mm512_set1_ps(-0.284496736f));
  poly = _mm512_fmadd_ps(poly, t, _mm512_set1_ps(0.254829592f));
  poly = _mm512_mul_ps(poly, t);
  const __m512 erf_abs = _mm512_fnmadd_ps(poly, exp_nonpositive(_mm512_mul_ps(_mm512_sub_ps(_mm512_setzero_ps(), a),
                                                                              a)),
                                          _mm512_set1_ps(1.0f));
  const __m512 erf_z = _mm512_castsi512_ps(  // erf is odd
      _mm512_or_si512(_mm512_castps_si512(erf_abs), _mm512_and_si512(sign_mask, z_bits)));
  return _mm512_mul_ps(_mm512_mul_ps(x, _mm512_set1_ps(0.5f)), _mm512_add_ps(erf_z, _mm512_set1_ps(1.0f)));
}

// The nine taps of one 16-channel block at output column x, added to acc (columns outside the row skipped).
inline __m512 depthwise_taps16(const float* const rows[3], const float* taps, int64_t width, int64_t channels,
                               int64_t x, int64_t c, __mmask16 lanes, __m512 acc) {
  for (int dy = 0; dy < 3; ++dy) {
    if (rows[dy] == nullptr) {
      continue;
    }
    for (int dx = 0; dx < 3; ++dx) {
      const int64_t source_x = x + dx - 1;
      if (source_x < 0 || source_x >= width) {
        continue;
      }
      acc = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(lanes, taps + (dy * 3 + dx) * channels + c),
                            _mm512_maskz_loadu_ps(lanes, rows[dy] + source_x * channels + c), acc);
    }
  }
  return acc;
}

// One output row, 16 contiguous channels at a time (x outer, channels inner: every access is sequential): the
// nine taps accumulate in a register from the bias, GELU is applied there, and the output is stored once.
inline void depthwise_gelu_row(const float* const rows[3], const float* taps, const float* bias, int64_t width,
                               int64_t channels, float* out) {
  for (int64_t x = 0; x < width; ++x) {
    for (int64_t c = 0; c < channels; c += 16) {
      const __mmask16 lanes = channels - c >= 16 ? static_cast<__mmask16>(0xFFFF)
                                                 : static_cast<__mmask16>((1u << (channels - c)) - 1u);
      const __m512 acc = depthwise_taps16(rows, taps, width, channels, x, c, lanes,
                                          _mm512_maskz_loadu_ps(lanes, bias + c));
      _mm512_mask_storeu_ps(out + x * channels + c, lanes, gelu16(acc));
    }
  }
}
#else
inline void depthwise_gelu_row(const float* const rows[3], const float* taps, const float* bias, int64_t width,
                               int64_t channels, float* out) {
  depthwise_row(rows, taps, bias, width, channels, out);
  for (int64_t i = 0; i < width * channels; ++i) {
    out[i] = 0.5f * out[i] * (1.0f + std::erf(out[i] * 0.707106781186547524f));
  }
}
#endif

// Output rows [row_begin, row_end) of the flattened (B * H) row index. scratch: 4 * W * C floats (three fp32
// input rows for non-fp32 inputs, one accumulator row).
template <typename scalar_t>
void dwconv_gelu_rows(const scalar_t* tokens, const float* taps, const float* bias, scalar_t* out, int64_t height,
                      int64_t width, int64_t channels, int64_t row_begin, int64_t row_end, float* scratch) {
  const int64_t row_size = width * channels;
  for (int64_t row = row_begin; row < row_end; ++row) {
    const int64_t y = row % height;
    const float* rows[3];
    for (int dy = 0; dy < 3; ++dy) {
      const int64_t source_y = y + dy - 1;
      if (source_y < 0 || source_y >= height) {
        rows[dy] = nullptr;
        continue;
      }
      const scalar_t* source = tokens + (row + dy - 1) * row_size;
      if constexpr (std::is_same_v<scalar_t, float>) {
        rows[dy] = reinterpret_cast<const float*>(source);
      } else {
        float* converted = scratch + dy * row_size;
        for (int64_t i = 0; i < row_size; ++i) {
          converted[i] = static_cast<float>(source[i]);
        }
        rows[dy] = converted;
      }
    }
    scalar_t* out_row = out + row * row_size;
    float* acc = nullptr;
    if constexpr (std::is_same_v<scalar_t, float>) {
      acc = reinterpret_cast<float*>(out_row);
    } else {
      acc = scratch + 3 * row_size;
    }
    depthwise_gelu_row(rows, taps, bias, width, channels, acc);
    if constexpr (!std::is_same_v<scalar_t, float>) {
      for (int64_t i = 0; i < row_size; ++i) {
        out_row[i] = static_cast<scalar_t>(acc[i]);
      }
    }
  }
}
