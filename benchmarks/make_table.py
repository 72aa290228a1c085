"""Render a model-benchmark results JSON (benchmarks/results/*.json) as a markdown table for the README.

    python benchmarks/make_table.py benchmarks/results/nvidia-h200-2026-11-21.json [--out table.md]
    python benchmarks/make_table.py --only-run results.json      # leave out the rows that were skipped
"""

import argparse
import sys
from pathlib import Path

from segformer_fast.core.fileio import atomic_write_text

from bench_common import SCHEMA, read_json, render_markdown


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("results", type=Path, nargs="+", help="results JSON file(s) written by bench_model.py")
    parser.add_argument("--out", type=Path, help="write the markdown here instead of printing it")
    parser.add_argument("--only-run", action="store_true",
                        help="leave out rows whose runner did not run (status 'skipped'), with one line per reason")
    args = parser.parse_args(argv)
    parts = []
    for path in args.results:
        try:
            results = read_json(path)
        except ValueError as err:
            parser.error(str(err))
        if not isinstance(results, dict) or results.get("schema") != SCHEMA:
            parser.error(f"{path} is not a model-benchmark results file (expected schema {SCHEMA!r})")
        if args.only_run:
            rows = results.get("rows", [])
            skipped = [row for row in rows if row.get("status") == "skipped"]
            results = {**results, "rows": [row for row in rows if row.get("status") != "skipped"]}
            reasons = sorted({f"{row['runner']} {row['dtype']}: {row.get('reason', 'skipped')}" for row in skipped})
            not_run = "".join(f"- not run: {reason}\n" for reason in reasons)
            parts.append(render_markdown(results) + (f"\n{not_run}" if not_run else ""))
        else:
            parts.append(render_markdown(results))
    text = "\n".join(parts)
    if args.out:
        atomic_write_text(args.out, text)
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
