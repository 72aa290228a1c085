"""``segformer_fast.optimize``: the reference SegFormer's forward rebuilt from prepared weights and fused ops.

Weights are prepared once (``prepared.weights.prepare_stages``: attention scale folded into q, k/v merged, SR conv
laid out as a GEMM, casts; ``prepared.decoder_fold.fold_decode_head``: the decode head folded). The forward is
SegFormer's (``engine.forward.prepared_forward``, which export traces too), each step run by the ops object of the
backend chosen once at construction:

- ``kernels="triton"`` (default on CUDA, ``triton_backend.TritonOps``): the patch-embed conv (cuDNN) + Triton
  patch-embed LayerNorm, Triton LayerNorms, the fused SR-attention kernels (KV side + flash attention with q/out
  projections and residual) and the Mix-FFN kernels (fc1, then fc2 with depthwise conv + GELU in its operand
  load), then the folded decoder: per-stage projections at their own resolution and the fused
  upsample-sum-ReLU-classifier op of the extension. On CUDA the whole forward is replayed from a CUDA graph per
  (batch, H, W, dtype) (``graph_cache.CUDAGraphCache``).
- ``kernels="torch"`` (default on CPU, and a CUDA engine's fallback where triton is missing; ``backends.TorchOps``):
  the same prepared graph on the CPU fast ops (``ops.cpu``: oneDNN GEMMs on packed weights, the fused depthwise
  conv + GELU) and the extension's attention core, LayerNorm and fused decoder (``ops.extension``).
- ``kernels="eager"`` (``backends.EagerOps``): the reference ops throughout (``ops.reference``), the decoder
  included (a debugging aid).

The engine is checked against the reference when it is built (``verify=True``): a random input runs through both
and the build fails with :class:`VerificationError`, giving the measured error and the tolerance, if they differ
beyond the tolerance rule of docs/DESIGN.md section 5.

fp32 means IEEE fp32 on both sides: the ground truth in ``verify`` runs with TensorFloat-32 off
(``core.numerics.no_tf32``), and so does an fp32 engine on CUDA (its cuDNN patch-embed convolutions and cuBLAS
decoder projections; the Triton kernels never use TF32 for fp32), so it passes the fp32 tolerance honestly. Users
who want TF32 speed should ask
for ``dtype=torch.float16`` or ``torch.bfloat16``, which are faster still and have their own tolerance.

The source model is only read: never run in train mode, its weights and BatchNorm statistics never changed.

The engine is a ``torch.nn.Module`` in inference mode, so code written for transformers' model runs unchanged:
``eval()``, ``train(False)``, ``requires_grad_(False)``, ``to()`` / ``cpu()`` / ``cuda()`` / ``float()`` to the device
and dtype it was built for (each returns the engine), ``parameters()`` (its prepared weights, frozen), ``device``,
``dtype``, ``config``, forward hooks. What it cannot do is refused with the way out, never done half: ``train()``
and ``requires_grad_()`` (inference only), ``to()`` another device or dtype (the weights are prepared, packed and
verified for one: build another engine), ``state_dict()`` / ``load_state_dict()`` (prepared weights are no
checkpoint: save or load the source model).
"""

import contextlib
import dataclasses
import os
import warnings

import torch

from segformer_fast.core import malloc_tuning
from segformer_fast.core.numerics import max_abs_error, no_tf32, tolerance
from segformer_fast.core.runtime import COMPUTE_DTYPES
from segformer_fast.engine.backends import EagerOps, TorchOps
from segformer_fast.engine.forward import prepared_forward
from segformer_fast.engine.graph_cache import CUDAGraphCache
from segformer_fast.inference.segment import segment_images
from segformer_fast.model.checkpoints import check_finite, is_transformers_segformer
from segformer_fast.model.segformer import Segformer, check_pixel_values
from segformer_fast.ops import extension
from segformer_fast.prepared.decoder_fold import FoldedDecodeHead, fold_decode_head
from segformer_fast.prepared.weights import StageParams, prepare_stages

KERNEL_CHOICES = ("auto", "triton", "torch", "eager")


class VerificationError(RuntimeError):
    """The engine's output differs from the reference's beyond the tolerance rule."""


def _triton_available() -> bool:
    """Whether triton imports; without it the CUDA engine runs the torch path, with a warning."""
    try:
        import triton  # noqa: F401
    except ImportError as err:
        warnings.warn(f"triton is not importable ({err}); the engine uses PyTorch ops instead of the fused kernels",
                      stacklevel=4)
        return False
    return True


