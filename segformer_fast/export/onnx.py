"""ONNX export (:func:`export_onnx`): the engine's prepared graph in standard operators (``export.graph``, mode
"onnx"), written atomically and verified in onnxruntime before it is moved into place.

Dynamic exports run any batch and any H, W (stage grids smaller than an SR ratio are zero-padded in the graph, as
the reference pads them); static exports run one (B, H, W).
"""

import warnings

import torch

from segformer_fast.core.fileio import atomic_path
from segformer_fast.core.runtime import parse_dtype
from segformer_fast.export.graph import OUTPUT_KINDS, PreparedSegformer
from segformer_fast.export.verify import (
    check_against_reference,
    check_output_path,
    check_size,
    engine_and_reference,
    random_pixels,
    shapes,
)

#: Opsets written (torch.onnx's TorchScript exporter): 17 brings LayerNormalization, 20 is that exporter's newest.
ONNX_OPSETS = (17, 18, 19, 20)
#: The default: the oldest with LayerNormalization, so the widest range of runtimes (TensorRT >= 8.6) loads it.
DEFAULT_OPSET = 17
#: What the exporter says of each strided Slice (step > 1) it leaves in the graph instead of folding it into a
#: constant: the Slice runs at inference, in the graph the verification runs, so the note says nothing about the file.
CONSTANT_FOLDING_NOTE = "Constant folding - Only steps=1 can be constant folded"


def _import_onnx():
    """(onnx, onnxruntime or None): onnx is needed to check the file, onnxruntime only to verify it."""
    try:
        import onnx
    except ImportError as err:
        raise ImportError(f"export_onnx needs the onnx package ({err}): pip install onnx onnxruntime") from None
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
        # The tracer records Python conditions on sizes as constants and says so. The ops' one (a stage grid
        # differs from the stage-1 grid) holds unless H and W are both <= 4, where every grid is 1 x 1 and the
        # recorded resize is an identity; the verification runs other sizes, one below the SR ratios' reach.
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", message=CONSTANT_FOLDING_NOTE, category=UserWarning)
        torch.onnx.export(graph, (example,), str(path), dynamo=False, opset_version=opset,
                          input_names=["pixel_values"], output_names=[output], dynamic_axes=dynamic_axes)


def export_onnx(model, path, *, dtype=None, opset=DEFAULT_OPSET, dynamic=True, output="logits", size=(512, 512),
                batch=1, verify=True, reference=None):
    """Write the engine's prepared graph as an ONNX file in standard operators, verified, and return a report.

    model: a ``Segformer``, a transformers ``SegformerForSemanticSegmentation`` or a ``SegformerEngine`` (its
    prepared weights are exported; pass ``reference=`` the model it was built from to verify it). dtype: float32
    (default; an engine's own dtype for an engine) or float16, for the graph's input, weights and logits (ONNX's
    Conv has no bfloat16 before opset 22). opset: one of ``ONNX_OPSETS``. dynamic: input ``pixel_values`` (batch,
    3, height, width) of any batch and any H, W; else the graph runs (``batch``, 3, *``size``) only.
    output: "logits" (B, K, ceil(H/4), ceil(W/4)) or "labels" (B, H, W): bilinear upsampling to the input size and
    argmax in the graph, uint8 for up to 256 classes, else int32.
    verify: run the file in onnxruntime (if installed; else a warning) on random inputs at sizes other than the
    traced one and raise ExportVerificationError beyond the tolerance rule. The file is written atomically.
    Returns a dict: path, dtype, opset, output, dynamic, checks (per input shape: the max abs error or the label
    agreement, and the tolerance), verified.
    """
    if output not in OUTPUT_KINDS:
        raise ValueError(f"output must be one of {OUTPUT_KINDS}, got {output!r}")
    if type(opset) is not int or opset not in ONNX_OPSETS:  # 17.0 == 17 and True == 1: both refused
        raise ValueError(f"opset must be one of {ONNX_OPSETS} (17 brings LayerNormalization; 20 is the newest "
                         f"torch.onnx's TorchScript exporter writes), got {opset!r}")
    path = check_output_path(path, (".onnx",))
    size = check_size(size)
    dtype = parse_dtype(dtype) if dtype is not None else None
    if dtype == torch.bfloat16 or (dtype is None and getattr(model, "dtype", None) == torch.bfloat16):
        raise ValueError("ONNX export supports float32 and float16: ONNX's Conv has no bfloat16 before opset 22")
    trace_shape, verify_shapes = shapes(dynamic, batch, size, "onnx")
    onnx, onnxruntime = _import_onnx()
    engine, reference = engine_and_reference(model, dtype, reference, "eager")
    if verify and reference is None:
        raise ValueError("verify=True needs the reference: pass reference=<the model the engine was built from> "
                         "(or verify=False)")
    dtype = engine.dtype
    graph = PreparedSegformer(engine, "onnx", output, device=torch.device("cpu")).eval()
    example = random_pixels(*trace_shape, seed=0).to(dtype)
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
            report["checks"] = check_against_reference(
                lambda pixels: run_onnx(session, pixels.to(dtype)), reference, dtype, output, verify_shapes,
                f"the ONNX export ({dtype}, {output}) run in onnxruntime")
            report["verified"] = True
    return report
