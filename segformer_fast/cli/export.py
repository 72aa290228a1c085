"""``segformer-fast export``: the folded, verified graph as ONNX and/or a torch.export program. Both paths are
checked (a file name whose folder can take a new file) before the model is loaded."""

from __future__ import annotations

from pathlib import Path

from segformer_fast.cli.common import MODEL_HELP
from segformer_fast.core.fileio import check_can_create, check_output_file
from segformer_fast.core.runtime import DTYPES
from segformer_fast.export.onnx import export_onnx
from segformer_fast.export.program import export_program
from segformer_fast.model.segformer import Segformer

NAME = "export"


def register(commands) -> None:
    parser = commands.add_parser(NAME, help="export the folded, verified graph to ONNX and/or torch.export")
    parser.add_argument("--model", required=True, help=MODEL_HELP)
    parser.add_argument("--onnx", metavar="PATH", help="write an ONNX file (.onnx)")
    parser.add_argument("--pt2", metavar="PATH", help="write a torch.export program (.pt2)")
    parser.add_argument("--dtype", default="fp32", choices=sorted(DTYPES), help="graph dtype (ONNX: fp32, fp16)")
    parser.add_argument("--opset", type=int, default=17, help="ONNX opset, 17..20 (default 17)")
    parser.add_argument("--labels", action="store_true",
                        help="ONNX output: label maps at the input size (upsample + argmax in the graph)")
    parser.add_argument("--static", nargs=2, type=int, metavar=("H", "W"),
                        help="export for this input size only (default: dynamic batch, height and width)")
    parser.add_argument("--batch", type=int, default=1, help="with --static: the batch size (default 1)")
    parser.set_defaults(func=run)


def run(args) -> int:
    if not args.onnx and not args.pt2:
        raise ValueError("export needs --onnx PATH and/or --pt2 PATH")
    if args.labels and not args.onnx:
        raise ValueError("--labels applies to --onnx only (a .pt2 program returns logits)")
    for flag, path in (("--onnx", args.onnx), ("--pt2", args.pt2)):
        if path:
            check_output_file(path, f"{flag} file")
            check_can_create(Path(path).parent, f"{flag} file {path} in")
    shape = {"dynamic": args.static is None}
    if args.static:
        shape.update(size=tuple(args.static), batch=args.batch)
    model = Segformer.from_pretrained(args.model)
    reports = []
    if args.onnx:
        reports.append(export_onnx(model, args.onnx, dtype=args.dtype, opset=args.opset,
                                   output="labels" if args.labels else "logits", **shape))
    if args.pt2:
        reports.append(export_program(model, args.pt2, dtype=args.dtype, **shape))
    for report in reports:
        sizes = "any batch and size" if report["dynamic"] else "static"
        print(f"wrote {report['path']} ({report['dtype']}, {sizes})")
        if not report["verified"]:
            print("  not verified: onnxruntime is not installed")
        for check in report["checks"]:
            measured = (f"max abs error {check['max_abs_error']:.3e}" if "max_abs_error" in check else
                        f"label agreement {check['agreement']:.4%}, {check['confident_mismatches']} clear mismatches")
            print(f"  verified on {check['shape']}: {measured}, tolerance {check['tolerance']:.3e}")
    return 0
