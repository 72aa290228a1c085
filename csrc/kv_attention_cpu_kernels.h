// Inner loops of the CPU kv_attention op, on raw pointers only. kv_attention_cpu.cpp includes this file twice: in
// namespace `attention_base` (the build's baseline ISA) and, on x86-64 GCC, in namespace `attention_avx512` inside
// `#pragma GCC target("avx512f,fma")` with SEGFORMER_FAST_ATTENTION_AVX512 defined. Do not include other headers
// here (<immintrin.h> and <cmath> come first in the .cpp).
//
// One task is a block of at most kRowBlock query rows of one (image, head): scores = q kᵀ into a thread-local
// (rows, Nkv) fp32 buffer, softmax in place, out = scores v / row sum. k is packed per (image, head) as
// k_t (d, Nkv), so a score row is a sum of broadcast-q times contiguous k_t rows; v as (Nkv, d).

constexpr int64_t kRowBlock = 32;

#ifdef SEGFORMER_FAST_ATTENTION_AVX512
inline __mmask16 lanes_of(int64_t remaining) {
  return remaining >= 16 ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << remaining) - 1u);
}

// exp(v) for v <= 0 (NaN stays NaN): 2^n e^r, n = round(v log2 e), r = v - n ln 2, e^r by its degree-6 Taylor
// polynomial (|r| <= 0.35: relative error below 2e-7), 2^n applied by scalef.
inline __m512 exp_nonpositive16(__m512 v) {
  v = _mm512_max_ps(_mm512_set1_ps(-87.0f), v);  // NaN in v is returned as it is (second operand)
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

// scores[r, :] = q[r, :] k_t for `rows` <= 4 query rows (q rows fp32 with stride d), 64 score columns at a time.
template <int kRows>
inline void score_rows(const float* q, int64_t d, const float* k_t, int64_t num_kv, float* scores) {
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
    for (int64_t k = 0; k < d; ++k) {
      __m512 key[4];
      for (int c = 0; c < 4; ++c) {
        key[c] = _mm512_maskz_loadu_ps(lanes[c], k_t + k * num_kv + j + 16 * c);
      }
      for (int r = 0; r < kRows; ++r) {
        const __m512 query = _mm512_set1_ps(q[r * d + k]);
        for (int c = 0; c < 4; ++c) {
          acc[r][c] = _mm512_fmadd_ps(query, key[c], acc[r][c]);
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

// In place: scores[0:n] = exp(scores - max); returns their sum.
inline float softmax_numerators(float* scores, int64_t n) {
  __m512 best = _mm512_set1_ps(-INFINITY);
  for (int64_t j = 0; j < n; j += 16) {
    const __mmask16 lanes = lanes_of(n - j);
    best = _mm512_mask_max_ps(best, lanes, _mm512_maskz_loadu_ps(lanes, scores + j), best);
  }
  const __m512 row_max = _mm512_set1_ps(_mm512_reduce_max_ps(best));
  __m512 sum = _mm512_setzero_ps();
  for (int64_t j = 0; j < n; j += 16) {
    const __mmask16 lanes = lanes_of(n - j);
    const __m512 p = exp_nonpositive16(_mm512_sub_ps(_mm512_maskz_loadu_ps(lanes, scores + j), row_max));
    _mm512_mask_storeu_ps(scores + j, lanes, p);
    sum = _mm512_mask_add_ps(sum, lanes, sum, p);
  }
  return _mm512_reduce_add_ps(sum);
}

// out[r, 0:d] = (probabilities[r, :] v) * inv_sum[r] for kRows rows, d <= 16 * kVectors (kVectors 16-lane
// accumulators a row).
template <int kRows, int kVectors>
inline void value_rows(const float* probabilities, int64_t num_kv, const float* v, int64_t d, const float* inv_sum,
                       float* out) {
  __mmask16 lanes[kVectors];
  for (int c = 0; c < kVectors; ++c) {
    lanes[c] = lanes_of(d - 16 * c);
  }
  __m512 acc[kRows][kVectors];
  for (int r = 0; r < kRows; ++r) {
    for (int c = 0; c < kVectors; ++c) {
      acc[r][c] = _mm512_setzero_ps();
    }
  }
  for (int64_t j = 0; j < num_kv; ++j) {
    __m512 value[kVectors];
    for (int c = 0; c < kVectors; ++c) {
      value[c] = _mm512_maskz_loadu_ps(lanes[c], v + j * d + 16 * c);
    }
    for (int r = 0; r < kRows; ++r) {
      const __m512 p = _mm512_set1_ps(probabilities[r * num_kv + j]);
      for (int c = 0; c < kVectors; ++c) {
        acc[r][c] = _mm512_fmadd_ps(p, value[c], acc[r][c]);
      }
    }
  }
  for (int r = 0; r < kRows; ++r) {
    const __m512 scale = _mm512_set1_ps(inv_sum[r]);
    for (int c = 0; c < kVectors; ++c) {
      _mm512_mask_storeu_ps(out + r * d + 16 * c, lanes[c], _mm512_mul_ps(acc[r][c], scale));
    }
  }
}

template <int kVectors>
inline void value_block(const float* probabilities, int64_t rows, int64_t num_kv, const float* v, int64_t d,
                        const float* inv_sum, float* out) {
  // 16 accumulators: 8 rows of d <= 32, 4 rows of d <= 64
  constexpr int kBlockRows = kVectors <= 2 ? 8 : 4;
  int64_t r = 0;
  for (; r + kBlockRows <= rows; r += kBlockRows) {
    value_rows<kBlockRows, kVectors>(probabilities + r * num_kv, num_kv, v, d, inv_sum + r, out + r * d);
  }
  for (; r < rows; ++r) {
    value_rows<1, kVectors>(probabilities + r * num_kv, num_kv, v, d, inv_sum + r, out + r * d);
  }
}

// One row block: q_rows (rows, d) fp32 -> out_rows (rows, d) fp32. scores: rows * num_kv floats.
inline void attend_block(const float* q_rows, int64_t rows, int64_t d, const float* k_t, const float* v,
                         int64_t num_kv, float* scores, float* out_rows) {
  float inv_sum[kRowBlock];
  int64_t r = 0;
  for (; r + 4 <= rows; r += 4) {
    score_rows<4>(q_rows + r * d, d, k_t, num_kv, scores + r * num_kv);
  }
  for (; r < rows; ++r) {
    score_rows<1>(q_rows + r * d, d, k_t, num_kv, scores + r * num_kv);
  }
  for (r = 0; r < rows; ++r) {
    inv_sum[r] = 1.0f / softmax_numerators(scores + r * num_kv, num_kv);
  }
  switch ((d + 15) / 16) {
    case 1:
      value_block<1>(scores, rows, num_kv, v, d, inv_sum, out_rows);
      break;
    case 2:
      value_block<2>(scores, rows, num_kv, v, d, inv_sum, out_rows);
      break;
    case 3:
      value_block<3>(scores, rows, num_kv, v, d, inv_sum, out_rows);
      break;
    default:
      value_block<4>(scores, rows, num_kv, v, d, inv_sum, out_rows);
      break;
  }
}

inline bool vectorized_head_dim(int64_t d) {
  return d <= 64;
}
#else
// The baseline loops (std::exp), any head size.
inline void attend_block(const float* q_rows, int64_t rows, int64_t d, const float* k_t, const float* v,
                         int64_t num_kv, float* scores, float* out_rows) {
  for (int64_t r = 0; r < rows; ++r) {
    float* score = scores + r * num_kv;
    for (int64_t j = 0; j < num_kv; ++j) {
      score[j] = 0.0f;
    }
    for (int64_t k = 0; k < d; ++k) {
      const float query = q_rows[r * d + k];
      const float* key = k_t + k * num_kv;
      for (int64_t j = 0; j < num_kv; ++j) {
        score[j] += query * key[j];
      }
    }
    float row_max = -INFINITY;
    bool has_nan = false;
    for (int64_t j = 0; j < num_kv; ++j) {
      has_nan |= std::isnan(score[j]);
      row_max = score[j] > row_max ? score[j] : row_max;
    }
    float sum = 0.0f;
    for (int64_t j = 0; j < num_kv; ++j) {
      score[j] = has_nan ? NAN : std::exp(score[j] - row_max);
      sum += score[j];
    }
    float* out = out_rows + r * d;
    for (int64_t c = 0; c < d; ++c) {
      out[c] = 0.0f;
    }
    for (int64_t j = 0; j < num_kv; ++j) {
      const float p = score[j];
      const float* value = v + j * d;
      for (int64_t c = 0; c < d; ++c) {
        out[c] += p * value[c];
      }
    }
    const float inv_sum = 1.0f / sum;
    for (int64_t c = 0; c < d; ++c) {
      out[c] *= inv_sum;
    }
  }
}

inline bool vectorized_head_dim(int64_t) {
  return true;
}
#endif
