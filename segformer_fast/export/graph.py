"""The graph export traces: the engine's prepared forward (``engine.forward.prepared_forward``) on an ops object
that tracers can record, with the prepared weights held as module buffers (they become the file's initializers).

- ``mode="onnx"``: :class:`OnnxOps`, standard ONNX operators only. LayerNorm statistics and the attention softmax
  are computed in fp32 inside fp16 graphs (the LayerNorm weights are kept in fp32 for that), so runtimes that run
  the graph in half precision (ONNX Runtime, TensorRT) do not overflow; the decoder tail runs in fp32 as the
  engine's does.
- ``mode="program"``: the engine's own ``kernels="torch"`` ops (``engine.backends.TorchOps``), which run the
  standard ops while traced and keep the extension's ``fused_decode`` as a custom op (its fake kernel lets
  torch.export trace it).
"""

import dataclasses

import torch
import torch.nn.functional as F
from torch import nn

from segformer_fast.engine.backends import EagerOps, TorchOps
from segformer_fast.engine.engine import SegformerEngine
from segformer_fast.engine.forward import prepared_forward
from segformer_fast.ops import reference
from segformer_fast.prepared.weights import NormParams, SRAttentionParams

OUTPUT_KINDS = ("logits", "labels")


def _layer_norm_fp32(x, weight, bias, eps):
    """LayerNorm over the last dim with fp32 statistics (fp32 weight and bias), result in x's dtype.

    Why: in an fp16 graph a runtime may compute E[x²] in fp16, which overflows once activations pass ~256 (the
    TensorRT logits clipped at ±512); the explicit casts make fp32 statistics part of the graph for every runtime.
    """
    return F.layer_norm(x.float(), (weight.shape[0],), weight, bias, eps).to(x.dtype)


