"""Export the engine's prepared graph for deployment: ONNX (:func:`export_onnx`) and torch.export
(:func:`export_program`).

Both start from the weights ``optimize`` prepares (decoder fold, attention scale in q, merged k/v, the SR conv as a
patchify GEMM) and rebuild SegFormer's forward from them in :class:`PreparedSegformer`, an ``nn.Module`` of plain
PyTorch ops (:mod:`segformer_fast.torch_ops`):

- ``mode="onnx"``: standard ONNX operators only. LayerNorm statistics and the attention softmax are computed in fp32
  inside fp16 / bf16 graphs (the LayerNorm weights are kept in fp32 for that), so runtimes that run the graph in half
  precision (ONNX Runtime, TensorRT) do not overflow; the decoder tail runs in fp32 as the engine's does.
  ``output="labels"`` adds the bilinear upsampling to the input size and the argmax to the graph.
- ``mode="program"``: exactly the engine's ``kernels="torch"`` path, the extension's ``fused_decode`` included as a
  custom op (its fake kernel in :mod:`segformer_fast.ops` lets torch.export trace it).

Every export is verified before it is moved into place: the written file runs on random inputs at sizes other than
the traced one (ONNX in onnxruntime, when installed; the program after ``torch.export.load``) and its output is
compared with the fp32 reference by the tolerance rule (:mod:`segformer_fast.testing`); a disagreement raises
:class:`ExportVerificationError` with the numbers. Files are written to a temporary name and renamed.

Dynamic exports run any batch and any H, W >= ``MIN_ONNX_SIDE`` (29: ONNX) or ``MIN_PROGRAM_SIDE`` (61: program);
static exports run one (B, H, W), of any size.
"""

import copy
import dataclasses
import os
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from . import ops, torch_ops
from .checkpoints import is_transformers_segformer
from .engine import SegformerEngine, VerificationError, optimize
from .fileio import atomic_path
from .model import Segformer
from .prepared import MixFFNParams, NormParams, SRAttentionParams
from .processing import postprocess
from .runtime import parse_dtype
from .testing import max_abs_error, tolerance

#: Opsets written (torch.onnx's TorchScript exporter): 17 brings LayerNormalization, 20 is that exporter's newest.
ONNX_OPSETS = (17, 18, 19, 20)
#: The default: the oldest with LayerNormalization, so the widest range of runtimes (TensorRT >= 8.6) loads it.
DEFAULT_OPSET = 17
OUTPUT_KINDS = ("logits", "labels")
#: Smallest H and W a dynamic ONNX graph runs: the stage grids (H/4, H/8, H/16, H/32 rounded up) reach the SR
#: ratios (8, 4, 2, 1) from 29 on, so no SR conv needs the zero padding smaller grids get.
MIN_ONNX_SIDE = 29
#: Smallest H and W a dynamic program runs: torch.export reasons about size-1 dimensions apart, and from 61 on every
#: SR conv has at least 2 x 2 patches, so one program serves every size. Smaller inputs get torch.export's
#: "Guard failed" error naming the bound.
MIN_PROGRAM_SIDE = 61
#: (B, H, W) of the input a dynamic export is traced with (batch 2: torch.export specializes a batch of 1).
TRACE_SHAPE = (2, 64, 96)
#: (B, H, W) of the random inputs a dynamic export is verified on: none is the traced size.
VERIFY_SHAPES = {"onnx": ((2, 49, 67), (1, 37, 45)), "program": ((1, 67, 91), (2, 62, 75))}


class ExportVerificationError(VerificationError):
    """The exported file's output differs from the reference's beyond the tolerance rule."""


# ----------------------------------------------------------------------------------------------- the graph
def _holder(params):
    """An ``nn.Module`` holding the tensors of a prepared-weights dataclass as buffers (exported as initializers)."""
    module = nn.Module()
    module.params_type = type(params)
    module.static_fields = {}
    for field in dataclasses.fields(params):
        value = getattr(params, field.name)
        if isinstance(value, torch.Tensor):
            module.register_buffer(field.name, value.detach().clone())
        else:
            module.static_fields[field.name] = value
    return module


