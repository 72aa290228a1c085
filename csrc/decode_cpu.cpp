// CPU implementations of segformer_fast::fused_decode and segformer_fast::upsample_argmax.
//
// fused_decode: per task, a block of output rows of one image: the hidden rows (rows * w1, D) are built in a
// thread-local buffer, each element once (P1 + b' + the bilinear taps of P2..P4, summed in fp32, ReLU), in the
// classifier's input dtype (fp32, or bf16 where oneDNN runs bf16 natively), multiplied by the classifier with its
// bias (one GEMM per block: oneDNN's, through the mkldnn::_linear_pointwise op, where torch has it, else ATen's mm)
// and copied into the NCHW logits by ATen's transposing copy. The concat and the full hidden map never exist.
//
// upsample_argmax: per task, a group of output rows that share their two source rows: the two horizontally
// interpolated rows (K, W) are computed once for the group, then every output row blends them and keeps a
// running argmax, so the (B, K, H, W) upsampled logits never exist. The rule for every dtype: the labels are the
// argmax of the bilinear interpolation computed in fp32 (fp16 / bf16 logits are read as fp32 and the interpolated
// values never rounded back), i.e. F.interpolate(logits.float()).argmax(1). The arithmetic reproduces PyTorch's CPU
// fp32 bilinear kernel (see bilinear.h and argmax_row), so they are equal bit for bit where eager runs its generic
// kernel (output H + W > 128).

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/core/stack.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <type_traits>
#include <cmath>
#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include "bilinear.h"
#include "checks.h"
#include "cpu_dispatch.h"

