// AVX-512 loads and stores of 16 fp32 values from / to fp32 or bf16 memory (layer_norm_cpu_kernels.h; for any CPU
// kernel that reads or writes bf16 through fp32 registers). Include it
// inside a namespace compiled under `#pragma GCC target("avx512f,avx512bw,avx512vl,...")`, after <immintrin.h> and
// c10's BFloat16; it includes nothing itself.

inline __mmask16 lanes_of(int64_t remaining) {
  return remaining >= 16 ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << remaining) - 1u);
}

inline __m512 load16(const float* source, __mmask16 lanes) {
  return _mm512_maskz_loadu_ps(lanes, source);
}

// bf16 -> fp32 is exact: the 16 bits become the high half of the fp32 pattern.
inline __m512 load16(const c10::BFloat16* source, __mmask16 lanes) {
  const __m256i bits = _mm256_maskz_loadu_epi16(lanes, source);
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(bits), 16));
}

inline void store16(float* target, __m512 values, __mmask16 lanes) {
  _mm512_mask_storeu_ps(target, lanes, values);
}

// fp32 -> bf16 rounded to nearest even, NaN as the quiet NaN 0x7FC0: the rounding of c10::BFloat16(float).
inline void store16(c10::BFloat16* target, __m512 values, __mmask16 lanes) {
  const __m512i bits = _mm512_castps_si512(values);
  const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
  __m512i rounded = _mm512_add_epi32(bits, _mm512_add_epi32(odd, _mm512_set1_epi32(0x7FFF)));
  const __mmask16 nan = _mm512_cmp_ps_mask(values, values, _CMP_UNORD_Q);
  rounded = _mm512_mask_mov_epi32(rounded, nan, _mm512_set1_epi32(0x7FC00000));
  _mm256_mask_storeu_epi16(target, lanes, _mm512_cvtepi32_epi16(_mm512_srli_epi32(rounded, 16)));
}
