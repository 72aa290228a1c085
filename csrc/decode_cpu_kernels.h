// Inner loops of the CPU decoder ops, on raw pointers only. decode_cpu.cpp includes this file twice: once in
// namespace `base` (the build's baseline ISA, with std::fma) and, on x86-64 GCC/Clang, once in namespace `avx2`
// inside `#pragma GCC target("avx2,fma")`, chosen at run time. Do not include other headers here.
//
// Layouts: P maps (h, w, D) channels-last rows; logits (K, h, w) per image; `hidden` rows (w1, D) fp32.

// blend[i] = row0[i] * lambda0 + row1[i] * lambda1 over n values, in fp32: the vertical pass of the bilinear
// upsampling of one source map for one output row.
template <typename scalar_t>
void blend_rows(const scalar_t* row0, const scalar_t* row1, float lambda0, float lambda1, int64_t n, float* blend) {
  for (int64_t i = 0; i < n; ++i) {
    blend[i] = std::fma(static_cast<float>(row0[i]), lambda0, static_cast<float>(row1[i]) * lambda1);
  }
}

// One row of the hidden map, written once: hidden[x, :] = ReLU(P1[y, x, :] + bias + up(P2) + up(P3) + up(P4)) for the
// output row y of the stage-1 grid, summed in that order in fp32 (NaN propagates through the ReLU, as torch.relu),
// then stored as hidden_t (fp32, or bf16 for the bf16 classifier: rounded to nearest even as c10 rounds). Each
// up(Pi) is the horizontal pass over taps[i].blend, the vertical blend of Pi's two source rows for y (blend_rows).
template <typename scalar_t, typename hidden_t>
void build_hidden_row(const scalar_t* p1_row, const float* bias, const UpsampleTaps* taps, int64_t width,
                      int64_t dim, hidden_t* hidden) {
  for (int64_t x = 0; x < width; ++x) {
    const scalar_t* p1 = p1_row + x * dim;
    const float* a2 = taps[0].blend + taps[0].col0[x] * dim;
    const float* b2 = taps[0].blend + taps[0].col1[x] * dim;
    const float* a3 = taps[1].blend + taps[1].col0[x] * dim;
    const float* b3 = taps[1].blend + taps[1].col1[x] * dim;
    const float* a4 = taps[2].blend + taps[2].col0[x] * dim;
    const float* b4 = taps[2].blend + taps[2].col1[x] * dim;
    const float wa2 = taps[0].lambda0[x], wb2 = taps[0].lambda1[x];
    const float wa3 = taps[1].lambda0[x], wb3 = taps[1].lambda1[x];
    const float wa4 = taps[2].lambda0[x], wb4 = taps[2].lambda1[x];
    hidden_t* h = hidden + x * dim;
    for (int64_t d = 0; d < dim; ++d) {
      float v = static_cast<float>(p1[d]) + bias[d];
      v += std::fma(a2[d], wa2, b2[d] * wb2);
      v += std::fma(a3[d], wa3, b3[d] * wb3);
      v += std::fma(a4[d], wa4, b4[d] * wb4);
      h[d] = static_cast<hidden_t>((v > 0.0f || v != v) ? v : 0.0f);
    }
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
