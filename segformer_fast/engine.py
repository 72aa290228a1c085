"""``segformer_fast.optimize``: the reference SegFormer's forward rebuilt from prepared weights and fused ops.

Weights are prepared once (decoder fold, attention scale folded into q, k/v merged, SR conv laid out as a GEMM,
casts). Per device the forward runs:

- ``kernels="triton"`` (default on CUDA): the patch-embed conv (cuDNN) + Triton patch-embed LayerNorm, Triton
  LayerNorms, the fused SR-attention kernels (KV side + flash attention with q/out projections and residual) and
  the Mix-FFN kernels (fc1, then fc2 with depthwise conv + GELU in its operand load), then the folded decoder:
  per-stage projections at their own resolution and the fused upsample-sum-ReLU-classifier op of the extension.
  On CUDA the whole forward is replayed from a CUDA graph per (batch, H, W, dtype).
- ``kernels="torch"`` (default on CPU): the same prepared graph with PyTorch's best CPU ops
  (``scaled_dot_product_attention``, channels-last convolutions) and the extension's fused decoder.
- ``kernels="eager"``: plain PyTorch ops throughout, the decoder included (a debugging aid).

The engine is checked against the reference when it is built (``verify=True``): a random input runs through both
and the build fails with :class:`VerificationError`, giving the measured error and the tolerance, if they differ
beyond the tolerance rule of DESIGN.md section 5.
"""

import collections
import dataclasses
import os
import threading
import warnings

import torch
import torch.nn.functional as F

from . import ops, torch_ops
from .checkpoints import from_family
from .config import PATCH_SIZES, STRIDES, SegformerConfig
from .decoder_fold import FoldedDecodeHead, fold_decode_head
from .model import Segformer, check_pixel_values
from .prepared import MixFFNParams, SRAttentionParams, prepare_mixffn_params, prepare_sr_attention_params
from .testing import max_abs_error, tolerance

KERNEL_CHOICES = ("auto", "triton", "torch", "eager")
_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


class VerificationError(RuntimeError):
    """The engine's output differs from the reference's beyond the tolerance rule."""


@dataclasses.dataclass
class _Norm:
    weight: torch.Tensor
    bias: torch.Tensor
    eps: float


@dataclasses.dataclass
class _Block:
    norm1: _Norm
    attn: SRAttentionParams
    norm2: _Norm
    mlp: MixFFNParams


@dataclasses.dataclass
class _Stage:
    patch_weight: torch.Tensor
    patch_bias: torch.Tensor
    stride: int
    padding: int
    patch_norm: _Norm
    blocks: list
    norm: _Norm


def _kernels_module():
    """The Triton kernels (imported lazily: triton is optional for the torch/eager paths)."""
    from . import kernels

    return kernels


def _triton_available() -> bool:
    """Whether triton imports; without it the CUDA engine runs the torch path, with a warning."""
    try:
        import triton  # noqa: F401
    except ImportError as err:
        warnings.warn(f"triton is not importable ({err}); the engine uses PyTorch ops instead of the fused kernels",
                      stacklevel=3)
        return False
    return True


def _reference_from_transformers(hf_model) -> Segformer:
    """Our reference Segformer with the weights of a transformers SegformerForSemanticSegmentation."""
    config = SegformerConfig.from_transformers_dict(hf_model.config.to_dict(), type(hf_model).__name__)
    reference = Segformer(config)
    state = {k: v.detach() for k, v in hf_model.state_dict().items()}
    family = "transformers5" if any(k.startswith("segformer.stages.") for k in state) else "hub"
    reference.load_state_dict(from_family(state, family, reference, type(hf_model).__name__), strict=False)
    param = next(hf_model.parameters())
    return reference.to(device=param.device, dtype=torch.float32).eval()


def _is_transformers_segformer(model) -> bool:
    return type(model).__name__ == "SegformerForSemanticSegmentation" and hasattr(model, "segformer")


