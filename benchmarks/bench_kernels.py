"""Benchmark the fused encoder kernels against what users would run instead, side by side on the same inputs.

Per op (sr_attention, mixffn, layer_norm with residual, patch_embed_layer_norm) and per shape: the Triton
kernel, the eager composition the reference uses (``*_ref(..., upcast=False)``), ``torch.compile`` of that
composition, and for attention ``F.scaled_dot_product_attention`` with separate projections. Where fc2 splits its
4C reduction over the grid (short grids: batch 1 at the small stages), a ``mixffn_fc2`` row times fc2 alone as the
engine launches it (``kernel``: partials + their sum) against its single launch (``kernel-no-split``) and eager.
Reports the median time, TFLOP/s (multiply-add = 2 FLOPs) and GB/s (minimum bytes: each input, weight and output
moved once).

Shapes: a block of every stage of B0 (C = 32, 64, 160, 256) and B5 (C = 64, 128, 320, 512) at 512x512 and 1024x2048,
batch 1, fp16 on CUDA, timed by ``triton.testing.do_bench_cudagraph`` (median of CUDA-graph replays: a single launch
of about 10 µs timed from Python mostly measures the launcher; the engine replays graphs too), falling back to
``do_bench`` where a graph cannot be captured (the row says which). Without a GPU the kernels are not timed (the
Triton CPU interpreter is a correctness tool, not a speed measure): small stage-1 shapes, eager and compiled rows
only, wall clock.

    python benchmarks/bench_kernels.py [--quick] [--out results/kernels.json] [--dtype fp16] [--no-compile]
"""

import argparse
import sys

import torch
import torch.nn.functional as F

from segformer_fast.core.runtime import DTYPES
from segformer_fast.kernels.layernorm import (
    layer_norm,
    layer_norm_ref,
    patch_embed_layer_norm,
    patch_embed_layer_norm_ref,
)
from segformer_fast.kernels.mixffn import (
    mixffn,
    mixffn_fc2,
    mixffn_fc2_launches,
    mixffn_fc2_ref,
    mixffn_flops,
    mixffn_ref,
)
from segformer_fast.kernels.sr_attention import reduced_size, sr_attention, sr_attention_flops, sr_attention_ref
from segformer_fast.prepared.weights import prepare_mixffn_params, prepare_sr_attention_params

from bench_common import (
    console_table,
    device_name,
    do_bench_cudagraph_ms,
    do_bench_ms,
    environment,
    format_number,
    median_ms,
    one_line,
    say,
    write_json,
)

#: (C, heads, sr_ratio) of the four stages of B0 and of B5 (B1-B5 share them).
STAGES = {"B0": [(32, 1, 8), (64, 2, 4), (160, 5, 2), (256, 8, 1)], "B5": [(64, 1, 8), (128, 2, 4), (320, 5, 2),
                                                                          (512, 8, 1)]}


def stage_cases(on_cuda, quick):
    """(variant, resolution, C, heads, R, B, H, W, stage) of one block per stage (stage 1 only on a CPU)."""
    if on_cuda:
        sizes = [("512x512", 128, 128)] + ([] if quick else [("1024x2048", 256, 512)])
        stages = range(4)
    else:
        sizes = [("128x128", 32, 32)] + ([] if quick else [("256x256", 64, 64)])
        stages = range(1)
    return [(variant, res, *STAGES[variant][i][:3], 1, H >> i, W >> i, i + 1)
            for res, H, W in sizes for variant in STAGES for i in stages]


def timer(device, quick):
    """``measure(fn) -> (median ms, method)``: CUDA-graph replays on CUDA (plain do_bench where capture fails),
    wall clock after two warm-up calls on CPU."""
    if device.type == "cuda":
        def measure(fn):
            try:
                return do_bench_cudagraph_ms(fn, rep_ms=30 if quick else 100), "do_bench_cudagraph"
            except Exception:  # noqa: BLE001 - e.g. a baseline that cannot be captured: time it plainly
                torch.cuda.synchronize()
                return do_bench_ms(fn, warmup_ms=10 if quick else 25, rep_ms=50 if quick else 200), "do_bench"
        return measure
    return lambda fn: (median_ms(fn, device, repeats=5 if quick else 20, warmup=2), "wall clock")


TABLE_HEADER = ["op", "variant", "res", "impl", "ms", "TFLOP/s", "GB/s", "status"]


