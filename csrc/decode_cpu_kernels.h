// Inner loops of the CPU decoder ops, on raw pointers only. decode_cpu.cpp includes this file twice: once in
// namespace `base` (the build's baseline ISA, with std::fma) and, on x86-64 GCC/Clang, once in namespace `avx2`
// inside `#pragma GCC target("avx2,fma")`, chosen at run time. Do not include other headers here.
//
// Layouts: P maps (h, w, D) channels-last rows; logits (K, h, w) per image; `hidden` rows (w1, D) fp32.

// hidden[x, :] += up(P)[y, x, :] for one output row y of the stage-1 grid, bilinear from a (h_in, w_in, D) map:
// vertical blend of source rows row0/row1 into `blend` (w_in, D), then horizontal taps per output column.
template <typename scalar_t>
void accumulate_upsampled_row(const scalar_t* row0, const scalar_t* row1, float lambda0, float lambda1,
                              int64_t in_width, int64_t dim, const int64_t* col0, const int64_t* col1,
                              const float* col_lambda0, const float* col_lambda1, int64_t out_width, float* blend,
                              float* hidden) {
  for (int64_t i = 0; i < in_width * dim; ++i) {
    blend[i] = std::fma(static_cast<float>(row0[i]), lambda0, static_cast<float>(row1[i]) * lambda1);
  }
  for (int64_t x = 0; x < out_width; ++x) {
    const float* a = blend + col0[x] * dim;
    const float* b = blend + col1[x] * dim;
    const float wa = col_lambda0[x];
    const float wb = col_lambda1[x];
    float* h = hidden + x * dim;
    for (int64_t d = 0; d < dim; ++d) {
      h[d] += std::fma(a[d], wa, b[d] * wb);
    }
  }
}

// hidden[x, :] = P1[y, x, :] + bias (stage 1 is at the output resolution).
template <typename scalar_t>
void init_hidden_row(const scalar_t* row, const float* bias, int64_t width, int64_t dim, float* hidden) {
  for (int64_t x = 0; x < width; ++x) {
    const scalar_t* r = row + x * dim;
    float* h = hidden + x * dim;
    for (int64_t d = 0; d < dim; ++d) {
      h[d] = static_cast<float>(r[d]) + bias[d];
    }
  }
}

inline void relu_inplace(float* data, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    data[i] = (data[i] > 0.0f || std::isnan(data[i])) ? data[i] : 0.0f;  // NaN propagates, as torch.relu
  }
}

// out[k, p] = acc[k, p] + cls_bias[k] in the output dtype; out rows have stride out_stride.
template <typename scalar_t>
void store_logits(const float* acc, const float* cls_bias, int64_t num_labels, int64_t pixels, scalar_t* out,
                  int64_t out_stride) {
  for (int64_t k = 0; k < num_labels; ++k) {
    const float* a = acc + k * pixels;
    scalar_t* o = out + k * out_stride;
    const float b = cls_bias[k];
    for (int64_t p = 0; p < pixels; ++p) {
      o[p] = static_cast<scalar_t>(a[p] + b);
    }
  }
}

// out[k, p] = logits[p, k] in the output dtype (logits (pixels, K) in fp32, or already in the output dtype, the bias
// added); out rows have stride out_stride. Blocks of 16 pixels keep the transposed reads within a few cache lines.
template <typename source_t, typename scalar_t>
void store_pixel_major_logits(const source_t* logits, int64_t num_labels, int64_t pixels, scalar_t* out,
                              int64_t out_stride) {
  constexpr int64_t kBlock = 16;
  for (int64_t p0 = 0; p0 < pixels; p0 += kBlock) {
    const int64_t p1 = p0 + kBlock < pixels ? p0 + kBlock : pixels;
    for (int64_t k = 0; k < num_labels; ++k) {
      scalar_t* o = out + k * out_stride;
      for (int64_t p = p0; p < p1; ++p) {
        o[p] = static_cast<scalar_t>(logits[p * num_labels + k]);
      }
    }
  }
}

// rows[k, X] = fma(L[k, ys, x0[X]], w0[X], L[k, ys, x1[X]] * w1[X]) for every label k: the horizontal pass of
// PyTorch's bilinear formula for one source row ys of a (K, h, w) logits image.
template <typename scalar_t>
void horizontal_pass(const scalar_t* logits, int64_t num_labels, int64_t in_height, int64_t in_width, int64_t ys,
                     const int64_t* col0, const int64_t* col1, const float* w0, const float* w1, int64_t out_width,
                     float* rows) {
  for (int64_t k = 0; k < num_labels; ++k) {
    const scalar_t* src = logits + (k * in_height + ys) * in_width;
    float* dst = rows + k * out_width;
    for (int64_t x = 0; x < out_width; ++x) {
      dst[x] = std::fma(static_cast<float>(src[col0[x]]), w0[x], static_cast<float>(src[col1[x]]) * w1[x]);
    }
  }
}

// labels[X] = argmax_k fma(top[k, X], lambda0, bottom[k, X] * lambda1) in fp32, first index on ties, NaN counts as
// the maximum (torch.argmax semantics). best/best_index are scratch rows of out_width.
inline void argmax_row(const float* top, const float* bottom, float lambda0, float lambda1, int64_t num_labels,
                int64_t out_width, float* best, int32_t* best_index, int64_t* labels) {
  for (int64_t x = 0; x < out_width; ++x) {
    best[x] = std::fma(top[x], lambda0, bottom[x] * lambda1);
    best_index[x] = 0;
  }
  for (int64_t k = 1; k < num_labels; ++k) {
    const float* t = top + k * out_width;
    const float* b = bottom + k * out_width;
    const int32_t label = static_cast<int32_t>(k);
    for (int64_t x = 0; x < out_width; ++x) {
      const float v = std::fma(t[x], lambda0, b[x] * lambda1);
      const float current = best[x];
      const bool take = (v > current) | ((v != v) & (current == current));
      best[x] = take ? v : current;
      best_index[x] = take ? label : best_index[x];
    }
  }
  for (int64_t x = 0; x < out_width; ++x) {
    labels[x] = best_index[x];
  }
}