def _make_ops(kernels: str):
    """The ops object of a resolved backend name ("triton", "torch" or "eager")."""
    if kernels == "triton":
        from segformer_fast.engine.triton_backend import TritonOps  # triton is optional: imported only when chosen

        return TritonOps()
    return EagerOps() if kernels == "eager" else TorchOps()


def slide_label_pass(device):
    """The label pass sliding windows use on ``device`` (``inference.slide.slide_labels``): the extension's fused
    ``slide_argmax`` where it has a kernel (CPU), else None (torch ops)."""
    return extension.slide_argmax if extension.slide_argmax_available(device) else None


def _prepared_tensors(value, prefix: str):
    """(dotted name, tensor) of every tensor in the prepared weights (dataclasses, lists, tuples)."""
    if isinstance(value, torch.Tensor):
        yield prefix, value
    elif dataclasses.is_dataclass(value):
        for field in dataclasses.fields(value):
            yield from _prepared_tensors(getattr(value, field.name), f"{prefix}.{field.name}")
    elif isinstance(value, (list, tuple)):
        for index, item in enumerate(value):
            yield from _prepared_tensors(item, f"{prefix}.{index}")


def _frozen_parameters(named_tensors) -> torch.nn.Module:
    """A module tree holding each tensor (once) as a frozen ``nn.Parameter`` sharing its storage, under its name."""
    root, seen = torch.nn.Module(), set()
    for name, tensor in named_tensors:
        if id(tensor) in seen:
            continue
        seen.add(id(tensor))
        *path, leaf = name.split(".")
        module = root
        for part in path:
            if part not in module._modules:
                module.add_module(part, torch.nn.Module())
            module = module._modules[part]
        module.register_parameter(leaf, torch.nn.Parameter(tensor, requires_grad=False))
    return root.train(False)