namespace segformer_fast {

// One upsampled stage map's contribution to an output row of the stage-1 grid: its vertical blend (in_width, D) for
// that row and, per output column, its two source columns and their weights (decode_cpu_kernels.h).
struct UpsampleTaps {
  const float* blend;
  const int64_t* col0;
  const int64_t* col1;
  const float* lambda0;
  const float* lambda1;
};

namespace base {
#include "decode_cpu_kernels.h"
}  // namespace base

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define SEGFORMER_FAST_AVX2_DISPATCH 1
#pragma GCC push_options
#pragma GCC target("avx2,fma")
namespace avx2 {
#include "decode_cpu_kernels.h"
}  // namespace avx2
#pragma GCC pop_options
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,fma")
namespace avx512 {
#include "decode_cpu_kernels.h"
}  // namespace avx512
#pragma GCC pop_options
#endif

namespace {

constexpr int64_t TARGET_GEMM_PIXELS = 512;

bool use_avx2() {
#ifdef SEGFORMER_FAST_AVX2_DISPATCH
  static const bool supported =
      !cpu_baseline_forced() && __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return supported;
#else
  return false;
#endif
}

template <typename scalar_t>
struct DecodeKernels {
  decltype(&base::blend_rows<scalar_t>) blend_rows;
  decltype(&base::build_hidden_row<scalar_t, float>) build_hidden_row;
  decltype(&base::build_hidden_row<scalar_t, c10::BFloat16>) build_hidden_row_bf16;
  decltype(&base::store_logits<scalar_t>) store_logits;
  decltype(&base::horizontal_pass<scalar_t>) horizontal_pass;
  decltype(&base::argmax_row) argmax_row;
};

#define SEGFORMER_FAST_DECODE_KERNELS(isa)                                                                  \
  DecodeKernels<scalar_t> {                                                                                \
    &isa::blend_rows<scalar_t>, &isa::build_hidden_row<scalar_t, float>,                                   \
        &isa::build_hidden_row<scalar_t, c10::BFloat16>, &isa::store_logits<scalar_t>,                     \
        &isa::horizontal_pass<scalar_t>, &isa::argmax_row                                                  \
  }

bool use_avx512() {
#ifdef SEGFORMER_FAST_AVX2_DISPATCH
  static const bool supported = use_avx2() && __builtin_cpu_supports("avx512f") &&
                                __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl");
  return supported;
#else
  return false;
#endif
}

// The loops compiled for the widest vectors this CPU has (AVX-512, else AVX2 + FMA), else the baseline build.
template <typename scalar_t>
DecodeKernels<scalar_t> select_kernels() {
#ifdef SEGFORMER_FAST_AVX2_DISPATCH
  if (use_avx512()) {
    return SEGFORMER_FAST_DECODE_KERNELS(avx512);
  }
  if (use_avx2()) {
    return SEGFORMER_FAST_DECODE_KERNELS(avx2);
  }
#endif
  return SEGFORMER_FAST_DECODE_KERNELS(base);
}

// oneDNN's GEMM as torch registers it (mkldnn::_linear_pointwise), or nullptr in a torch built without oneDNN.
// oneDNN runs the AVX-512 GEMM on any CPU that has it; ATen's mm (MKL) took about twice as long on AMD EPYC.
const c10::OperatorHandle* onednn_linear() {
  static const std::optional<c10::OperatorHandle> handle =
      c10::Dispatcher::singleton().findOp(c10::OperatorName("mkldnn::_linear_pointwise", ""));
  return handle.has_value() ? &*handle : nullptr;
}

// out (pixels, N) = x (pixels, D) Wᵀ (+ b where `bias` is defined), in x's dtype, on oneDNN (one thread: called
// inside a parallel task): the classifier, and the stage-1 projection of fused_decode_tokens. Returns an undefined
// tensor where oneDNN is not there.
at::Tensor classify_onednn(const at::Tensor& hidden, const at::Tensor& weight, const at::Tensor& cls_bias) {
  const c10::OperatorHandle* op = onednn_linear();
  if (op == nullptr) {
    return at::Tensor();
  }
  const c10::IValue bias_value = cls_bias.defined() ? c10::IValue(cls_bias) : c10::IValue();
  torch::jit::Stack stack{hidden, weight, bias_value, std::string("none"), c10::List<std::optional<at::Scalar>>(),
                          std::optional<std::string>(std::string())};
  op->callBoxed(&stack);
  return stack[0].toTensor();
}

// Whether oneDNN runs bf16 GEMMs natively here: AVX512-BF16 (and the oneDNN op is there at all).
bool onednn_bf16_supported() {
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
  static const bool supported = onednn_linear() != nullptr && __builtin_cpu_supports("avx512bf16");
  return supported;
#else
  return false;
#endif
}

// The stage-1 projection of fused_decode_tokens: tokens (B, h1, w1, C1) and the folded weight w1 (D, C1), or
// both null for fused_decode (p1 given as a map).
struct StageOneTokens {
  const at::Tensor* tokens = nullptr;
  const at::Tensor* weight = nullptr;
};

// p1 rows y_begin .. y_begin + rows of image b, (rows * w1, D) in the tokens' dtype: t1 w1ᵀ on oneDNN (ATen's mm
// where oneDNN is missing), as the projection of the stage's tokens computes it when it is written out.
at::Tensor project_stage_one_rows(const StageOneTokens& stage_one, int64_t b, int64_t y_begin, int64_t rows) {
  const at::Tensor& tokens = *stage_one.tokens;
  const at::Tensor block = tokens.select(0, b).narrow(0, y_begin, rows).reshape({-1, tokens.size(3)});
  // oneDNN for fp32, and for bf16 where it runs bf16 natively; fp16 (no oneDNN fp16 GEMM on most CPUs) on ATen's
  const auto dtype = tokens.scalar_type();
  if (dtype == at::kFloat || (dtype == at::kBFloat16 && onednn_bf16_supported())) {
    const at::Tensor projected = classify_onednn(block, *stage_one.weight, at::Tensor());
    if (projected.defined()) {
      return projected;
    }
  }
  return at::mm(block, stage_one.weight->t());
}

template <typename scalar_t>
void fused_decode_kernel(const std::array<const at::Tensor*, 4>& maps, const StageOneTokens& stage_one,
                         const at::Tensor& bias, const at::Tensor& cls_weight, const at::Tensor& cls_bias,
                         at::Tensor& out) {
  const DecodeKernels<scalar_t> kernels = select_kernels<scalar_t>();
  const at::Tensor& grid = stage_one.tokens != nullptr ? *stage_one.tokens : *maps[0];
  const int64_t batch = grid.size(0), height = grid.size(1), width = grid.size(2);
  const int64_t dim = stage_one.weight != nullptr ? stage_one.weight->size(0) : maps[0]->size(3);
  const int64_t num_labels = cls_weight.size(0);
  // Stages 2..4: source rows/columns and weights for every output row/column of the stage-1 grid.
  std::array<LinearAxis, 3> row_axes, col_axes;
  std::array<const scalar_t*, 4> data{};
  int64_t max_in_width = 1;
  for (int s = 0; s < 4; ++s) {
    data[s] = maps[s] != nullptr ? maps[s]->data_ptr<scalar_t>() : nullptr;
    if (s > 0) {
      row_axes[s - 1] = linear_axis<float>(maps[s]->size(1), height);
      col_axes[s - 1] = linear_axis<float>(maps[s]->size(2), width);
      max_in_width = std::max(max_in_width, maps[s]->size(2));
    }
  }
  const at::Tensor weight_f = cls_weight.to(at::kFloat).contiguous();
  // bf16 on a CPU with AVX512-BF16: the classifier runs in bf16 on oneDNN (hidden rounded to bf16, fp32
  // accumulation), as the CUDA kernel does on tensor cores; at twice the fp32 GEMM rate
  const bool bf16_classifier = std::is_same_v<scalar_t, c10::BFloat16> && onednn_bf16_supported();
  const at::Tensor weight_lp = bf16_classifier ? cls_weight.contiguous() : at::Tensor();
  const at::Tensor cls_bias_lp = bf16_classifier ? cls_bias.contiguous() : at::Tensor();
  const at::Tensor bias_f = bias.to(at::kFloat).contiguous();
  const at::Tensor cls_bias_f = cls_bias.to(at::kFloat).contiguous();
  const float* bias_ptr = bias_f.data_ptr<float>();
  const float* cls_bias_ptr = cls_bias_f.data_ptr<float>();
  scalar_t* out_ptr = out.data_ptr<scalar_t>();

  const int64_t rows_per_task = std::max<int64_t>(1, std::min<int64_t>(height, TARGET_GEMM_PIXELS / width));
  const int64_t chunks = (height + rows_per_task - 1) / rows_per_task;
  const auto float_options = at::TensorOptions().dtype(at::kFloat);

  at::parallel_for(0, batch * chunks, 1, [&](int64_t begin, int64_t end) {
    // the block's hidden rows, written once in the classifier's input dtype; one vertical blend per upsampled map
    std::vector<float> hidden(bf16_classifier ? 0 : rows_per_task * width * dim);
    std::vector<c10::BFloat16> hidden_bf16(bf16_classifier ? rows_per_task * width * dim : 0);
    std::vector<float> blends(3 * max_in_width * dim);
    // the classifier's output for ATen's mm, only where oneDNN is missing (oneDNN returns its own tensor)
    std::vector<float> acc(onednn_linear() == nullptr ? num_labels * rows_per_task * width : 0);
    std::array<UpsampleTaps, 3> taps;
    for (int s = 1; s < 4; ++s) {
      const LinearAxis& ca = col_axes[s - 1];
      taps[s - 1] = {blends.data() + (s - 1) * max_in_width * dim, ca.index0.data(), ca.index1.data(),
                     ca.lambda0.data(), ca.lambda1.data()};
    }
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / chunks;
      const int64_t y_begin = (task % chunks) * rows_per_task;
      const int64_t rows = std::min(rows_per_task, height - y_begin);
      // p1's rows of this block: from the map, or projected from the stage-1 tokens here, never written whole
      const at::Tensor p1_block =
          stage_one.tokens != nullptr ? project_stage_one_rows(stage_one, b, y_begin, rows) : at::Tensor();
      const scalar_t* p1_rows =
          p1_block.defined() ? p1_block.data_ptr<scalar_t>() : data[0] + (b * height + y_begin) * width * dim;
      for (int64_t r = 0; r < rows; ++r) {
        const int64_t y = y_begin + r;
        for (int s = 1; s < 4; ++s) {
          const at::Tensor& p = *maps[s];
          const int64_t in_h = p.size(1), in_w = p.size(2);
          const LinearAxis& ra = row_axes[s - 1];
          const scalar_t* image = data[s] + b * in_h * in_w * dim;
          kernels.blend_rows(image + ra.index0[y] * in_w * dim, image + ra.index1[y] * in_w * dim, ra.lambda0[y],
                             ra.lambda1[y], in_w * dim, blends.data() + (s - 1) * max_in_width * dim);
        }
        if (bf16_classifier) {
          kernels.build_hidden_row_bf16(p1_rows + r * width * dim, bias_ptr, taps.data(), width, dim,
                                        hidden_bf16.data() + r * width * dim);
        } else {
          kernels.build_hidden_row(p1_rows + r * width * dim, bias_ptr, taps.data(), width, dim,
                                   hidden.data() + r * width * dim);
        }
      }
      const int64_t pixels = rows * width;
      scalar_t* out_block = out_ptr + b * num_labels * height * width + y_begin * width;
      // the block's logits in the output: (K, pixels) with the rows of the image's (K, h1 * w1) plane
      at::Tensor out_view = at::from_blob(out_block, {num_labels, pixels}, {height * width, 1}, out.options());
      if (bf16_classifier) {
        const at::Tensor hidden_t = at::from_blob(hidden_bf16.data(), {pixels, dim}, out.options());
        out_view.copy_(classify_onednn(hidden_t, weight_lp, cls_bias_lp).t());  // ATen's blocked transposing copy
        continue;
      }
      const at::Tensor hidden_t = at::from_blob(hidden.data(), {pixels, dim}, float_options);
      const at::Tensor logits = classify_onednn(hidden_t, weight_f, cls_bias_f);
      if (logits.defined()) {
        out_view.copy_(logits.t());
      } else {
        at::Tensor acc_t = at::from_blob(acc.data(), {num_labels, pixels}, float_options);
        at::mm_out(acc_t, weight_f, hidden_t.t());
        kernels.store_logits(acc.data(), cls_bias_ptr, num_labels, pixels, out_block, height * width);
      }
    }
  });
}

template <typename... Args>
void dispatch_fused_decode(at::ScalarType dtype, Args&&... args) {
  switch (dtype) {
    case at::kFloat:
      fused_decode_kernel<float>(std::forward<Args>(args)...);
      break;
    case at::kBFloat16:
      fused_decode_kernel<c10::BFloat16>(std::forward<Args>(args)...);
      break;
    default:
      fused_decode_kernel<c10::Half>(std::forward<Args>(args)...);
      break;
  }
}

at::Tensor fused_decode_cpu(const at::Tensor& p1, const at::Tensor& p2, const at::Tensor& p3, const at::Tensor& p4,
                            const at::Tensor& bias, const at::Tensor& cls_weight, const at::Tensor& cls_bias) {
  const std::array<const at::Tensor*, 4> maps = {&p1, &p2, &p3, &p4};
  check_fused_decode_inputs(maps, bias, cls_weight, cls_bias);
  TORCH_CHECK(p1.device().is_cpu(), "fused_decode (CPU kernel): expected CPU tensors, got p1 on ", p1.device());
  auto out = at::empty({p1.size(0), cls_weight.size(0), p1.size(1), p1.size(2)}, p1.options());
  if (out.numel() > 0) {
    dispatch_fused_decode(p1.scalar_type(), maps, StageOneTokens{}, bias, cls_weight, cls_bias, out);
  }
  return out;
}

at::Tensor fused_decode_tokens_cpu(const at::Tensor& t1, const at::Tensor& w1, const at::Tensor& p2,
                                   const at::Tensor& p3, const at::Tensor& p4, const at::Tensor& bias,
                                   const at::Tensor& cls_weight, const at::Tensor& cls_bias) {
  check_fused_decode_tokens_inputs(t1, w1, {&p2, &p3, &p4}, bias, cls_weight, cls_bias);
  TORCH_CHECK(t1.device().is_cpu(), "fused_decode_tokens (CPU kernel): expected CPU tensors, got t1 on ",
              t1.device());
  auto out = at::empty({t1.size(0), cls_weight.size(0), t1.size(1), t1.size(2)}, t1.options());
  if (out.numel() > 0) {
    const std::array<const at::Tensor*, 4> maps = {nullptr, &p2, &p3, &p4};
    dispatch_fused_decode(t1.scalar_type(), maps, StageOneTokens{&t1, &w1}, bias, cls_weight, cls_bias, out);
  }
  return out;
}

template <typename scalar_t>
void upsample_argmax_kernel(const at::Tensor& logits, at::Tensor& labels) {
  const DecodeKernels<scalar_t> kernels = select_kernels<scalar_t>();
  // fp32 interpolation for every dtype: fp32 lambdas, and an argmax over fp32 values never rounded to scalar_t
  const int64_t batch = logits.size(0), num_labels = logits.size(1);
  const int64_t in_h = logits.size(2), in_w = logits.size(3);
  const int64_t out_h = labels.size(1), out_w = labels.size(2);
  const LinearAxis rows = linear_axis<float>(in_h, out_h);
  const LinearAxis cols = linear_axis<float>(in_w, out_w);
  // Groups of consecutive output rows that read the same two source rows.
  std::vector<int64_t> group_start;
  for (int64_t y = 0; y < out_h; ++y) {
    if (y == 0 || rows.index0[y] != rows.index0[y - 1] || rows.index1[y] != rows.index1[y - 1]) {
      group_start.push_back(y);
    }
  }
  const int64_t groups = static_cast<int64_t>(group_start.size());
  group_start.push_back(out_h);
  const scalar_t* src = logits.data_ptr<scalar_t>();
  int64_t* dst = labels.data_ptr<int64_t>();

  at::parallel_for(0, batch * groups, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> top(num_labels * out_w), bottom(num_labels * out_w), best(out_w);
    std::vector<int32_t> best_index(out_w);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / groups;
      const int64_t g = task % groups;
      const int64_t y_begin = group_start[g], y_end = group_start[g + 1];
      const int64_t row0 = rows.index0[y_begin], row1 = rows.index1[y_begin];
      const scalar_t* image = src + b * num_labels * in_h * in_w;
      kernels.horizontal_pass(image, num_labels, in_h, in_w, row0, cols.index0.data(), cols.index1.data(),
                              cols.lambda0.data(), cols.lambda1.data(), out_w, top.data());
      const float* lower = top.data();
      if (row1 != row0) {
        kernels.horizontal_pass(image, num_labels, in_h, in_w, row1, cols.index0.data(), cols.index1.data(),
                                cols.lambda0.data(), cols.lambda1.data(), out_w, bottom.data());
        lower = bottom.data();
      }
      for (int64_t y = y_begin; y < y_end; ++y) {
        kernels.argmax_row(top.data(), lower, rows.lambda0[y], rows.lambda1[y], num_labels, out_w, best.data(),
                           best_index.data(), dst + (b * out_h + y) * out_w);
      }
    }
  });
}

at::Tensor upsample_argmax_cpu(const at::Tensor& logits, int64_t height, int64_t width) {
  check_upsample_argmax_inputs(logits, height, width);
  TORCH_CHECK(logits.device().is_cpu(), "upsample_argmax (CPU kernel): expected a CPU tensor, got logits on ",
              logits.device());
  auto labels = at::empty({logits.size(0), height, width}, logits.options().dtype(at::kLong));
  if (labels.numel() == 0) {
    return labels;
  }
  switch (logits.scalar_type()) {
    case at::kFloat:
      upsample_argmax_kernel<float>(logits, labels);
      break;
    case at::kBFloat16:
      upsample_argmax_kernel<c10::BFloat16>(logits, labels);
      break;
    default:
      upsample_argmax_kernel<c10::Half>(logits, labels);
      break;
  }
  return labels;
}

}  // namespace

TORCH_LIBRARY_IMPL(segformer_fast, CPU, m) {
  m.impl("fused_decode", &fused_decode_cpu);
  m.impl("fused_decode_tokens", &fused_decode_tokens_cpu);
  m.impl("upsample_argmax", &upsample_argmax_cpu);
}

}  // namespace segformer_fast