def sdpa_attention(x, residual, H, W, p):
    """Separate projections + ``F.scaled_dot_product_attention`` (what a user would write)."""
    B, N, C = x.shape
    R, nh, d = p.sr_ratio, p.num_heads, p.head_dim
    img = x.transpose(1, 2).reshape(B, C, H, W)
    conv_w = p.sr_weight.reshape(C, R, R, C).permute(0, 3, 1, 2)
    red = F.conv2d(img, conv_w, p.sr_bias, stride=R).flatten(2).transpose(1, 2)
    red = F.layer_norm(red, (C,), p.sr_ln_weight, p.sr_ln_bias, p.sr_eps)
    q = F.linear(x, p.q_weight, p.q_bias).view(B, N, nh, d).transpose(1, 2)
    kv = F.linear(red, p.kv_weight, p.kv_bias).view(B, -1, 2, nh, d)
    o = F.scaled_dot_product_attention(q, kv[:, :, 0].transpose(1, 2), kv[:, :, 1].transpose(1, 2), scale=1.0)
    return residual + F.linear(o.transpose(1, 2).reshape(B, N, C), p.o_weight, p.o_bias)


def build_ops(case, dtype, device):
    """Yield (op, shape string, flops, bytes, {impl: fn}) for one stage's block."""
    variant, res, C, heads, R, B, H, W, stage = case
    N = H * W
    esize = torch.finfo(dtype).bits // 8
    gen = torch.Generator().manual_seed(0)

    def rand(*shape, scale=1.0, shift=0.0):
        return (torch.randn(*shape, generator=gen) * scale + shift).to(device=device, dtype=dtype)

    x, residual = rand(B, N, C), rand(B, N, C)
    lin = [(rand(C, C, scale=C**-0.5), rand(C, scale=0.1)) for _ in range(4)]
    attn_p = prepare_sr_attention_params(
        *[t for pair in lin for t in pair], rand(C, C, R, R, scale=(C * R * R) ** -0.5), rand(C, scale=0.1),
        rand(C, scale=0.1, shift=1.0), rand(C, scale=0.1), 1e-5, heads,
    )
    Hkv, Wkv = reduced_size(H, W, R)
    weights = 4 * C * C + C * C * R * R
    yield ("sr_attention", f"B={B} N={N} Nkv={Hkv * Wkv} C={C} heads={heads} R={R}",
           sr_attention_flops(B, N, C, R, H, W), esize * (3 * B * N * C + weights), {
               "kernel": lambda: sr_attention(x, residual, H, W, attn_p),
               "eager": lambda: sr_attention_ref(x, residual, H, W, attn_p, upcast=False),
               "sdpa": lambda: sdpa_attention(x, residual, H, W, attn_p),
               "compile": ("eager", lambda: sr_attention_ref(x, residual, H, W, attn_p, upcast=False)),
           })

    C4 = 4 * C
    ffn_p = prepare_mixffn_params(rand(C4, C, scale=C**-0.5), rand(C4, scale=0.1), rand(C4, 1, 3, 3, scale=1 / 3),
                                  rand(C4, scale=0.1), rand(C, C4, scale=C4**-0.5), rand(C, scale=0.1))
    yield ("mixffn", f"B={B} N={N} C={C} C4={C4}", mixffn_flops(B, N, C, C4),
           esize * (3 * B * N * C + 2 * B * N * C4 + 2 * C * C4 + 9 * C4), {
               "kernel": lambda: mixffn(x, H, W, ffn_p, residual=residual),
               "eager": lambda: mixffn_ref(x, H, W, ffn_p, residual=residual, upcast=False),
               "compile": ("eager", lambda: mixffn_ref(x, H, W, ffn_p, residual=residual, upcast=False)),
           })

    if mixffn_fc2_launches(B * N, C, C4, dtype)[0].meta["SPLIT"]:
        h = rand(B, N, C4)
        fc2_args = (h, H, W, ffn_p.dw_weight, ffn_p.dw_bias, ffn_p.fc2_weight, ffn_p.fc2_bias)
        yield ("mixffn_fc2", f"B={B} N={N} C={C} C4={C4}", 2 * B * N * (9 * C4 + C4 * C),
               esize * (B * N * C4 + C * C4 + 10 * C4 + C + 2 * B * N * C), {
                   "kernel": lambda: mixffn_fc2(*fc2_args, residual=residual),
                   "kernel-no-split": lambda: mixffn_fc2(*fc2_args, residual=residual, split=False),
                   "eager": lambda: mixffn_fc2_ref(*fc2_args, residual=residual, upcast=False),
               })

    w, b = rand(C, scale=0.1, shift=1.0), rand(C, scale=0.1)
    if stage > 1:  # the patch-embed LayerNorm's NCHW form runs at stage 1 only
        return
    yield ("layer_norm+residual", f"B={B} N={N} C={C}", 8 * B * N * C, esize * 4 * B * N * C, {
        "kernel": lambda: layer_norm(x, w, b, 1e-6, residual=residual),
        "eager": lambda: layer_norm_ref(x, w, b, 1e-6, residual=residual, upcast=False),
        "compile": ("eager", lambda: layer_norm_ref(x, w, b, 1e-6, residual=residual, upcast=False)),
    })
    img = rand(B, C, H, W)
    yield ("patch_embed_layer_norm", f"B={B} C={C} H={H} W={W}", 7 * B * N * C, esize * 2 * B * N * C, {
        "kernel": lambda: patch_embed_layer_norm(img, w, b, 1e-5),
        "eager": lambda: patch_embed_layer_norm_ref(img, w, b, 1e-5, upcast=False),
        "compile": ("eager", lambda: patch_embed_layer_norm_ref(img, w, b, 1e-5, upcast=False)),
    })


