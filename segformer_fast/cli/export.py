"""``segformer-fast export``: the folded, verified graph as ONNX and/or a torch.export program. Every option and
both paths are checked (the suffix, an existing folder that can take a new file) before the model is loaded, so a
refusal never follows a written file; SIGTERM, like Ctrl-C, stops it without leaving a temporary file (exit
code 143)."""

from __future__ import annotations

from segformer_fast.cli.common import MODEL_HELP, stop_on_sigterm
from segformer_fast.core.runtime import DTYPES, dtype_name
from segformer_fast.export.onnx import DEFAULT_OPSET, ONNX_OPSETS, export_onnx
from segformer_fast.export.program import MIN_PROGRAM_SIDE, export_program
from segformer_fast.export.verify import check_output_path
from segformer_fast.model.segformer import Segformer

NAME = "export"
#: The dtypes an ONNX file can hold here (ONNX's Conv has no bfloat16 before opset 22; opsets 17-20 are written).
ONNX_DTYPES = ("fp16", "fp32")


def register(commands) -> None:
    parser = commands.add_parser(
        NAME, help="export the folded, verified graph to ONNX and/or torch.export",
        description="Export the engine's prepared graph (decoder fold, attention scale in q, merged k/v) as an ONNX "
                    "file in standard operators and/or a torch.export program (.pt2). Each file is written to a "
                    "temporary name, run and checked against the fp32 reference by the tolerance rule, and only "
                    "then moved into place. Dynamic by default: ONNX takes any batch and size, a .pt2 program any "
                    f"batch and H, W >= {MIN_PROGRAM_SIDE}.")
    parser.add_argument("--model", required=True, help=MODEL_HELP)
    parser.add_argument("--onnx", metavar="PATH", help="write an ONNX file (.onnx)")
    parser.add_argument("--pt2", metavar="PATH", help="write a torch.export program (.pt2)")
    parser.add_argument("--dtype", default="fp32", choices=sorted(DTYPES),
                        help=f"graph dtype (default fp32; ONNX: {', '.join(ONNX_DTYPES)}; .pt2: all three)")
    parser.add_argument("--opset", type=int, metavar="N",
                        help=f"ONNX opset, {ONNX_OPSETS[0]}..{ONNX_OPSETS[-1]} (default {DEFAULT_OPSET}; --onnx only)")
    parser.add_argument("--labels", action="store_true",
                        help="ONNX output: label maps at the input size (upsample + argmax in the graph)")
    parser.add_argument("--static", nargs=2, type=int, metavar=("H", "W"),
                        help="export for this input size only (default: dynamic batch, height and width)")
    parser.add_argument("--batch", type=int, help="with --static: the batch size (default 1)")
    parser.set_defaults(func=run)


def check_arguments(args) -> None:
    """Every refusal of ``export``, before anything is loaded or written (ValueError, FileNotFoundError)."""
    if not args.onnx and not args.pt2:
        raise ValueError("export needs --onnx PATH and/or --pt2 PATH")
    if args.labels and not args.onnx:
        raise ValueError("--labels applies to --onnx only (a .pt2 program returns logits)")
    if args.opset is not None and not args.onnx:
        raise ValueError("--opset applies to --onnx only")
    if args.opset is not None and args.opset not in ONNX_OPSETS:
        raise ValueError(f"--opset must be one of {', '.join(map(str, ONNX_OPSETS))} (17 brings LayerNormalization; "
                         f"20 is the newest the exporter writes), got {args.opset}")
    if args.onnx and args.dtype not in ONNX_DTYPES:
        raise ValueError(f"--onnx takes --dtype {' or '.join(ONNX_DTYPES)}, not {args.dtype} (ONNX's Conv has no "
                         f"bfloat16 before opset 22){'; export the .pt2 alone for bf16' if args.pt2 else ''}")
    if args.batch is not None and args.static is None:
        raise ValueError("--batch applies to --static only (a dynamic export takes any batch)")
    if args.batch is not None and args.batch < 1:
        raise ValueError(f"--batch must be a positive integer, got {args.batch}")
    if args.static is not None and min(args.static) < 1:
        raise ValueError(f"--static takes a positive H and W, got {args.static[0]} {args.static[1]}")
    for path, suffix in ((args.onnx, ".onnx"), (args.pt2, ".pt2")):
        if path:
            check_output_path(path, (suffix,))


def run(args) -> int:
    check_arguments(args)
    shape = {"dynamic": args.static is None}
    if args.static:
        shape.update(size=tuple(args.static), batch=1 if args.batch is None else args.batch)
    with stop_on_sigterm():
        model = Segformer.from_pretrained(args.model)
        reports = []
        if args.onnx:
            reports.append(("onnx", export_onnx(model, args.onnx, dtype=args.dtype, opset=args.opset or DEFAULT_OPSET,
                                                output="labels" if args.labels else "logits", **shape)))
        if args.pt2:
            reports.append(("pt2", export_program(model, args.pt2, dtype=args.dtype, **shape)))
    for kind, report in reports:
        if not report["dynamic"]:
            sizes = "static"
        else:
            sizes = "any batch and size" if kind == "onnx" else f"any batch, H and W >= {MIN_PROGRAM_SIDE}"
        print(f"wrote {report['path']} ({dtype_name(report['dtype'])}, {sizes})")
        if not report["verified"]:
            print("  not verified: onnxruntime is not installed")
        for check in report["checks"]:
            measured = (f"max abs error {check['max_abs_error']:.3e}" if "max_abs_error" in check else
                        f"label agreement {check['agreement']:.4%}, {check['confident_mismatches']} clear mismatches")
            print(f"  verified on {check['shape']}: {measured}, tolerance {check['tolerance']:.3e}")
    return 0