class SegformerEngine(torch.nn.Module):
    """A prepared, numerically checked SegFormer. Build it with :func:`optimize`.

    Call it like the wrapped model: ``engine(pixel_values)`` returns logits (B, K, ceil(H/4), ceil(W/4)) for a
    ``Segformer``; ``engine(pixel_values=x)`` returns transformers' ``SemanticSegmenterOutput`` for a transformers
    model. ``engine.segment(images)`` returns label maps at the images' own resolution.

    Thread safety: calls may come from several threads; the CUDA-graph cache is guarded by a lock and each graph
    replays under it, so every caller gets its own, correct output.

    An ``nn.Module`` for inference only (see the module docstring): ``parameters()`` yields the prepared weights
    (folded, merged, in the engine's dtype; not the source model's parameters), all frozen.
    """

    def __init__(self, model, *, dtype=None, kernels="auto", cuda_graphs=True, verify=True, graph_cache_size=8):
        super().__init__()
        self.training = False
        if kernels not in KERNEL_CHOICES:
            raise ValueError(f"kernels must be one of {KERNEL_CHOICES}, got {kernels!r}")
        if is_transformers_segformer(model):
            self._transformers_output = True
            check_finite(model.state_dict(), f"optimize({type(model).__name__})")
            source_dtype = next(model.parameters()).dtype
            reference = Segformer.from_transformers(model)  # fp32, eval mode, a copy
        elif isinstance(model, Segformer):
            self._transformers_output = False
            check_finite(model.state_dict(), "optimize(Segformer)")
            source_dtype = model.dtype
            # a model left in train() mode is never run as it is (BatchNorm would update its statistics)
            reference = _copy_to(model, model.dtype) if any(m.training for m in model.modules()) else model
        else:
            raise TypeError(
                "optimize() takes a segformer_fast.Segformer or a transformers SegformerForSemanticSegmentation, "
                f"got {type(model).__name__}"
            )
        self.config = reference.config
        self.device = reference.device
        self.dtype = dtype if dtype is not None else source_dtype
        if self.dtype not in COMPUTE_DTYPES:
            raise ValueError(f"dtype must be one of {COMPUTE_DTYPES}, got {self.dtype}")
        if kernels == "auto":
            kernels = "triton" if self.device.type == "cuda" and _triton_available() else "torch"
        if kernels == "triton" and self.device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
            raise ValueError(
                f"kernels='triton' on {self.device.type} tensors needs the Triton interpreter: set TRITON_INTERPRET=1 "
                "before triton is imported (or use kernels='auto' / 'torch' on CPU)"
            )
        self.kernels = kernels
        self.ops = _make_ops(kernels)
        if self.device.type == "cpu":
            malloc_tuning.keep_freed_memory()  # reuse freed temporaries, no page faults per call
        self.use_cuda_graphs = bool(cuda_graphs) and self.device.type == "cuda"
        self.graph_cache = CUDAGraphCache(self._forward, graph_cache_size)
        self.stages: list[StageParams] = prepare_stages(reference, self.dtype, self.device)
        self.decoder: FoldedDecodeHead = fold_decode_head(reference.decode_head, dtype=self.dtype, device=self.device)
        # what the forward runs on: the prepared weights in the backend's own layout (on CPU, GEMM weights packed
        # for oneDNN); self.stages / self.decoder stay plain for export and inspection
        self._run_stages, self._run_decoder = self.ops.prepare(self.stages, self.decoder)
        self.prepared = _frozen_parameters(_prepared_tensors(self.stages, "stages"))
        self.prepared.add_module("decoder", _frozen_parameters(_prepared_tensors(self.decoder, "decoder")).decoder)
        self.label_pass = slide_label_pass(self.device)
        self.last_verification = None
        if verify:
            self.verify(reference)

    @property
    def graph_cache_size(self) -> int:
        """The most CUDA graphs kept (one per input shape, least recently used evicted)."""
        return self.graph_cache.size

    # ------------------------------------------------------------------------------------------------- forward
    def _forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """SegFormer's forward on the prepared weights: (B, 3, H, W) -> logits (B, K, ceil(H/4), ceil(W/4))."""
        return prepared_forward(self.ops, self._run_stages, self._run_decoder, pixel_values)

    @torch.no_grad()
    def logits(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """pixel_values (B, 3, H, W) -> logits (B, K, ceil(H/4), ceil(W/4)) in the engine's dtype."""
        pixel_values = check_pixel_values(pixel_values, self.device, self.dtype)
        batch, _, height, width = pixel_values.shape
        if batch == 0:
            return pixel_values.new_empty(0, self.config.num_labels, -(-height // 4), -(-width // 4))
        pixel_values = pixel_values.contiguous()
        with self._precision_scope():
            return self.graph_cache(pixel_values) if self.use_cuda_graphs else self._forward(pixel_values)

    def _precision_scope(self):
        """TF32 off around an fp32 CUDA forward (and so in its captured graphs): fp32 means IEEE fp32."""
        if self.dtype == torch.float32 and self.device.type == "cuda":
            return no_tf32()
        return contextlib.nullcontext()

    def forward(self, pixel_values=None, **kwargs):
        """``engine(pixel_values)``: logits for a ``Segformer``, transformers' ``SemanticSegmenterOutput`` (or a tuple
        with ``return_dict=False``) for a transformers model."""
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
        size), "slide" (mmseg's sliding windows, :func:`segformer_fast.inference.slide.slide_logits`, with ``crop``
        (default 1024 x 1024) and ``stride`` (default 2/3 of the crop); the full-resolution logits are resized to
        each image's size and argmaxed) or "auto" (whole; where that runs out of memory, a ``RuntimeWarning``
        naming the crop and stride and then slide). Returns one (H, W) tensor for a single image, else a list.
        """
        return segment_images(
            images, self.logits, num_labels=self.config.num_labels, device=self.device, dtype=self.dtype,
            size=size, mode=mode, crop=crop, stride=stride, short_side=short_side, max_long_side=max_long_side,
            whole_labels=self.whole_labels, label_pass=self.label_pass,
        )

    def whole_labels(self, pixel_values, sizes):
        """Whole-image labels of a preprocessed batch: one forward, then per image the fused upsample + argmax."""
        logits = self.logits(pixel_values)
        return [extension.upsample_argmax(logits[i:i + 1], h, w)[0] for i, (h, w) in enumerate(sizes)]

    @torch.no_grad()
    def verify(self, reference: Segformer, height: int = 67, width: int = 91, batch: int = 2, seed: int = 0):
        """Run a random input through the engine and the reference; raise VerificationError beyond tolerance.

        The reference runs in fp32 with TF32 off (the ground truth) and, for fp16/bf16 engines, also in the engine's
        dtype (the eager error the rule allows twice of), always in eval mode (a copy when ``reference`` is in train
        mode). Returns a dict with the measured error and the tolerance.
        """
        generator = torch.Generator().manual_seed(seed)
        pixels = torch.randn(batch, 3, height, width, generator=generator).to(self.device)
        in_eval_mode = not any(m.training for m in reference.modules())
        reference_fp32 = reference if reference.dtype == torch.float32 and in_eval_mode else _copy_to(
            reference, torch.float32)
        eager_error = 0.0
        with no_tf32():
            expected = reference_fp32(pixels).float()
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


    # ------------------------------------------------------------------------------ nn.Module, inference only
    def extra_repr(self) -> str:
        return (f"MiT-{self.config.variant.upper()}, {self.config.num_labels} classes, {self.dtype} on {self.device}, "
                f"{self.kernels} kernels")

    def train(self, mode: bool = True):
        """``train(False)`` (and ``eval()``) return the engine, already in inference mode; ``train(True)`` raises."""
        if mode:
            raise RuntimeError("the engine is for inference only (its weights are folded and it has no backward): "
                               "train the source model, then build a new engine with segformer_fast.optimize(model)")
        return self

    def requires_grad_(self, requires_grad: bool = True):
        """``requires_grad_(False)`` returns the engine (its weights are frozen already); True raises."""
        if requires_grad:
            raise RuntimeError("the engine's prepared weights are frozen (inference only): call requires_grad_ on "
                               "the source model to train it")
        return self

    def _apply(self, fn, recurse=True):
        """What ``to()``, ``cpu()``, ``cuda()``, ``half()``, ``float()``... run: the engine itself where the device
        and dtype stay; ValueError for another (the weights are prepared, packed and verified for one)."""
        probe = torch.empty(0, device=self.device, dtype=self.dtype)
        try:
            moved = fn(probe)
        except (RuntimeError, AssertionError, TypeError) as error:
            raise ValueError(f"cannot move the engine ({error}): {self._rebuild_hint()}") from None
        if moved.device == probe.device and moved.dtype == probe.dtype:
            return self
        raise ValueError(f"cannot move the engine to {moved.dtype} on {moved.device}: {self._rebuild_hint()}")

    def _rebuild_hint(self) -> str:
        return (f"it is built for {self.dtype} on {self.device}, its weights prepared, packed and verified for them; "
                "for another device or dtype build another engine: segformer_fast.optimize(model.to(device), "
                "dtype=dtype)")

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.extra_repr()})"

    def state_dict(self, *args, **kwargs):
        raise RuntimeError("the engine's prepared weights (folded, merged, packed) are not a checkpoint: save the "
                           "source model (model.state_dict() or model.save_pretrained(folder))")

    def load_state_dict(self, *args, **kwargs):
        raise RuntimeError("the engine's weights are prepared from a model once: load the weights into the source "
                           "model, then build a new engine with segformer_fast.optimize(model)")


def _copy_to(reference: Segformer, dtype: torch.dtype) -> Segformer:
    """An eval-mode copy of ``reference`` in ``dtype`` on its device (the caller's model is never run or changed)."""
    copy = Segformer(reference.config).to(reference.device)
    copy.load_state_dict(reference.state_dict())
    return copy.to(dtype).eval()


def optimize(model, *, dtype=None, kernels="auto", cuda_graphs=True, verify=True, graph_cache_size=8):
    """The fastest correct SegFormer for ``model``'s device: a :class:`SegformerEngine`.

    model: a ``segformer_fast.Segformer`` or a transformers ``SegformerForSemanticSegmentation`` (its weights are
    read, never modified; a model in train() mode is neither run in train mode nor switched to eval: the engine and
    its verification use an eval-mode copy, so BatchNorm statistics and the training flag stay as they were).
    NaN or Inf in the model's weights raise ValueError naming the tensors. dtype: the compute dtype (default: the
    model's, for transformers models too; an fp32 engine runs without TF32, see the module docstring).
    kernels: "auto" (Triton on CUDA, torch ops on CPU), "triton" (also on CPU tensors under TRITON_INTERPRET=1),
    "torch", or "eager" (debugging).
    cuda_graphs: replay a CUDA graph per (batch, H, W, dtype), at most ``graph_cache_size`` kept (LRU).
    verify: check the engine against the reference on a random input now (raises VerificationError).
    """
    return SegformerEngine(model, dtype=dtype, kernels=kernels, cuda_graphs=cuda_graphs, verify=verify,
                           graph_cache_size=graph_cache_size)