def _unpack(module):
    """The dataclass of a :func:`_holder` module, its tensors being the module's (traced) buffers."""
    tensors = {name: buffer for name, buffer in module.named_buffers(recurse=False)}
    return module.params_type(**tensors, **module.static_fields)


def _layer_norm_fp32(x, norm: NormParams):
    """LayerNorm over the last dim with fp32 statistics, result in x's dtype.

    Why not torch_ops.layer_norm: in an fp16 graph a runtime may compute E[x²] in fp16, which overflows once
    activations pass ~256 (the TensorRT logits clipped at ±512); the explicit casts make fp32 statistics part of
    the graph for every runtime. The norm's weight and bias are fp32 (see PreparedSegformer).
    """
    return F.layer_norm(x.float(), (norm.weight.shape[0],), norm.weight, norm.bias, norm.eps).to(x.dtype)


def _patches(x_norm, H, W, ratio, for_onnx):
    """The SR conv's non-overlapping R x R patches of (B, H*W, C) tokens as (B, rows*cols, R*R*C) GEMM rows.

    As torch_ops.sr_kv, flattened in (ky, kx, c) order, rows = floor(H / R), cols = floor(W / R) (grids smaller
    than R zero-padded to R first: a static export's decision, dynamic ones need H, W >= R). Two spellings,
    because each exporter handles only one: torch.export
    specializes torch_ops' slice to whole patches to the traced size (an identity slice when the traced grid
    divides by R), so the program uses ``unfold``, which takes the same patches for any size; the TorchScript ONNX
    exporter has no dynamic-shape ``unfold``, so the ONNX graph uses the slice, which it records with dynamic sizes.
    """
    batch, _, channels = x_norm.shape
    grid = x_norm.reshape(batch, H, W, channels)
    pad_h, pad_w = max(0, ratio - H), max(0, ratio - W)
    if pad_h or pad_w:  # static exports of grids smaller than R: zero-padded to R first, as torch_ops.sr_kv
        grid = F.pad(grid, (0, 0, 0, pad_w, 0, pad_h))
        H, W = H + pad_h, W + pad_w
    if for_onnx:
        rows, cols = H // ratio, W // ratio
        patches = grid[:, :rows * ratio, :cols * ratio].reshape(batch, rows, ratio, cols, ratio, channels)
        patches = patches.permute(0, 1, 3, 2, 4, 5)
    else:
        patches = grid.unfold(1, ratio, ratio).unfold(2, ratio, ratio)  # (B, rows, cols, C, ky, kx)
        rows, cols = patches.shape[1], patches.shape[2]
        patches = patches.permute(0, 1, 2, 4, 5, 3)
    return patches.reshape(batch, rows * cols, ratio * ratio * channels)


def _sr_kv(x_norm, H, W, params: SRAttentionParams, sr_norm, for_onnx):
    """torch_ops.sr_kv for export: (B, H*W, C) normalized tokens -> kv (B, Nkv, 2C) = [k | v].

    for_onnx: the SR LayerNorm keeps fp32 statistics, with ``sr_norm`` (its fp32 weights); else (program mode) it
    normalizes in the dtype as the engine does.
    """
    kv_tokens = x_norm
    if params.sr_ratio > 1:
        reduced = F.linear(_patches(x_norm, H, W, params.sr_ratio, for_onnx), params.sr_weight, params.sr_bias)
        if not for_onnx:
            kv_tokens = torch_ops.layer_norm(reduced, params.sr_ln_weight, params.sr_ln_bias, params.sr_eps)
        else:
            kv_tokens = _layer_norm_fp32(reduced, sr_norm)
    return F.linear(kv_tokens, params.kv_weight, params.kv_bias)