def run(args):
    on_cuda = torch.cuda.is_available()
    device = torch.device("cuda" if on_cuda else "cpu")
    dtype = DTYPES[args.dtype] if on_cuda else torch.float32
    measure = timer(device, args.quick)
    note = ("CUDA: triton.testing.do_bench_cudagraph median (CUDA-graph replays; do_bench where capture fails, "
            "per row in 'timing')" if on_cuda else
            "no GPU: kernel rows are skipped (the Triton CPU interpreter is not a speed measure); "
            "eager/compile timed by wall clock, median")
    say(f"device {device_name(device)}, dtype {dtype}, torch {torch.__version__}, threads {torch.get_num_threads()}")
    say(note)
    rows, cells = [], []
    for case in stage_cases(on_cuda, args.quick):
        for op, shape, flops, nbytes, impls in build_ops(case, dtype, device):
            for impl, fn in impls.items():
                row = {"op": op, "variant": case[0], "resolution": case[1], "stage": case[-1], "shape": shape,
                       "impl": impl,
                       "dtype": str(dtype).replace("torch.", ""), "flops": flops, "bytes": nbytes}
                if impl.startswith("kernel") and not on_cuda:
                    row["status"] = "skipped: no GPU (Triton interpreter is not a speed measure)"
                elif impl == "compile" and args.no_compile:
                    row["status"] = "skipped: --no-compile"
                else:
                    try:
                        if impl == "compile":
                            fn = torch.compile(fn[1], dynamic=False)
                        ms, method = measure(fn)
                        row.update(status="ok", timing=method, time_ms=ms, tflops=flops / ms / 1e9,
                                   gbps=nbytes / ms / 1e6)
                    except Exception as exc:  # noqa: BLE001 - a failing baseline must not hide the other rows
                        row["status"] = f"error: {one_line(exc, 200)}"
                rows.append(row)
                ok = row["status"] == "ok"
                cells.append([op, f"{case[0]} s{case[-1]}", case[1], impl, f"{row['time_ms']:.4f}" if ok else "—",
                              f"{row['tflops']:.3f}" if ok else "—", format_number(row.get("gbps"), 1),
                              row["status"]])
                say(f"{op} {case[0]} {case[1]} {impl}: "
                    + (f"{row['time_ms']:.4f} ms" if ok else row["status"]))
            if on_cuda:
                torch.cuda.empty_cache()
    say("")
    say(console_table(TABLE_HEADER, cells, left_columns={0, 1, 2, 3, 7}))
    result = {**environment(device), "threads": torch.get_num_threads(), "quick": args.quick, "note": note,
              "rows": rows}
    if args.out:
        write_json(args.out, result)
        say(f"wrote {args.out}")
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", help="write the results as JSON to this file (atomically)")
    parser.add_argument("--quick", action="store_true", help="fewer shapes and repeats")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp16", help="CUDA dtype (CPU always fp32)")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile rows")
    run(parser.parse_args(argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