class SegformerEngine:
    """A prepared, numerically checked SegFormer. Build it with :func:`optimize`.

    Call it like the wrapped model: ``engine(pixel_values)`` returns logits (B, K, ceil(H/4), ceil(W/4)) for a
    ``Segformer``; ``engine(pixel_values=x)`` returns transformers' ``SemanticSegmenterOutput`` for a transformers
    model. ``engine.segment(images)`` returns label maps at the images' own resolution.

    Thread safety: calls may come from several threads; the CUDA-graph cache is guarded by a lock and each graph
    replays under it, so every caller gets its own, correct output.
    """

    def __init__(self, model, *, dtype=None, kernels="auto", cuda_graphs=True, verify=True, graph_cache_size=8):
        if kernels not in KERNEL_CHOICES:
            raise ValueError(f"kernels must be one of {KERNEL_CHOICES}, got {kernels!r}")
        if _is_transformers_segformer(model):
            self._transformers_output = True
            reference = _reference_from_transformers(model)
        elif isinstance(model, Segformer):
            self._transformers_output = False
            reference = model
        else:
            raise TypeError(
                "optimize() takes a segformer_fast.Segformer or a transformers SegformerForSemanticSegmentation, "
                f"got {type(model).__name__}"
            )
        self.config = reference.config
        self.device = reference.device
        self.dtype = dtype if dtype is not None else reference.dtype
        if self.dtype not in _DTYPES:
            raise ValueError(f"dtype must be one of {_DTYPES}, got {self.dtype}")
        if kernels == "auto":
            kernels = "triton" if self.device.type == "cuda" and _triton_available() else "torch"
        if kernels == "triton" and self.device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
            raise ValueError(
                f"kernels='triton' on {self.device.type} tensors needs the Triton interpreter: set TRITON_INTERPRET=1 "
                "before triton is imported (or use kernels='auto' / 'torch' on CPU)"
            )
        self.kernels = kernels
        self.use_cuda_graphs = bool(cuda_graphs) and self.device.type == "cuda"
        if graph_cache_size < 1:
            raise ValueError(f"graph_cache_size must be >= 1, got {graph_cache_size}")
        self.graph_cache_size = graph_cache_size
        self._graphs = collections.OrderedDict()
        self._lock = threading.Lock()
        self._graph_warning_given = False
        self.launch_counts = collections.Counter()
        self._prepare(reference)
        self.last_verification = None
        if verify:
            self.verify(reference)

    # ----------------------------------------------------------------------------------------------- preparation
    @torch.no_grad()
    def _prepare(self, reference: Segformer) -> None:
        dtype, device = self.dtype, self.device

        def cast(t):
            return t.detach().to(device=device, dtype=dtype).contiguous()

        def norm(module):
            return _Norm(cast(module.weight), cast(module.bias), float(module.eps))

        self.stages = []
        for index, stage in enumerate(reference.stages):
            blocks = []
            for block in stage.blocks:
                attn = block.attn
                has_sr = attn.sr_ratio > 1
                attn_args = (
                    attn.q.weight, attn.q.bias, attn.k.weight, attn.k.bias, attn.v.weight, attn.v.bias,
                    attn.proj.weight, attn.proj.bias,
                    attn.sr.weight if has_sr else None, attn.sr.bias if has_sr else None,
                    attn.sr_norm.weight if has_sr else None, attn.sr_norm.bias if has_sr else None,
                    attn.sr_norm.eps if has_sr else 0.0, attn.num_heads,
                )
                mlp = block.mlp
                mlp_args = (mlp.fc1.weight, mlp.fc1.bias, mlp.dwconv.weight, mlp.dwconv.bias, mlp.fc2.weight,
                            mlp.fc2.bias)
                blocks.append(_Block(
                    norm1=norm(block.norm1),
                    attn=prepare_sr_attention_params(*attn_args, dtype=dtype, device=device),
                    norm2=norm(block.norm2),
                    mlp=prepare_mixffn_params(*mlp_args, dtype=dtype, device=device),
                ))
            self.stages.append(_Stage(
                patch_weight=cast(stage.patch_embed.proj.weight), patch_bias=cast(stage.patch_embed.proj.bias),
                stride=STRIDES[index], padding=PATCH_SIZES[index] // 2, patch_norm=norm(stage.patch_embed.norm),
                blocks=blocks, norm=norm(stage.norm),
            ))
        self.decoder: FoldedDecodeHead = fold_decode_head(reference.decode_head, dtype=dtype, device=device)

    # ------------------------------------------------------------------------------------------------- forward
    def _layer_norm(self, x, norm: _Norm):
        if self.kernels == "triton":
            self.launch_counts["layer_norm"] += 1
            return _kernels_module().layer_norm(x, norm.weight, norm.bias, norm.eps)
        return F.layer_norm(x, (x.shape[-1],), norm.weight, norm.bias, norm.eps)

    def _patch_embed(self, image, stage: _Stage):
        features = F.conv2d(image, stage.patch_weight, stage.patch_bias, stride=stage.stride, padding=stage.padding)
        batch, channels, height, width = features.shape
        if self.kernels == "triton" and features.is_contiguous(memory_format=torch.channels_last):
            # stages 2-4 read the previous stage's tokens as a channels-last image, and the conv keeps that
            # layout: its output already is (B, h*w, C) tokens, so normalize that view (no transpose, no copy)
            tokens = features.permute(0, 2, 3, 1).reshape(batch, height * width, channels)
            tokens = self._layer_norm(tokens, stage.patch_norm)
        elif self.kernels == "triton":
            self.launch_counts["patch_embed_layer_norm"] += 1
            tokens = _kernels_module().patch_embed_layer_norm(
                features.contiguous(), stage.patch_norm.weight, stage.patch_norm.bias, stage.patch_norm.eps
            )
        else:
            tokens = F.layer_norm(features.flatten(2).transpose(1, 2), (channels,), stage.patch_norm.weight,
                                  stage.patch_norm.bias, stage.patch_norm.eps)
        return tokens, height, width

    def _block(self, x, height, width, block: _Block):
        sr_ratio = block.attn.sr_ratio
        use_triton = self.kernels == "triton" and height >= sr_ratio and width >= sr_ratio
        if use_triton:
            kernels = _kernels_module()
            h = self._layer_norm(x, block.norm1)
            self.launch_counts["sr_attention"] += 1
            x = kernels.sr_attention(h, x, height, width, block.attn)
            h = self._layer_norm(x, block.norm2)
            self.launch_counts["mixffn"] += 1
            return kernels.mixffn(h, height, width, block.mlp, residual=x)
        # torch path (also the Triton path's fallback for stage grids smaller than the SR ratio)
        h = torch_ops.layer_norm(x, block.norm1.weight, block.norm1.bias, block.norm1.eps)
        x = torch_ops.sr_attention(h, x, height, width, block.attn)
        h = torch_ops.layer_norm(x, block.norm2.weight, block.norm2.bias, block.norm2.eps)
        return torch_ops.mixffn(h, height, width, block.mlp, residual=x)

    def _forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        image = pixel_values
        projected = []
        for index, stage in enumerate(self.stages):
            tokens, height, width = self._patch_embed(image, stage)
            for block in stage.blocks:
                tokens = self._block(tokens, height, width, block)
            tokens = self._layer_norm(tokens, stage.norm)
            batch, _, channels = tokens.shape
            # P_i = F_i W'_i^T at the stage's own resolution, channels-last (B, h_i, w_i, D).
            projected.append(F.linear(tokens, self.decoder.weights[index]).view(batch, height, width, -1))
            # channels-last view of the stage output: the next patch-embed conv reads it without a copy
            image = tokens.view(batch, height, width, channels).permute(0, 3, 1, 2)
        decode = ops.fused_decode_eager if self.kernels == "eager" else ops.fused_decode
        return decode(*projected, self.decoder.bias, self.decoder.cls_weight, self.decoder.cls_bias)

    def _run(self, pixel_values: torch.Tensor) -> torch.Tensor:
        if not self.use_cuda_graphs:
            return self._forward(pixel_values)
        key = (tuple(pixel_values.shape), pixel_values.dtype, pixel_values.device)
        with self._lock:
            if key in self._graphs:
                self._graphs.move_to_end(key)
                entry = self._graphs[key]
            else:
                entry = self._capture(pixel_values)  # None (remembered) when this shape cannot be captured
                self._graphs[key] = entry
                while len(self._graphs) > self.graph_cache_size:
                    self._graphs.popitem(last=False)
            if entry is None:
                return self._forward(pixel_values)
            graph, static_input, static_output = entry
            static_input.copy_(pixel_values)
            graph.replay()
            return static_output.clone()

    def _capture(self, pixel_values: torch.Tensor):
        """A CUDA graph of the whole forward for this input shape, or None (plain launches) if capture fails."""
        try:
            static_input = pixel_values.clone()
            stream = torch.cuda.Stream(device=pixel_values.device)
            stream.wait_stream(torch.cuda.current_stream(pixel_values.device))
            with torch.cuda.stream(stream):
                for _ in range(2):  # warm-up: Triton compiles, cuDNN picks algorithms, allocator settles
                    self._forward(static_input)
            torch.cuda.current_stream(pixel_values.device).wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                static_output = self._forward(static_input)
            return graph, static_input, static_output
        except Exception as err:  # capture is an optimization: never fail a call because of it
            if not self._graph_warning_given:
                self._graph_warning_given = True
                warnings.warn(f"CUDA graph capture failed ({type(err).__name__}: {err}); using plain launches",
                              stacklevel=3)
            return None

    @torch.no_grad()
    def logits(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """pixel_values (B, 3, H, W) -> logits (B, K, ceil(H/4), ceil(W/4)) in the engine's dtype."""
        pixel_values = check_pixel_values(pixel_values, self.device, self.dtype)
        batch, _, height, width = pixel_values.shape
        if batch == 0:
            return pixel_values.new_empty(0, self.config.num_labels, -(-height // 4), -(-width // 4))
        return self._run(pixel_values.contiguous())

    def __call__(self, pixel_values=None, **kwargs):
        if pixel_values is None:
            raise TypeError("the engine needs pixel_values (B, 3, H, W)")
        unknown = set(kwargs) - {"return_dict"}
        if unknown:
            raise TypeError(f"unsupported arguments: {sorted(unknown)} (the engine does inference only)")
        logits = self.logits(pixel_values)
        if not self._transformers_output:
            return logits
        from transformers.modeling_outputs import SemanticSegmenterOutput

        if kwargs.get("return_dict") is False:
            return (logits,)
        return SemanticSegmenterOutput(logits=logits)

    # ---------------------------------------------------------------------------------------------- utilities
    @torch.no_grad()
    def segment(self, images, size=(512, 512), mode="whole", crop=None, stride=None, short_side=None,
                max_long_side=None):
        """Label maps (int64, at each image's own resolution) for PIL images, HWC uint8 arrays or paths.

        images: one image or a list; PIL images of any mode, (H, W, 3) RGB / (H, W, 4) RGBA (alpha dropped) /
        (H, W) grayscale uint8 arrays, or image file paths. Resizing: ``short_side`` (with optional
        ``max_long_side``) keeps the aspect ratio as mmseg; else ``size`` = (H, W) as transformers' processor; else
        (``size=None``) the images run at their own resolution. Images that resize to the same size run as one
        batch.

        mode: "whole" (one forward per batch; the fused ``upsample_argmax`` takes each image's logits to its own
        size), "slide" (mmseg's sliding windows, :func:`segformer_fast.inference.slide_logits`, with ``crop``
        (default 1024 x 1024) and ``stride`` (default 2/3 of the crop); the full-resolution logits are resized to
        each image's size and argmaxed) or "auto" (whole; where that runs out of memory, a ``RuntimeWarning``
        naming the crop and stride and then slide). Returns one (H, W) tensor for a single image, else a list.
        """
        from .inference import segment_images

        return segment_images(
            images, self.logits, num_labels=self.config.num_labels, device=self.device, dtype=self.dtype,
            size=size, mode=mode, crop=crop, stride=stride, short_side=short_side, max_long_side=max_long_side,
            whole_labels=self.whole_labels,
        )

    def whole_labels(self, pixel_values, sizes):
        """Whole-image labels of a preprocessed batch: one forward, then per image the fused upsample + argmax."""
        logits = self.logits(pixel_values)
        return [ops.upsample_argmax(logits[i:i + 1], h, w)[0] for i, (h, w) in enumerate(sizes)]

    @torch.no_grad()
    def verify(self, reference: Segformer, height: int = 67, width: int = 91, batch: int = 2, seed: int = 0):
        """Run a random input through the engine and the reference; raise VerificationError beyond tolerance.

        The reference runs in fp32 (the ground truth) and, for fp16/bf16 engines, also in the engine's dtype (the
        eager error the rule allows twice of). Returns a dict with the measured error and the tolerance.
        """
        generator = torch.Generator().manual_seed(seed)
        pixels = torch.randn(batch, 3, height, width, generator=generator).to(self.device)
        reference_fp32 = reference if reference.dtype == torch.float32 else _copy_to(reference, torch.float32)
        expected = reference_fp32(pixels).float()
        eager_error = 0.0
        if self.dtype != torch.float32:
            eager = _copy_to(reference, self.dtype)(pixels.to(self.dtype)).float()
            eager_error = max_abs_error(eager, expected)
        got = self.logits(pixels).float()
        error = max_abs_error(got, expected)
        allowed = tolerance(expected, self.dtype, eager_error)
        self.last_verification = {"max_abs_error": error, "tolerance": allowed, "eager_error": eager_error,
                                  "max_abs_reference": float(expected.abs().max()), "shape": tuple(pixels.shape)}
        if not error <= allowed:
            raise VerificationError(
                f"engine ({self.kernels} kernels, {self.dtype}) disagrees with the reference on a random "
                f"{tuple(pixels.shape)} input: max abs error {error:.3e} > tolerance {allowed:.3e} "
                f"(eager {self.dtype} error {eager_error:.3e}, max |ref| {float(expected.abs().max()):.3e})"
            )
        return self.last_verification


def _copy_to(reference: Segformer, dtype: torch.dtype) -> Segformer:
    copy = Segformer(reference.config).to(reference.device)
    copy.load_state_dict(reference.state_dict())
    return copy.to(dtype).eval()


def optimize(model, *, dtype=None, kernels="auto", cuda_graphs=True, verify=True, graph_cache_size=8):
    """The fastest correct SegFormer for ``model``'s device: a :class:`SegformerEngine`.

    model: a ``segformer_fast.Segformer`` or a transformers ``SegformerForSemanticSegmentation`` (its weights are
    read, never modified). dtype: the compute dtype (default: the model's). kernels: "auto" (Triton on CUDA, torch
    ops on CPU), "triton" (also on CPU tensors under TRITON_INTERPRET=1), "torch", or "eager" (debugging).
    cuda_graphs: replay a CUDA graph per (batch, H, W, dtype), at most ``graph_cache_size`` kept (LRU).
    verify: check the engine against the reference on a random input now (raises VerificationError).
    """
    return SegformerEngine(model, dtype=dtype, kernels=kernels, cuda_graphs=cuda_graphs, verify=verify,
                           graph_cache_size=graph_cache_size)