def _sr_attention(x_norm, residual, H, W, params: SRAttentionParams, sr_norm, for_onnx):
    """torch_ops.sr_attention with :func:`_sr_kv`; (B, H*W, C) normalized tokens -> attention output + residual.

    for_onnx: scaled_dot_product_attention exports as a fused op or a decomposition whose
    softmax runs in the graph's dtype, so the scores are cast to fp32 for the softmax here. Program mode: SDPA as
    the engine runs it.
    """
    batch, tokens, channels = x_norm.shape
    heads, head_dim = params.num_heads, params.head_dim
    q = F.linear(x_norm, params.q_weight, params.q_bias).reshape(batch, tokens, heads, head_dim).transpose(1, 2)
    kv = _sr_kv(x_norm, H, W, params, sr_norm, for_onnx).reshape(batch, -1, 2, heads, head_dim)
    k, v = kv[:, :, 0].transpose(1, 2), kv[:, :, 1].transpose(1, 2)
    if not for_onnx:
        attended = F.scaled_dot_product_attention(q, k, v, scale=1.0)
    else:
        probabilities = torch.softmax((q @ k.transpose(-1, -2)).float(), dim=-1).to(v.dtype)
        attended = probabilities @ v
    return torch_ops.linear(attended.transpose(1, 2).reshape(batch, tokens, channels), params.o_weight,
                            params.o_bias, residual)


class PreparedSegformer(nn.Module):
    """SegFormer's forward on an engine's prepared weights, as a module torch.export and torch.onnx can trace.

    pixel_values (B, 3, H, W) in the weights' dtype -> logits (B, K, ceil(H/4), ceil(W/4)) in that dtype, or with
    ``output="labels"`` labels (B, H, W) (uint8 for up to 256 classes, else int32).
    mode: "onnx" (standard operators, fp32 LayerNorm statistics and softmax, the decoder tail in plain ops) or
    "program" (the engine's torch path with the extension's fused_decode op).
    """

    def __init__(self, engine: SegformerEngine, mode: str, output: str = "logits", device=None):
        super().__init__()
        if mode not in ("onnx", "program"):
            raise ValueError(f"mode must be 'onnx' or 'program', got {mode!r}")
        if output not in OUTPUT_KINDS:
            raise ValueError(f"output must be one of {OUTPUT_KINDS}, got {output!r}")
        self.mode, self.output = mode, output
        self.num_labels = engine.decoder.num_labels
        device = device or engine.device
        # onnx mode: LayerNorm weights in fp32, for the fp32 statistics of _layer_norm_fp32
        norm_dtype = torch.float32 if mode == "onnx" else engine.dtype

        def norm(prepared):
            return _holder(NormParams(prepared.weight.to(device, norm_dtype), prepared.bias.to(device, norm_dtype),
                                 prepared.eps))

        self.stages = nn.ModuleList()
        for prepared in engine.stages:
            stage = nn.Module()
            stage.register_buffer("patch_weight", prepared.patch_weight.detach().to(device).clone())
            stage.register_buffer("patch_bias", prepared.patch_bias.detach().to(device).clone())
            stage.stride, stage.padding = prepared.stride, prepared.padding
            stage.patch_norm, stage.norm = norm(prepared.patch_norm), norm(prepared.norm)
            stage.blocks = nn.ModuleList()
            for block in prepared.blocks:
                held = nn.Module()
                held.norm1, held.norm2 = norm(block.norm1), norm(block.norm2)
                held.attn, held.mlp = _holder(block.attn.to(device=device)), _holder(block.mlp.to(device=device))
                if block.attn.sr_ratio > 1:
                    held.sr_norm = norm(NormParams(block.attn.sr_ln_weight, block.attn.sr_ln_bias, block.attn.sr_eps))
                stage.blocks.append(held)
            self.stages.append(stage)
        decoder = engine.decoder.to(device=device)
        for index, weight in enumerate(decoder.weights):
            self.register_buffer(f"decoder_weight_{index}", weight.detach().clone())
        self.register_buffer("decoder_bias", decoder.bias.detach().clone())
        self.register_buffer("cls_weight", decoder.cls_weight.detach().clone())
        self.register_buffer("cls_bias", decoder.cls_bias.detach().clone())

    def _layer_norm(self, x, norm_module):
        norm = _unpack(norm_module)
        if self.mode == "onnx":
            return _layer_norm_fp32(x, norm)
        return torch_ops.layer_norm(x, norm.weight, norm.bias, norm.eps)

    def _block(self, x, H, W, block):
        attn: SRAttentionParams = _unpack(block.attn)
        mlp: MixFFNParams = _unpack(block.mlp)
        h = self._layer_norm(x, block.norm1)
        sr_norm = _unpack(block.sr_norm) if self.mode == "onnx" and attn.sr_ratio > 1 else None
        x = _sr_attention(h, x, H, W, attn, sr_norm, self.mode == "onnx")
        h = self._layer_norm(x, block.norm2)
        return torch_ops.mixffn(h, H, W, mlp, residual=x)

    def forward(self, pixel_values):
        image = pixel_values
        projected = []
        for index, stage in enumerate(self.stages):
            features = F.conv2d(image, stage.patch_weight, stage.patch_bias, stride=stage.stride,
                                padding=stage.padding)
            batch, channels, height, width = features.shape
            tokens = self._layer_norm(features.flatten(2).transpose(1, 2), stage.patch_norm)
            for block in stage.blocks:
                tokens = self._block(tokens, height, width, block)
            tokens = self._layer_norm(tokens, stage.norm)
            # P_i = F_i W'_i^T at the stage's own resolution, channels-last (B, h_i, w_i, D)
            weight = getattr(self, f"decoder_weight_{index}")
            projected.append(F.linear(tokens, weight).reshape(batch, height, width, -1))
            image = tokens.reshape(batch, height, width, channels).permute(0, 3, 1, 2)
        decode = ops.fused_decode if self.mode == "program" else torch_ops.fused_decode
        logits = decode(*projected, self.decoder_bias, self.cls_weight, self.cls_bias)
        if self.output == "logits":
            return logits
        labels = torch_ops.upsample_argmax(logits.float(), pixel_values.shape[2], pixel_values.shape[3])
        return labels.to(label_dtype(self.num_labels))


