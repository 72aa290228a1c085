// Source indices and weights of bilinear resizing with align_corners=False, computed exactly as PyTorch's CPU
// kernels do for F.interpolate(size=...): scale = in / out in float, src = fma(scale, o + 0.5, -0.5) clamped at
// 0 (PyTorch's x86 AVX2/AVX512 kernels are built with FMA contraction), i0 = min(floor(src), in - 1),
// i1 = i0 + (i0 < in - 1), lambda1 = clamp(src - i0, 0, 1), lambda0 = 1 - lambda1, with both lambdas rounded to
// the tensor's dtype (eager stores them in the input dtype). Equal sizes copy (lambda0 = 1).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

namespace segformer_fast {

struct LinearAxis {
  std::vector<int64_t> index0, index1;
  std::vector<float> lambda0, lambda1;
};

// weight_t: the dtype the lambdas are stored in (float, c10::BFloat16, c10::Half).
template <typename weight_t>
LinearAxis linear_axis(int64_t input_size, int64_t output_size) {
  LinearAxis axis;
  axis.index0.resize(output_size);
  axis.index1.resize(output_size);
  axis.lambda0.resize(output_size);
  axis.lambda1.resize(output_size);
  const float scale = static_cast<float>(input_size) / static_cast<float>(output_size);
  for (int64_t o = 0; o < output_size; ++o) {
    if (input_size == output_size) {
      axis.index0[o] = o;
      axis.index1[o] = o;
      axis.lambda0[o] = 1.0f;
      axis.lambda1[o] = 0.0f;
      continue;
    }
    float real = std::fma(scale, static_cast<float>(o) + 0.5f, -0.5f);
    real = real < 0.0f ? 0.0f : real;
    const int64_t i0 = std::min(static_cast<int64_t>(std::floor(real)), input_size - 1);
    const weight_t l1 = static_cast<weight_t>(std::min(std::max(real - static_cast<float>(i0), 0.0f), 1.0f));
    const weight_t l0 = static_cast<weight_t>(1.0f - static_cast<float>(l1));
    axis.index0[o] = i0;
    axis.index1[o] = i0 + (i0 < input_size - 1 ? 1 : 0);
    axis.lambda0[o] = static_cast<float>(l0);
    axis.lambda1[o] = static_cast<float>(l1);
  }
  return axis;
}

}  // namespace segformer_fast