def _sr_patches_any_size(x_norm, H, W, ratio):
    """``reference.sr_patches`` spelled so that a dynamic ONNX graph is right at every size: the grid is always
    zero-padded by R - 1 and the patch counts are max(floor(H / R), 1), computed in the graph (while the exporter
    traces, H and W are 0-dim tensors, so ``torch.clamp`` is recorded). For H >= R the padding is never read; for
    H < R it is the zero padding the reference applies."""
    batch, _, channels = x_norm.shape
    grid = F.pad(x_norm.reshape(batch, H, W, channels), (0, 0, 0, ratio - 1, 0, ratio - 1))
    if isinstance(H, torch.Tensor):
        rows, cols = torch.clamp(H // ratio, min=1), torch.clamp(W // ratio, min=1)
    else:
        rows, cols = max(H // ratio, 1), max(W // ratio, 1)
    patches = grid[:, :rows * ratio, :cols * ratio].reshape(batch, rows, ratio, cols, ratio, channels)
    return patches.permute(0, 1, 3, 2, 4, 5).reshape(batch, rows * cols, ratio * ratio * channels)


class OnnxOps(EagerOps):
    """The reference ops, with fp32 LayerNorm statistics and an fp32 attention softmax written into the graph."""

    name = "onnx"

    def patch_embed_norm(self, features, norm: NormParams):
        return _layer_norm_fp32(features.flatten(2).transpose(1, 2), norm.weight, norm.bias, norm.eps)

    def layer_norm(self, tokens, norm: NormParams):
        return _layer_norm_fp32(tokens, norm.weight, norm.bias, norm.eps)

    def attention(self, x_norm, residual, height, width, params: SRAttentionParams):
        """As ``reference.sr_attention``, with the SR LayerNorm in fp32 and the softmax over fp32 scores (the
        exporter writes ``scaled_dot_product_attention`` as a fused op or a decomposition whose softmax runs in
        the graph's dtype), and the patchify right at every size (:func:`_sr_patches_any_size`)."""
        batch, tokens, channels = x_norm.shape
        heads, head_dim = params.num_heads, params.head_dim
        kv_tokens = x_norm
        if params.sr_ratio > 1:
            patches = _sr_patches_any_size(x_norm, height, width, params.sr_ratio)
            reduced = F.linear(patches, params.sr_weight, params.sr_bias)
            kv_tokens = _layer_norm_fp32(reduced, params.sr_ln_weight, params.sr_ln_bias, params.sr_eps)
        kv = F.linear(kv_tokens, params.kv_weight, params.kv_bias).reshape(batch, -1, 2, heads, head_dim)
        q = F.linear(x_norm, params.q_weight, params.q_bias).reshape(batch, tokens, heads, head_dim).transpose(1, 2)
        k, v = kv[:, :, 0].transpose(1, 2), kv[:, :, 1].transpose(1, 2)
        probabilities = torch.softmax((q @ k.transpose(-1, -2)).float(), dim=-1).to(v.dtype)
        attended = (probabilities @ v).transpose(1, 2).reshape(batch, tokens, channels)
        return reference.linear(attended, params.o_weight, params.o_bias, residual)


def _norms_in_fp32(stages: list) -> list:
    """The stages with every LayerNorm's weight and bias (the SR ones too) in fp32, for :class:`OnnxOps`."""
    def fp32(norm: NormParams) -> NormParams:
        return NormParams(norm.weight.float(), norm.bias.float(), norm.eps)

    def attention(params: SRAttentionParams) -> SRAttentionParams:
        if params.sr_ratio == 1:
            return params
        return dataclasses.replace(params, sr_ln_weight=params.sr_ln_weight.float(),
                                   sr_ln_bias=params.sr_ln_bias.float())

    return [
        dataclasses.replace(stage, patch_norm=fp32(stage.patch_norm), norm=fp32(stage.norm), blocks=[
            dataclasses.replace(block, norm1=fp32(block.norm1), norm2=fp32(block.norm2), attn=attention(block.attn))
            for block in stage.blocks
        ])
        for stage in stages
    ]


# ----------------------------------------------------------------- prepared weights <-> module buffers
def _hold(value):
    """A module holding a prepared-weights dataclass (tensors as buffers, nested dataclasses and lists of them as
    submodules, anything else as a constant), or a ModuleList for a list or tuple of dataclasses."""
    if isinstance(value, (list, tuple)) and value and dataclasses.is_dataclass(value[0]):
        return nn.ModuleList(_hold(item) for item in value)
    module = nn.Module()
    module.params_type, module.constants, module.tensor_tuples = type(value), {}, {}
    for field in dataclasses.fields(value):
        item = getattr(value, field.name)
        if isinstance(item, torch.Tensor):
            module.register_buffer(field.name, item.detach().clone())
        elif dataclasses.is_dataclass(item) or (isinstance(item, list) and item and dataclasses.is_dataclass(item[0])):
            module.add_module(field.name, _hold(item))
        elif isinstance(item, tuple) and item and all(isinstance(t, torch.Tensor) for t in item):
            module.tensor_tuples[field.name] = len(item)
            for index, tensor in enumerate(item):
                module.register_buffer(f"{field.name}_{index}", tensor.detach().clone())
        else:
            module.constants[field.name] = item
    return module


def _unhold(module):
    """The dataclass (or list of them) a :func:`_hold` module holds, its tensors being the module's buffers."""
    if isinstance(module, nn.ModuleList):
        return [_unhold(item) for item in module]
    fields = dict(module.constants)
    fields.update({name: buffer for name, buffer in module.named_buffers(recurse=False)
                   if name not in _tuple_buffer_names(module)})
    fields.update({name: tuple(getattr(module, f"{name}_{index}") for index in range(count))
                   for name, count in module.tensor_tuples.items()})
    fields.update({name: _unhold(child) for name, child in module.named_children()})
    return module.params_type(**fields)


def _tuple_buffer_names(module) -> set:
    return {f"{name}_{index}" for name, count in module.tensor_tuples.items() for index in range(count)}


class PreparedSegformer(nn.Module):
    """SegFormer's prepared forward on an engine's weights, as a module torch.export and torch.onnx can trace.

    pixel_values (B, 3, H, W) in the weights' dtype -> logits (B, K, ceil(H/4), ceil(W/4)) in that dtype, or with
    ``output="labels"`` labels (B, H, W) (uint8 for up to 256 classes, else int32).
    mode: "onnx" (:class:`OnnxOps`) or "program" (the engine's torch ops, the extension's fused_decode included).
    """

    def __init__(self, engine: SegformerEngine, mode: str, output: str = "logits", device=None):
        super().__init__()
        if mode not in ("onnx", "program"):
            raise ValueError(f"mode must be 'onnx' or 'program', got {mode!r}")
        if output not in OUTPUT_KINDS:
            raise ValueError(f"output must be one of {OUTPUT_KINDS}, got {output!r}")
        self.mode, self.output = mode, output
        self.num_labels = engine.decoder.num_labels
        self.ops = OnnxOps() if mode == "onnx" else TorchOps()
        device = device or engine.device
        stages = _norms_in_fp32(engine.stages) if mode == "onnx" else engine.stages
        self.stages = _hold([_to_device(stage, device) for stage in stages])
        self.decoder = _hold(engine.decoder.to(device=device))

    def forward(self, pixel_values):
        logits = prepared_forward(self.ops, _unhold(self.stages), _unhold(self.decoder), pixel_values)
        if self.output == "logits":
            return logits
        labels = reference.upsample_argmax(logits.float(), pixel_values.shape[2], pixel_values.shape[3])
        return labels.to(label_dtype(self.num_labels))


def _to_device(value, device):
    """A copy of a prepared-weights dataclass with every tensor (nested ones too) on ``device``."""
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, list):
        return [_to_device(item, device) for item in value]
    if dataclasses.is_dataclass(value):
        return dataclasses.replace(value, **{field.name: _to_device(getattr(value, field.name), device)
                                             for field in dataclasses.fields(value) if field.init})
    return value


def label_dtype(num_labels: int) -> torch.dtype:
    """The dtype of exported label maps: uint8 when the class ids fit, else int32."""
    return torch.uint8 if num_labels <= 256 else torch.int32