def label_dtype(num_labels: int) -> torch.dtype:
    """The dtype of exported label maps: uint8 when the class ids fit, else int32."""
    return torch.uint8 if num_labels <= 256 else torch.int32


# ------------------------------------------------------------------------------------------ model handling
def _engine_and_reference(model, dtype, reference, kernels):
    """(engine with prepared weights in ``dtype``, reference model or None) for whatever the user passed."""
    if isinstance(model, SegformerEngine):
        if dtype is not None and dtype != model.dtype:
            raise ValueError(
                f"the engine computes in {model.dtype} but dtype={dtype} was asked for: pass the model itself, or an "
                f"engine built with optimize(model, dtype={dtype})"
            )
        if reference is not None and not (isinstance(reference, Segformer) or is_transformers_segformer(reference)):
            raise TypeError(f"reference must be a Segformer or a transformers model, got {type(reference).__name__}")
        return model, reference
    if not (isinstance(model, Segformer) or is_transformers_segformer(model)):
        raise TypeError(
            "export takes a segformer_fast.Segformer, a transformers SegformerForSemanticSegmentation or a "
            f"SegformerEngine, got {type(model).__name__}"
        )
    dtype = dtype if dtype is not None else torch.float32
    return optimize(model, dtype=dtype, kernels=kernels, cuda_graphs=False, verify=False), model


def _reference_logits(reference, pixel_values, dtype):
    """The reference's logits for fp32 ``pixel_values``, computed in ``dtype`` (a copy is cast when needed)."""
    device = next(reference.parameters()).device
    model = reference
    if next(reference.parameters()).dtype != dtype:
        model = copy.deepcopy(reference).to(dtype)
    inputs = pixel_values.to(device=device, dtype=dtype)
    with torch.no_grad():
        out = model(pixel_values=inputs).logits if is_transformers_segformer(model) else model(inputs)
    return out.float().cpu()


def _random_pixels(batch, height, width, seed):
    return torch.randn(batch, 3, height, width, generator=torch.Generator().manual_seed(seed))


