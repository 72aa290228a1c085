"""What every export shares: the inputs it takes, and the check of the written file against the reference.

Every export is verified before it is moved into place: the written file runs on random inputs at sizes other than
the traced one and its output is compared with the fp32 reference by the tolerance rule
(:mod:`segformer_fast.core.numerics`); a disagreement raises :class:`ExportVerificationError` with the numbers.
"""

import copy
from pathlib import Path

import torch
import torch.nn.functional as F

from segformer_fast.core.fileio import check_can_create
from segformer_fast.core.numerics import max_abs_error, tolerance
from segformer_fast.engine.engine import SegformerEngine, VerificationError, optimize
from segformer_fast.inference.processing import postprocess
from segformer_fast.model.checkpoints import is_transformers_segformer
from segformer_fast.model.segformer import Segformer

#: (B, H, W) of the input a dynamic export is traced with (batch 2: torch.export specializes a batch of 1).
TRACE_SHAPE = (2, 64, 96)
#: (B, H, W) of the random inputs a dynamic export is verified on: none is the traced size.
#: The ONNX graph is also checked below 29 px, where stage grids are smaller than the SR ratios (padded in the graph).
VERIFY_SHAPES = {"onnx": ((2, 49, 67), (1, 37, 45), (1, 17, 23)), "program": ((1, 67, 91), (2, 62, 75))}


class ExportVerificationError(VerificationError):
    """The exported file's output differs from the reference's beyond the tolerance rule."""


def engine_and_reference(model, dtype, reference, kernels):
    """(engine with prepared weights in ``dtype``, reference model or None) for whatever the user passed."""
    if isinstance(model, SegformerEngine):
        if dtype is not None and dtype != model.dtype:
            raise ValueError(
                f"the engine computes in {model.dtype} but dtype={dtype} was asked for: pass the model itself, or an "
                f"engine built with optimize(model, dtype={dtype})"
            )
        if reference is not None and not (isinstance(reference, Segformer) or is_transformers_segformer(reference)):
            raise TypeError(f"reference must be a Segformer or a transformers model, got {type(reference).__name__}")
        return model, _as_reference(reference)
    if not (isinstance(model, Segformer) or is_transformers_segformer(model)):
        raise TypeError(
            "export takes a segformer_fast.Segformer, a transformers SegformerForSemanticSegmentation or a "
            f"SegformerEngine, got {type(model).__name__}"
        )
    dtype = dtype if dtype is not None else torch.float32
    return optimize(model, dtype=dtype, kernels=kernels, cuda_graphs=False, verify=False), _as_reference(model)


def _as_reference(model):
    """What an export is checked against: a transformers model as the reference ``Segformer`` with its weights (an
    fp32 eval copy, equal to it within 1e-5 x max |logits|, which also runs the inputs under 29 px a dynamic export
    is verified at, where transformers raises); a ``Segformer`` itself when in eval mode, else an eval-mode copy.
    The caller's model is never run in train mode or changed (its training flag, its BatchNorm statistics)."""
    if model is not None and is_transformers_segformer(model):
        return Segformer.from_transformers(model)
    if model is None or not any(module.training for module in model.modules()):
        return model
    return copy.deepcopy(model).eval()


def check_output_path(path, suffixes):
    path = Path(path)
    if path.suffix.lower() not in suffixes:
        raise ValueError(f"output path must end in {' or '.join(suffixes)}, got {str(path)!r}")
    if not path.parent.is_dir():
        what = "is a file, not a folder" if path.parent.exists() else "does not exist (export creates no folders)"
        raise FileNotFoundError(f"output folder {str(path.parent)!r} {what} (for {str(path)!r})")
    if path.is_dir():
        raise ValueError(f"output path {str(path)!r} is a folder; expected a file name ending in {suffixes[0]}")
    check_can_create(path.parent, f"the export {path} in")
    return path


def check_size(size):
    if (not isinstance(size, (tuple, list)) or len(size) != 2
            or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 1 for s in size)):
        raise ValueError(f"size must be (H, W) with positive integers, got {size!r}")
    return tuple(size)


def shapes(dynamic, batch, size, kind):
    """(trace shape, verification shapes) as (B, H, W) tuples for an "onnx" or a "program" export."""
    if dynamic:
        return TRACE_SHAPE, VERIFY_SHAPES[kind]
    if not isinstance(batch, int) or isinstance(batch, bool) or batch < 1:
        raise ValueError(f"batch must be a positive integer, got {batch!r}")
    return (batch, *size), ((batch, *size),)


def reference_logits(reference, pixel_values, dtype):
    """The reference ``Segformer``'s logits for fp32 ``pixel_values``, computed in ``dtype`` (a copy is cast when
    needed)."""
    device = next(reference.parameters()).device
    model = reference
    if next(reference.parameters()).dtype != dtype:
        model = copy.deepcopy(reference).to(dtype)
    inputs = pixel_values.to(device=device, dtype=dtype)
    with torch.no_grad():
        return model(inputs).float().cpu()


def random_pixels(batch, height, width, seed):
    return torch.randn(batch, 3, height, width, generator=torch.Generator().manual_seed(seed))


def check_against_reference(run, reference, dtype, output, shapes, what):
    """Run ``run`` (fp32 pixels -> output tensor) on random inputs of ``shapes`` and apply the tolerance rule.

    Logits: max abs error <= tolerance(fp32 reference, dtype, eager error of the reference in dtype). Labels: every
    pixel whose upsampled reference logits have a top-2 margin above twice that tolerance (so any logits within
    the tolerance give the same argmax) must have the reference's label. Returns one dict per shape.
    """
    checks = []
    for seed, (batch, height, width) in enumerate(shapes):
        pixels = random_pixels(batch, height, width, seed)
        expected = reference_logits(reference, pixels, torch.float32)
        eager_error = 0.0
        if dtype != torch.float32:
            eager_error = max_abs_error(reference_logits(reference, pixels, dtype), expected)
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
