"""torch.export (:func:`export_program`, :func:`load_program`): the engine's ``kernels="torch"`` forward on its
prepared weights (``export.graph``, mode "program") saved as a ``.pt2`` program, verified after loading it back.

Dynamic programs run any batch and any H, W >= ``MIN_PROGRAM_SIDE``; static ones run one (B, H, W), of any size.
"""

import os

import torch
from torch import nn

from segformer_fast.core.fileio import atomic_path
from segformer_fast.core.runtime import parse_dtype
from segformer_fast.export.graph import PreparedSegformer
from segformer_fast.export.verify import (
    check_against_reference,
    check_output_path,
    check_size,
    engine_and_reference,
    random_pixels,
    shapes,
)

#: Smallest H and W a dynamic program runs: torch.export reasons about size-1 dimensions apart, and from 61 on every
#: SR conv has at least 2 x 2 patches, so one program serves every size. Smaller inputs get torch.export's
#: "Guard failed" error naming the bound.
MIN_PROGRAM_SIDE = 61


def export_program(model, path, *, dtype=None, dynamic=True, size=(512, 512), batch=1, verify=True,
                   reference=None):
    """Save the engine's torch path as a ``torch.export`` program (``.pt2``), verified, and return a report.

    The program is the engine's ``kernels="torch"`` forward on its prepared weights (the extension's fused_decode
    included as the custom op ``segformer_fast::fused_decode``: :func:`load_program` registers it, and
    ``import segformer_fast.ops.extension`` does before a plain ``torch.export.load``). model, dtype, reference:
    as :func:`export_onnx` (any compute dtype; the program runs on the model's device). dynamic: any batch and
    H, W >= MIN_PROGRAM_SIDE; else (``batch``, 3, *``size``) only.
    verify: load the written file back and compare its logits on random inputs at sizes other than the traced one
    with the reference (tolerance rule), raising ExportVerificationError. Load it with :func:`load_program`.
    Returns a dict: path, dtype, dynamic, checks, verified.
    """
    path = check_output_path(path, (".pt2",))
    size = check_size(size)
    trace_shape, verify_shapes = shapes(dynamic, batch, size, "program")
    dtype = parse_dtype(dtype) if dtype is not None else None
    engine, reference = engine_and_reference(model, dtype, reference, "torch")
    if verify and reference is None:
        raise ValueError("verify=True needs the reference: pass reference=<the model the engine was built from> "
                         "(or verify=False)")
    dtype = engine.dtype
    graph = PreparedSegformer(engine, "program").eval()
    example = random_pixels(*trace_shape, seed=0).to(device=engine.device, dtype=dtype)
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

            report["checks"] = check_against_reference(run, reference, dtype, "logits", verify_shapes,
                                                        f"the torch.export program ({dtype}) loaded back")
            report["verified"] = True
    return report


def load_program(path) -> nn.Module:
    """A program saved by :func:`export_program` as a callable module: pixel_values (B, 3, H, W) -> logits.

    Inputs outside the shapes the program was exported for (a static program's one shape, a dynamic program's
    H, W >= MIN_PROGRAM_SIDE) raise ValueError naming the bound, before torch's shape guards would."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no program file at {str(path)!r}")
    exported = torch.export.load(str(path))
    return CheckedProgram(exported.module(), _input_bounds(exported))


def _input_bounds(exported) -> list | None:
    """Per dimension of the program's one input, (lowest, highest) size it accepts (highest None: unbounded), or
    None where the program's input cannot be read (then torch's guards alone check it)."""
    try:
        (name,) = exported.graph_signature.user_inputs
        (node,) = [node for node in exported.graph.nodes if node.op == "placeholder" and node.name == name]
        bounds = []
        for size in node.meta["val"].shape:
            if isinstance(size, int):
                bounds.append((size, size))
                continue
            ranges = exported.range_constraints[size.node.expr]
            bounds.append((int(ranges.lower), _finite_int(ranges.upper)))
        return bounds
    except (KeyError, ValueError, TypeError, AttributeError):
        return None


def _finite_int(bound) -> int | None:
    """A range bound as an int, None for torch's integer infinity (which cannot be converted)."""
    try:
        return int(bound)
    except (TypeError, ValueError, AttributeError, OverflowError):
        return None


class CheckedProgram(nn.Module):
    """A loaded program behind a shape check with a plain message (torch's own is "Guard failed ...")."""

    def __init__(self, program: nn.Module, bounds: list | None):
        super().__init__()
        self.program, self.bounds = program, bounds

    def forward(self, pixel_values):
        if self.bounds is not None:
            _check_shape(tuple(pixel_values.shape), self.bounds)
        return self.program(pixel_values)


def _check_shape(shape: tuple, bounds: list) -> None:
    """ValueError naming the bound when ``shape`` is outside the (lowest, highest) bounds of each dimension."""
    if len(shape) != len(bounds):
        raise ValueError(f"the program takes pixel_values of {len(bounds)} dimensions (B, 3, H, W), got shape {shape}")
    if all(low == high for low, high in bounds) and shape != tuple(low for low, _ in bounds):
        raise ValueError(f"this program was exported for input shape {tuple(low for low, _ in bounds)} only (a static "
                         f"export), got {shape}; export with dynamic=True for other sizes")
    for name, size, (lowest, highest) in zip(("batch", "channels", "height", "width"), shape, bounds):
        if lowest <= size and (highest is None or size <= highest):
            continue
        limit = f"at least {lowest}" if highest is None else (
            f"{lowest}" if lowest == highest else f"between {lowest} and {highest}")
        raise ValueError(f"the program takes a {name} of {limit} (got shape {shape}); pad smaller images or use the "
                         "engine or an ONNX export, which take any size")