def _check_against_reference(run, reference, dtype, output, shapes, what):
    """Run ``run`` (fp32 pixels -> output tensor) on random inputs of ``shapes`` and apply the tolerance rule.

    Logits: max abs error <= tolerance(fp32 reference, dtype, eager error of the reference in dtype). Labels: every
    pixel whose upsampled reference logits have a top-2 margin above twice that tolerance (so any logits within
    the tolerance give the same argmax) must have the reference's label. Returns one dict per shape.
    """
    checks = []
    for seed, (batch, height, width) in enumerate(shapes):
        pixels = _random_pixels(batch, height, width, seed)
        expected = _reference_logits(reference, pixels, torch.float32)
        eager_error = 0.0
        if dtype != torch.float32:
            eager_error = max_abs_error(_reference_logits(reference, pixels, dtype), expected)
        allowed = tolerance(expected, dtype, eager_error)
        got = run(pixels)
        check = {"shape": (batch, 3, height, width), "tolerance": allowed, "eager_error": eager_error,
                 "max_abs_reference": float(expected.abs().max())}
        if output == "logits":
            check["max_abs_error"] = max_abs_error(got.float(), expected)
            passed = check["max_abs_error"] <= allowed
            detail = f"max abs error {check['max_abs_error']:.3e} > tolerance {allowed:.3e}"
        else:
            upsampled = F.interpolate(expected, size=(height, width), mode="bilinear", align_corners=False)
            top2 = upsampled.topk(2, dim=1).values
            confident = (top2[:, 0] - top2[:, 1]) > 2 * allowed
            reference_labels = postprocess(expected, (height, width))
            agree = got.long() == reference_labels
            check["confident_mismatches"] = int((confident & ~agree).sum())
            check["agreement"] = float(agree.double().mean())
            passed = check["confident_mismatches"] == 0
            detail = (f"{check['confident_mismatches']} pixels whose reference margin exceeds 2 x tolerance "
                      f"{allowed:.3e} got another label (agreement {check['agreement']:.4%})")
        checks.append(check)
        if not passed:
            raise ExportVerificationError(
                f"{what} disagrees with the reference on a random {check['shape']} input: {detail} (dtype {dtype}, "
                f"eager error {eager_error:.3e}, max |ref| {check['max_abs_reference']:.3e})"
            )
    return checks


def _check_output_path(path, suffixes):
    path = Path(path)
    if path.suffix.lower() not in suffixes:
        raise ValueError(f"output path must end in {' or '.join(suffixes)}, got {str(path)!r}")
    if not path.parent.is_dir():
        raise FileNotFoundError(f"output folder {str(path.parent)!r} does not exist (for {str(path)!r})")
    if path.is_dir():
        raise ValueError(f"output path {str(path)!r} is a folder; expected a file name ending in {suffixes[0]}")
    return path


def _check_size(size):
    if (not isinstance(size, (tuple, list)) or len(size) != 2
            or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 1 for s in size)):
        raise ValueError(f"size must be (H, W) with positive integers, got {size!r}")
    return tuple(size)


def _shapes(dynamic, batch, size, kind):
    """(trace shape, verification shapes) as (B, H, W) tuples for an "onnx" or a "program" export."""
    if dynamic:
        return TRACE_SHAPE, VERIFY_SHAPES[kind]
    if not isinstance(batch, int) or isinstance(batch, bool) or batch < 1:
        raise ValueError(f"batch must be a positive integer, got {batch!r}")
    return (batch, *size), ((batch, *size),)


# ------------------------------------------------------------------------------------------------------ ONNX
def _import_onnx():
    """(onnx, onnxruntime or None): onnx is needed to check the file, onnxruntime only to verify it."""
    try:
        import onnx
    except ImportError as err:
        raise ImportError(f"export_onnx needs the onnx package ({err}): pip install 'segformer-fast[export]'") from None
    try:
        import onnxruntime
    except ImportError:
        onnxruntime = None
    return onnx, onnxruntime


def run_onnx(session, pixel_values: torch.Tensor) -> torch.Tensor:
    """Run an onnxruntime session of an exported file on pixel_values (B, 3, H, W); returns its output as a tensor."""
    (name,) = [graph_input.name for graph_input in session.get_inputs()]
    (result,) = session.run(None, {name: pixel_values.detach().cpu().contiguous().numpy()})
    return torch.from_numpy(result)


