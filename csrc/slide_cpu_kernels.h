// Inner loops of the CPU slide_argmax op, on raw pointers only. slide_cpu.cpp includes this file twice: once in
// namespace `base` (the build's baseline ISA, with std::fma) and, on x86-64 GCC, once in namespace `avx2` inside
// `#pragma GCC target("avx2,fma")`, chosen at run time. Do not include other headers here.
//
// The arithmetic is PyTorch's CPU bilinear kernel's (see bilinear.h): a horizontal pass
// fma(src[c0], w0, src[c1] * w1), then a vertical blend fma(top, l0, bottom * l1), so each loop gives the same bits
// in both builds (fma is exact; nothing is reassociated).

// out[x] = fma(row[c0[x]], w0[x], row[c1[x]] * w1[x]) for x < n: one source row resized along its columns.
inline void horizontal_row(const float* row, const int32_t* c0, const int32_t* c1, const float* w0, const float* w1,
                           int64_t n, float* out) {
  for (int64_t x = 0; x < n; ++x) {
    out[x] = std::fma(row[c0[x]], w0[x], row[c1[x]] * w1[x]);
  }
}

// acc[x] += fma(top[x], l0, bottom[x] * l1): one window's upsampled row added to the running sum over windows.
inline void accumulate_blend(const float* top, const float* bottom, float l0, float l1, int64_t n, float* acc) {
  for (int64_t x = 0; x < n; ++x) {
    acc[x] += std::fma(top[x], l0, bottom[x] * l1);
  }
}

// out[x] = fma(top[x], l0, bottom[x] * l1): the vertical blend of two horizontally resized rows.
inline void blend_row(const float* top, const float* bottom, float l0, float l1, int64_t n, float* out) {
  for (int64_t x = 0; x < n; ++x) {
    out[x] = std::fma(top[x], l0, bottom[x] * l1);
  }
}

// acc[x] /= count[x]: the sum over windows divided by how many windows cover the pixel (a true division, as
// mmseg's preds / count_mat).
inline void divide_row(const float* count, int64_t n, float* acc) {
  for (int64_t x = 0; x < n; ++x) {
    acc[x] = acc[x] / count[x];
  }
}

// The running argmax over classes of one output row: class `label`'s values against the best so far. Ties keep the
// earlier class and NaN counts as the maximum (torch.argmax semantics); label 0 initializes the row.
inline void argmax_update(const float* values, int32_t label, int64_t n, float* best, int32_t* best_index) {
  if (label == 0) {
    for (int64_t x = 0; x < n; ++x) {
      best[x] = values[x];
      best_index[x] = 0;
    }
    return;
  }
  for (int64_t x = 0; x < n; ++x) {
    const float v = values[x];
    const float current = best[x];
    const bool take = (v > current) | ((v != v) & (current == current));
    best[x] = take ? v : current;
    best_index[x] = take ? label : best_index[x];
  }
}
