// Input checks shared by the CPU and CUDA implementations of the segformer_fast ops. Every message names the
// argument, what was expected and what came.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <array>
#include <string>
#include <utility>
#include <vector>

namespace segformer_fast {

// One input of a decode op and the name its messages give it.
using NamedTensor = std::pair<const at::Tensor*, const char*>;

// The checks fused_decode and fused_decode_tokens share: the maps (B, h_i, w_i, D) contiguous channels-last with
// the batch B of `batch_from` and the D channels of `dim_from`; bias (D,), cls_weight (K, D), cls_bias (K,); every
// input (`inputs`, the maps among them) contiguous, in the dtype and on the device of the first input.
inline void check_decode_inputs(const char* op, const std::vector<NamedTensor>& maps, int64_t batch,
                                const char* batch_from, int64_t dim, const char* dim_from, const at::Tensor& bias,
                                const at::Tensor& cls_weight, const at::Tensor& cls_bias,
                                const std::vector<NamedTensor>& inputs) {
  for (const auto& [map, name] : maps) {
    TORCH_CHECK(map->dim() == 4, op, ": ", name, " must be a 4-D channels-last (B, h, w, D) map, got a ", map->dim(),
                "-D tensor of shape ", map->sizes());
  }
  TORCH_CHECK(dim > 0, op, ": ", dim_from, " must have D >= 1 channels, got D=", dim);
  for (const auto& [map, name] : maps) {
    TORCH_CHECK(map->size(3) == dim, op, ": channel mismatch: ", name, " has D=", map->size(3), " channels (shape ",
                map->sizes(), ") but ", dim_from, " has D=", dim);
    TORCH_CHECK(map->size(0) == batch, op, ": batch mismatch: ", name, " has B=", map->size(0), " but ", batch_from,
                " has B=", batch);
    TORCH_CHECK(map->size(1) > 0 && map->size(2) > 0, op, ": ", name, " must have h, w >= 1, got shape ",
                map->sizes());
  }
  TORCH_CHECK(bias.dim() == 1 && bias.size(0) == dim, op, ": bias must have shape (D,) = (", dim, ",), got ",
              bias.sizes());
  TORCH_CHECK(cls_weight.dim() == 2, op, ": cls_weight must be 2-D (K, D), got a ", cls_weight.dim(),
              "-D tensor of shape ", cls_weight.sizes());
  TORCH_CHECK(cls_weight.size(1) == dim, op, ": channel mismatch: cls_weight has shape ", cls_weight.sizes(),
              ", expected (K, D) with D=", dim, " as in ", dim_from);
  TORCH_CHECK(cls_weight.size(0) > 0, op, ": cls_weight must have K >= 1 rows, got shape ", cls_weight.sizes());
  TORCH_CHECK(cls_bias.dim() == 1 && cls_bias.size(0) == cls_weight.size(0), op,
              ": cls_bias must have shape (K,) = (", cls_weight.size(0), ",), got ", cls_bias.sizes());
  const at::Tensor& first = *inputs.front().first;
  const char* first_name = inputs.front().second;
  const auto dtype = first.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16, op,
              ": expected float32, float16 or bfloat16 inputs, got ", first_name, " of dtype ", dtype);
  for (const auto& [tensor, name] : inputs) {
    TORCH_CHECK(tensor->scalar_type() == dtype, op, ": dtype mismatch: ", name, " is ", tensor->scalar_type(),
                " but ", first_name, " is ", dtype, "; cast all inputs to one dtype");
    TORCH_CHECK(tensor->device() == first.device(), op, ": device mismatch: ", name, " is on ", tensor->device(),
                " but ", first_name, " is on ", first.device());
    TORCH_CHECK(tensor->is_contiguous(), op, ": ", name, " must be contiguous (p_i in channels-last (B, h, w, D) ",
                "layout), got shape ", tensor->sizes(), " with strides ", tensor->strides(), "; call .contiguous()");
  }
}

// fused_decode(p1, p2, p3, p4, bias, cls_weight, cls_bias):
//   p_i: (B, h_i, w_i, D) contiguous (channels-last maps), bias: (D,), cls_weight: (K, D), cls_bias: (K,);
//   one floating dtype (float32, float16 or bfloat16) and one device for all seven.
inline void check_fused_decode_inputs(
    const std::array<const at::Tensor*, 4>& maps,
    const at::Tensor& bias,
    const at::Tensor& cls_weight,
    const at::Tensor& cls_bias) {
  const std::vector<NamedTensor> named = {{maps[0], "p1"}, {maps[1], "p2"}, {maps[2], "p3"}, {maps[3], "p4"}};
  // p1 gives B and D, so its rank is checked before they are read (check_decode_inputs checks every map's)
  TORCH_CHECK(maps[0]->dim() == 4, "fused_decode: p1 must be a 4-D channels-last (B, h, w, D) map, got a ",
              maps[0]->dim(), "-D tensor of shape ", maps[0]->sizes());
  std::vector<NamedTensor> inputs = named;
  inputs.insert(inputs.end(), {{&bias, "bias"}, {&cls_weight, "cls_weight"}, {&cls_bias, "cls_bias"}});
  check_decode_inputs("fused_decode", named, maps[0]->size(0), "p1", maps[0]->size(3), "p1", bias, cls_weight,
                      cls_bias, inputs);
}

// fused_decode_tokens(t1, w1, p2, p3, p4, bias, cls_weight, cls_bias): as fused_decode with p1 = t1 w1ᵀ, where
//   t1: (B, h_1, w_1, C_1) contiguous stage-1 tokens as a channels-last map, w1: (D, C_1) contiguous.
inline void check_fused_decode_tokens_inputs(
    const at::Tensor& t1, const at::Tensor& w1, const std::array<const at::Tensor*, 3>& maps,
    const at::Tensor& bias, const at::Tensor& cls_weight, const at::Tensor& cls_bias) {
  TORCH_CHECK(t1.dim() == 4, "fused_decode_tokens: t1 must be 4-D stage-1 tokens (B, h, w, C1), got a ", t1.dim(),
              "-D tensor of shape ", t1.sizes());
  TORCH_CHECK(t1.size(1) > 0 && t1.size(2) > 0 && t1.size(3) > 0,
              "fused_decode_tokens: t1 must have h, w, C1 >= 1, got shape ", t1.sizes());
  TORCH_CHECK(w1.dim() == 2 && w1.size(1) == t1.size(3), "fused_decode_tokens: w1 must have shape (D, C1) with C1=",
              t1.size(3), " as in t1, got ", w1.sizes());
  const std::vector<NamedTensor> named = {{maps[0], "p2"}, {maps[1], "p3"}, {maps[2], "p4"}};
  std::vector<NamedTensor> inputs = {{&t1, "t1"}, {&w1, "w1"}};
  inputs.insert(inputs.end(), named.begin(), named.end());
  inputs.insert(inputs.end(), {{&bias, "bias"}, {&cls_weight, "cls_weight"}, {&cls_bias, "cls_bias"}});
  check_decode_inputs("fused_decode_tokens", named, t1.size(0), "t1", w1.size(0), "w1", bias, cls_weight, cls_bias,
                      inputs);
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