def _check_standard_domains(model_proto) -> None:
    """Every node in the default ONNX domain: no custom operator a runtime would need a plugin for."""
    custom = sorted({f"{node.domain}::{node.op_type}" for node in model_proto.graph.node
                     if node.domain not in ("", "ai.onnx")})
    if custom:
        raise RuntimeError(f"the exported graph has non-standard operators: {custom}")


def _write_onnx(graph, example, path, opset, dynamic, output):
    """torch.onnx's TorchScript exporter: it traces in seconds (the dynamo exporter takes minutes per variant on a
    small CPU) and records the shape arithmetic with dynamic sizes."""
    dynamic_axes = None
    if dynamic:
        output_axes = {0: "batch", 1: "height", 2: "width"} if output == "labels" else {
            0: "batch", 2: "logits_height", 3: "logits_width"}
        dynamic_axes = {"pixel_values": {0: "batch", 2: "height", 3: "width"}, output: output_axes}
    with warnings.catch_warnings():
        # The tracer records Python conditions on sizes as constants and says so: torch_ops' (stage grids differ
        # from the stage-1 grid) hold for every H, W >= MIN_ONNX_SIDE, and the verification runs other sizes.
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        torch.onnx.export(graph, (example,), str(path), dynamo=False, opset_version=opset,
                          input_names=["pixel_values"], output_names=[output], dynamic_axes=dynamic_axes)


def export_onnx(model, path, *, dtype=None, opset=DEFAULT_OPSET, dynamic=True, output="logits", size=(512, 512),
                batch=1, verify=True, reference=None):
    """Write the engine's prepared graph as an ONNX file in standard operators, verified, and return a report.

    model: a ``Segformer``, a transformers ``SegformerForSemanticSegmentation`` or a ``SegformerEngine`` (its
    prepared weights are exported; pass ``reference=`` the model it was built from to verify it). dtype: float32
    (default; an engine's own dtype for an engine) or float16, for the graph's input, weights and logits (ONNX's
    Conv has no bfloat16 before opset 22). opset: one of ``ONNX_OPSETS``. dynamic: input ``pixel_values`` (batch,
    3, height, width) of any batch and H, W >= MIN_ONNX_SIDE; else the graph runs (``batch``, 3, *``size``) only.
    output: "logits" (B, K, ceil(H/4), ceil(W/4)) or "labels" (B, H, W): bilinear upsampling to the input size and
    argmax in the graph, uint8 for up to 256 classes, else int32.
    verify: run the file in onnxruntime (if installed; else a warning) on random inputs at sizes other than the
    traced one and raise ExportVerificationError beyond the tolerance rule. The file is written atomically.
    Returns a dict: path, dtype, opset, output, dynamic, checks (per input shape: the max abs error or the label
    agreement, and the tolerance), verified.
    """
    if output not in OUTPUT_KINDS:
        raise ValueError(f"output must be one of {OUTPUT_KINDS}, got {output!r}")
    if isinstance(opset, bool) or opset not in ONNX_OPSETS:
        raise ValueError(f"opset must be one of {ONNX_OPSETS} (17 brings LayerNormalization; 20 is the newest "
                         f"torch.onnx's TorchScript exporter writes), got {opset!r}")
    path = _check_output_path(path, (".onnx",))
    size = _check_size(size)
    dtype = parse_dtype(dtype) if dtype is not None else None
    if dtype == torch.bfloat16 or (dtype is None and getattr(model, "dtype", None) == torch.bfloat16):
        raise ValueError("ONNX export supports float32 and float16: ONNX's Conv has no bfloat16 before opset 22")
    trace_shape, verify_shapes = _shapes(dynamic, batch, size, "onnx")
    onnx, onnxruntime = _import_onnx()
    engine, reference = _engine_and_reference(model, dtype, reference, "eager")
    if verify and reference is None:
        raise ValueError("verify=True needs the reference: pass reference=<the model the engine was built from> "
                         "(or verify=False)")
    dtype = engine.dtype
    graph = PreparedSegformer(engine, "onnx", output, device=torch.device("cpu")).eval()
    example = _random_pixels(*trace_shape, seed=0).to(dtype)
    report = {"path": str(path), "dtype": dtype, "opset": opset, "output": output, "dynamic": dynamic,
              "checks": [], "verified": False}
    with atomic_path(path) as temporary:
        with torch.no_grad():
            _write_onnx(graph, example, temporary, opset, dynamic, output)
        model_proto = onnx.load(str(temporary))
        onnx.checker.check_model(model_proto)
        _check_standard_domains(model_proto)
        if verify and onnxruntime is None:
            warnings.warn(f"onnxruntime is not installed: {path} is written without running it (pip install "
                          "onnxruntime to verify)", RuntimeWarning, stacklevel=2)
        elif verify:
            session = onnxruntime.InferenceSession(str(temporary), providers=["CPUExecutionProvider"])
            report["checks"] = _check_against_reference(
                lambda pixels: run_onnx(session, pixels.to(dtype)), reference, dtype, output, verify_shapes,
                f"the ONNX export ({dtype}, {output}) run in onnxruntime")
            report["verified"] = True
    return report


