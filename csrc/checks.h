// Input checks shared by the CPU and CUDA implementations of the segformer_fast ops. Every message names the
// argument, what was expected and what came.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <array>
#include <string>

namespace segformer_fast {

// fused_decode(p1, p2, p3, p4, bias, cls_weight, cls_bias):
//   p_i: (B, h_i, w_i, D) contiguous (channels-last maps), bias: (D,), cls_weight: (K, D), cls_bias: (K,);
//   one floating dtype (float32, float16 or bfloat16) and one device for all seven.
inline void check_fused_decode_inputs(
    const std::array<const at::Tensor*, 4>& maps,
    const at::Tensor& bias,
    const at::Tensor& cls_weight,
    const at::Tensor& cls_bias) {
  static const char* const kNames[4] = {"p1", "p2", "p3", "p4"};
  const at::Tensor& p1 = *maps[0];
  for (int i = 0; i < 4; ++i) {
    const at::Tensor& p = *maps[i];
    TORCH_CHECK(p.dim() == 4, "fused_decode: ", kNames[i], " must be a 4-D channels-last (B, h, w, D) map, got a ",
                p.dim(), "-D tensor of shape ", p.sizes());
  }
  const int64_t batch = p1.size(0);
  const int64_t dim = p1.size(3);
  TORCH_CHECK(dim > 0, "fused_decode: p1 must have D >= 1 channels, got shape ", p1.sizes());
  for (int i = 0; i < 4; ++i) {
    const at::Tensor& p = *maps[i];
    TORCH_CHECK(p.size(3) == dim, "fused_decode: channel mismatch: ", kNames[i], " has D=", p.size(3),
                " channels (shape ", p.sizes(), ") but p1 has D=", dim);
    TORCH_CHECK(p.size(0) == batch, "fused_decode: batch mismatch: ", kNames[i], " has B=", p.size(0),
                " but p1 has B=", batch);
    TORCH_CHECK(p.size(1) > 0 && p.size(2) > 0, "fused_decode: ", kNames[i],
                " must have h, w >= 1, got shape ", p.sizes());
  }
  TORCH_CHECK(bias.dim() == 1 && bias.size(0) == dim, "fused_decode: bias must have shape (D,) = (", dim,
              ",), got ", bias.sizes());
  TORCH_CHECK(cls_weight.dim() == 2, "fused_decode: cls_weight must be 2-D (K, D), got a ", cls_weight.dim(),
              "-D tensor of shape ", cls_weight.sizes());
  TORCH_CHECK(cls_weight.size(1) == dim, "fused_decode: channel mismatch: cls_weight has shape ", cls_weight.sizes(),
              ", expected (K, D) with D=", dim, " as in p1");
  TORCH_CHECK(cls_weight.size(0) > 0, "fused_decode: cls_weight must have K >= 1 rows, got shape ",
              cls_weight.sizes());
  TORCH_CHECK(cls_bias.dim() == 1 && cls_bias.size(0) == cls_weight.size(0), "fused_decode: cls_bias must have shape (K,) = (",
              cls_weight.size(0), ",), got ", cls_bias.sizes());

  const std::array<std::pair<const at::Tensor*, const char*>, 7> all = {{
      {maps[0], "p1"}, {maps[1], "p2"}, {maps[2], "p3"}, {maps[3], "p4"},
      {&bias, "bias"}, {&cls_weight, "cls_weight"}, {&cls_bias, "cls_bias"}}};
  const auto dtype = p1.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16,
              "fused_decode: expected float32, float16 or bfloat16 inputs, got p1 of dtype ", dtype);
  for (const auto& [tensor, name] : all) {
    TORCH_CHECK(tensor->scalar_type() == dtype, "fused_decode: dtype mismatch: ", name, " is ",
                tensor->scalar_type(), " but p1 is ", dtype, "; cast all inputs to one dtype");
    TORCH_CHECK(tensor->device() == p1.device(), "fused_decode: device mismatch: ", name, " is on ",
                tensor->device(), " but p1 is on ", p1.device());
    TORCH_CHECK(tensor->is_contiguous(), "fused_decode: ", name, " must be contiguous (p_i in channels-last (B, h, w, D) ",
                "layout), got shape ", tensor->sizes(), " with strides ", tensor->strides(), "; call .contiguous()");
  }
}

// upsample_argmax(logits (B, K, h, w), height, width) -> labels (B, height, width) int64.
inline void check_upsample_argmax_inputs(const at::Tensor& logits, int64_t height, int64_t width) {
  TORCH_CHECK(logits.dim() == 4, "upsample_argmax: logits must be 4-D (B, K, h, w), got a ", logits.dim(),
              "-D tensor of shape ", logits.sizes());
  TORCH_CHECK(logits.size(1) > 0, "upsample_argmax: logits must have K >= 1 channels, got shape ", logits.sizes());
  TORCH_CHECK(logits.size(2) > 0 && logits.size(3) > 0, "upsample_argmax: logits must have h, w >= 1, got shape ",
              logits.sizes());
  TORCH_CHECK(height > 0 && width > 0, "upsample_argmax: output size must be positive, got (", height, ", ", width, ")");
  const auto dtype = logits.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16,
              "upsample_argmax: expected float32, float16 or bfloat16 logits, got ", dtype);
  TORCH_CHECK(logits.is_contiguous(), "upsample_argmax: logits must be contiguous (B, K, h, w), got strides ",
              logits.strides(), " for shape ", logits.sizes(), "; call .contiguous()");
}

}  // namespace segformer_fast
