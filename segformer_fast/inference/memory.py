"""An analytic model of the peak memory of whole-image inference: :func:`estimate_peak_memory_bytes`."""

from __future__ import annotations

import numpy as np
import torch

from segformer_fast.core.runtime import MAX_FUSED_OUT_CHANNELS, parse_dtype
from segformer_fast.inference.windows import resolve_window, window_grid
from segformer_fast.model.config import MLP_RATIO, NUM_HEADS, PATCH_SIZES, SR_RATIOS, VARIANTS

#: Fixed allowance for library workspaces (cuBLAS, cuDNN convolution) and small tensors.
WORKSPACE_BYTES = 32 * 2**20


def _grids(height: int, width: int) -> list[tuple[int, int]]:
    """Stage grids: ceil(H/4) x ceil(W/4) (k7 s4 p3), then ceil(h/2) per stage (k3 s2 p1)."""
    h, w = -(-height // 4), -(-width // 4)
    out = [(h, w)]
    for _ in range(3):
        h, w = -(-h // 2), -(-w // 2)
        out.append((h, w))
    return out


def _parameter_counts(variant: str, num_labels: int) -> dict:
    dims, depths, decoder = VARIANTS[variant]
    encoder = 0
    sr_weights = 0
    for i, (c, depth) in enumerate(zip(dims, depths)):
        c_in = 3 if i == 0 else dims[i - 1]
        r = SR_RATIOS[i]
        encoder += c_in * c * PATCH_SIZES[i] ** 2 + c + 2 * c + 2 * c  # patch conv, patch LN, stage LN
        hidden = MLP_RATIO * c
        block = 2 * c + 4 * (c * c + c) + 2 * c + (c * hidden + hidden) + 10 * hidden + (hidden * c + c)
        if r > 1:
            block += c * c * r * r + c + 2 * c
            sr_weights += depth * c * c * r * r
        encoder += depth * block
    head = sum(c * decoder + decoder for c in dims) + 4 * decoder * decoder + 4 * decoder + decoder * num_labels \
        + num_labels
    folded_head = sum(dims) * decoder + decoder + decoder * num_labels + num_labels
    return {"encoder": encoder, "sr_weights": sr_weights, "head": head, "folded_head": folded_head}


def estimate_peak_memory_bytes(
    variant: str,
    batch: int,
    height: int,
    width: int,
    dtype: torch.dtype | str = torch.float32,
    num_labels: int = 150,
    engine: bool = True,
    *,
    reference: bool = False,
    kernels: str = "triton",
    labels: bool = True,
    workspace_bytes: int = WORKSPACE_BYTES,
    mode: str = "whole",
    crop=None,
    stride=None,
    windows_per_call: int = 1,
    chunk_bytes: int = 64 * 2**20,
) -> int:
    """Peak device memory (bytes) of inference of a (batch, 3, height, width) input, modelled.

    ``mode="whole"`` (default): one forward over the whole image (below). ``mode="slide"``: the engine's streamed
    sliding windows (:func:`slide_labels` with ``crop``, ``stride``, ``windows_per_call``): weights + input + the
    int64 labels + the window logits kept at 1/4 resolution (the window rows that cover a row still to be labelled:
    at most ceil(crop_h / stride_h) + 1 rows of windows, each B K ceil(c_h/4) ceil(c_w/4) float32) + one forward
    over ``windows_per_call`` windows (the whole-image model at the crop size, without its labels) + the label
    pass's working memory, ``chunk_bytes``: the torch label pass's chunk of rows
    (``inference.slide.torch_label_pass``, the pass on CUDA; default 64 MiB), or 0 for the extension's fused CPU
    pass (``ops.extension.slide_argmax``, the engine's on CPU), whose few rows per thread are no tensors. It grows
    with the crop and the image width, not with classes x image area.

    ``engine=True`` (default): the engine (``optimize``) with plain launches; ``kernels`` "triton" (the CUDA
    default) or "torch". ``reference=True`` (or ``engine=False``): the reference ``Segformer``, whose attention
    materializes the N x Nkv score matrix. ``labels``: include the label map of the post-processing (the engine's
    fused ``upsample_argmax``; the reference's ``F.interpolate`` of the logits to full size + argmax).

    The model counts weights plus the largest set of simultaneously live tensors, with s = bytes per element of
    ``dtype``, B = batch, stage grids h_i x w_i (h_1 = ceil(H/4), h_(i+1) = ceil(h_i/2)), N_i = h_i w_i,
    Nkv_i = max(h_i // R_i, 1) max(w_i // R_i, 1) (N_i for R_i = 1), C_i the stage widths, D the decoder width,
    K = num_labels::

        peak = weights + input (3 B H W s) + max(phases) + workspace_bytes (default WORKSPACE_BYTES, 32 MiB)

    Weights: the engine's prepared tensors (encoder + folded decoder; the Triton path keeps the SR convolutions
    twice, as a conv weight and in GEMM layout), the reference's parameters and BatchNorm statistics.

    Engine phases (in stage i the earlier stages' decoder projections B N_j D s, j < i, and the previous stage's
    tokens B N_(i-1) C_(i-1) s are live):

    - patch embed: conv output, its contiguous copy, normalized tokens: 3 B N_i C_i s;
    - attention (Triton): block input, LN1 output, kv (2 B Nkv_i C_i s), output (+ one more B N_i C_i s for
      C_i > 256, where the kernel writes the attention to a temporary before the out projection); torch path:
      block input, LN1, q, SDPA output, its token-major copy, out projection (6 B N_i C_i s) + reduced tokens and
      kv (3 B Nkv_i C_i s); neither materializes the scores;
    - Mix-FFN (Triton): block input, attention output, LN2 output, the 4C-wide fc1 hidden, block output:
      8 B N_i C_i s (dwconv + GELU are fused into fc2's operand load); torch path: the three C-wide tensors plus
      three 4C-wide ones (fc1 hidden, dwconv output, GELU output or its token-major copy): 15 B N_i C_i s;
    - decoder: all four projections B N_j D s, the logits B K N_1 s and the stage-4 tokens;
    - post-processing: logits + int64 labels 8 B H W.

    Reference phases (earlier stage outputs B N_j C_j s are kept for the decoder):

    - attention: block input, LN1 output, q, kv tokens, k, v, plus the scores: ``q k^T`` and its scaled copy, then
      the float32 softmax (and its cast back for 16-bit dtypes): 8 bytes x B heads_i N_i Nkv_i at the peak;
    - Mix-FFN: old and new tokens, LN2 output, fc1 hidden, its (B, 4C, h, w) copy and the dwconv output:
      15 B N_i C_i s;
    - decoder: the four upsampled projections, their concat and the fused map, 9 B N_1 D s, plus the logits;
    - post-processing: the full-resolution logits B K H W s + int64 labels.

    CUDA graphs (the engine's default on CUDA) keep the graph's memory pool and add a copy of the input and of the
    logits; the estimate is for plain launches (``cuda_graphs=False``). Not counted: the caller's model copy when
    it stays on the device next to the engine.
    """
    if engine is False:
        reference = True
    if mode not in ("whole", "slide"):
        raise ValueError(f"mode must be 'whole' or 'slide', got {mode!r}")
    variant = str(variant).lower()
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; expected one of {sorted(VARIANTS)}")
    dtype = parse_dtype(dtype)
    for name, value in (("batch", batch), ("height", height), ("width", width), ("num_labels", num_labels)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if kernels not in ("triton", "torch"):
        raise ValueError(f"kernels must be 'triton' or 'torch', got {kernels!r}")
    if mode == "slide":
        if reference:
            raise ValueError("mode='slide' is modelled for the engine only")
        (crop_h, crop_w), (stride_h, stride_w) = resolve_window(crop, stride)
        crop_h, crop_w = min(crop_h, height), min(crop_w, width)
        window_rows = len({span[:2] for span in window_grid(height, width, (crop_h, crop_w), (stride_h, stride_w))})
        window_cols = len({span[2:] for span in window_grid(height, width, (crop_h, crop_w), (stride_h, stride_w))})
        rows_alive = min(window_rows, -(-crop_h // stride_h) + 1)
        window_logits = batch * num_labels * (-(-crop_h // 4)) * (-(-crop_w // 4)) * 4
        calls = min(windows_per_call, window_rows * window_cols)
        no_workspace = estimate_peak_memory_bytes(variant, batch * calls, crop_h, crop_w, dtype, num_labels,
                                                  kernels=kernels, labels=False, workspace_bytes=0)
        # the window's own input crop counts in its forward; the whole image is held as well
        return int(no_workspace + 3 * batch * height * width * dtype.itemsize + 8 * batch * height * width
                   + rows_alive * window_cols * window_logits + chunk_bytes + workspace_bytes)
    s = dtype.itemsize
    dims, _, decoder = VARIANTS[variant]
    grids = _grids(height, width)
    tokens = [h * w for h, w in grids]
    reduced = [(max(h // r, 1) * max(w // r, 1)) if r > 1 else h * w for (h, w), r in zip(grids, SR_RATIOS)]
    params = _parameter_counts(variant, num_labels)
    pixels = batch * height * width
    input_bytes = 3 * pixels * s
    logits_bytes = batch * num_labels * tokens[0] * s
    phases = []
    if not reference:
        weights = (params["encoder"] + params["folded_head"]
                   + (params["sr_weights"] if kernels == "triton" else 0)) * s
        for i, c in enumerate(dims):
            n, nkv = batch * tokens[i], batch * reduced[i]
            live = sum(batch * tokens[j] * decoder for j in range(i)) * s
            if i:
                live += batch * tokens[i - 1] * dims[i - 1] * s
            if kernels == "triton":
                attention = 3 * n * c + 2 * nkv * c + (n * c if c > MAX_FUSED_OUT_CHANNELS else 0)
                mixffn = 8 * n * c
            else:
                attention = 6 * n * c + 3 * nkv * c
                mixffn = 15 * n * c
            phases.append(live + s * max(3 * n * c, attention, mixffn, n * (c + decoder)))
        phases.append(sum(batch * t * decoder for t in tokens) * s + logits_bytes + batch * tokens[3] * dims[3] * s)
        if labels:
            phases.append(logits_bytes + 8 * pixels)
    else:
        weights = (params["encoder"] + params["head"]) * s
        kept = 0
        for i, c in enumerate(dims):
            n, nkv = batch * tokens[i], batch * reduced[i]
            live = kept  # the previous stage's output is the last of them
            scores = 8 * NUM_HEADS[i] * n * reduced[i]
            attention = s * (3 * n * c + 3 * nkv * c) + scores
            mixffn = s * 15 * n * c
            phases.append(live + max(attention, mixffn, 2 * s * n * c))
            kept += batch * tokens[i] * c * s
        phases.append(kept + 9 * batch * tokens[0] * decoder * s + logits_bytes)
        if labels:
            phases.append(logits_bytes + batch * num_labels * height * width * s + 8 * pixels)
    return int(weights + input_bytes + max(phases) + workspace_bytes)