# -------------------------------------------------------------------------------------------- torch.export
def export_program(model, path, *, dtype=None, dynamic=True, size=(512, 512), batch=1, verify=True,
                   reference=None):
    """Save the engine's torch path as a ``torch.export`` program (``.pt2``), verified, and return a report.

    The program is the engine's ``kernels="torch"`` forward on its prepared weights (the extension's fused_decode
    included as the custom op ``segformer_fast::fused_decode``: ``import segformer_fast`` before
    ``torch.export.load``). model, dtype, reference: as :func:`export_onnx` (any compute dtype; the program runs on
    the model's device). dynamic: any batch and H, W >= MIN_PROGRAM_SIDE; else (``batch``, 3, *``size``) only.
    verify: load the written file back and compare its logits on random inputs at sizes other than the traced one
    with the reference (tolerance rule), raising ExportVerificationError. Load it with :func:`load_program`.
    Returns a dict: path, dtype, dynamic, checks, verified.
    """
    path = _check_output_path(path, (".pt2",))
    size = _check_size(size)
    trace_shape, verify_shapes = _shapes(dynamic, batch, size, "program")
    dtype = parse_dtype(dtype) if dtype is not None else None
    engine, reference = _engine_and_reference(model, dtype, reference, "torch")
    if verify and reference is None:
        raise ValueError("verify=True needs the reference: pass reference=<the model the engine was built from> "
                         "(or verify=False)")
    dtype = engine.dtype
    graph = PreparedSegformer(engine, "program").eval()
    example = _random_pixels(*trace_shape, seed=0).to(device=engine.device, dtype=dtype)
    dynamic_shapes = None
    if dynamic:
        dynamic_shapes = {"pixel_values": {
            0: torch.export.Dim("batch", min=1),
            2: torch.export.Dim("height", min=MIN_PROGRAM_SIDE),
            3: torch.export.Dim("width", min=MIN_PROGRAM_SIDE),
        }}
    with torch.no_grad():
        program = torch.export.export(graph, (example,), dynamic_shapes=dynamic_shapes)
    report = {"path": str(path), "dtype": dtype, "dynamic": dynamic, "checks": [], "verified": False}
    with atomic_path(path) as temporary:
        torch.export.save(program, str(temporary))
        if verify:
            loaded = load_program(temporary)

            def run(pixels):
                with torch.no_grad():
                    return loaded(pixels.to(device=engine.device, dtype=dtype)).float().cpu()

            report["checks"] = _check_against_reference(run, reference, dtype, "logits", verify_shapes,
                                                        f"the torch.export program ({dtype}) loaded back")
            report["verified"] = True
    return report


def load_program(path) -> nn.Module:
    """A program saved by :func:`export_program` as a callable module: pixel_values (B, 3, H, W) -> logits."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no program file at {str(path)!r}")
    return torch.export.load(str(path)).module()
