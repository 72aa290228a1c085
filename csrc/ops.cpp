// The segformer_fast operator library: schemas here, kernels in decode_cpu.cpp, kv_attention_cpu.cpp,
// layer_norm_cpu.cpp and slide_cpu.cpp (CPU) and cuda_launch.cpp (CUDA).
// Fake (meta) implementations for torch.compile / torch.export live in segformer_fast/ops/extension.py.

#include <Python.h>
#include <torch/library.h>

extern "C" {
// `import segformer_fast._C` loads this library, which runs the TORCH_LIBRARY registrations below; the module
// itself is empty (the ops are reached through torch.ops.segformer_fast).
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}

TORCH_LIBRARY(segformer_fast, m) {
  // p_i: (B, h_i, w_i, D) contiguous; bias: (D,); cls_weight: (K, D); cls_bias: (K,) -> logits (B, K, h_1, w_1).
  m.def(
      "fused_decode(Tensor p1, Tensor p2, Tensor p3, Tensor p4, Tensor bias, Tensor cls_weight, Tensor cls_bias) "
      "-> Tensor");
  // fused_decode with p1 = t1 w1ᵀ computed per block of rows inside the op (the stage-1 map never written):
  // t1: (B, h1, w1, C1) contiguous stage-1 tokens; w1: (D, C1). CPU only.
  m.def(
      "fused_decode_tokens(Tensor t1, Tensor w1, Tensor p2, Tensor p3, Tensor p4, Tensor bias, Tensor cls_weight, "
      "Tensor cls_bias) -> Tensor");
  // logits: (B, K, h, w) contiguous -> int64 labels (B, height, width).
  m.def("upsample_argmax(Tensor logits, int height, int width) -> Tensor");
  // The label pass of sliding-window inference for output rows [row_begin, row_end) of labels (B, H, W) int64:
  // window_logits, per window (B, K, h_i, w_i) float32, resized to up_sizes (up_h, up_w per window), placed at
  // boxes (y1, y2, x1, x2 per window) of the height x width slide grid, averaged, resized to (H, W), arg-maxed.
  // CPU only (slide_cpu.cpp).
  m.def(
      "slide_argmax(Tensor[] window_logits, int[] boxes, int[] up_sizes, int height, int width, Tensor(a!) labels, "
      "int row_begin, int row_end) -> ()");
  // q: (B, N, C) contiguous, projected and scaled; kv: (B, Nkv, 2C) = [k | v]; heads split C head-major ->
  // softmax(q kᵀ) v per head, (B, N, C). CPU only (the CUDA path is the Triton flash SR-attention kernel).
  m.def("kv_attention(Tensor q, Tensor kv, int heads) -> Tensor");
  // x: (..., C) contiguous; weight, bias: (C,) in x's dtype -> LayerNorm over C with fp32 statistics, x's dtype.
  // CPU only (the CUDA path is the Triton LayerNorm kernel).
  m.def("layer_norm(Tensor x, Tensor weight, Tensor bias, float eps) -> Tensor");
}
