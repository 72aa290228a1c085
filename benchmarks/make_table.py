"""Render a model-benchmark results JSON (benchmarks/results/*.json) as a markdown table for the README.

    python benchmarks/make_table.py benchmarks/results/nvidia-h200-2026-11-21.json [--out table.md]
"""

import argparse
import json
import sys
from pathlib import Path

from segformer_fast.bench import SCHEMA, render_markdown
from segformer_fast.fileio import atomic_write_text


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("results", type=Path, nargs="+", help="results JSON file(s) written by bench_model.py")
    parser.add_argument("--out", type=Path, help="write the markdown here instead of printing it")
    args = parser.parse_args(argv)
    parts = []
    for path in args.results:
        try:
            results = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as err:
            parser.error(f"cannot read {path}: {err}")
        if not isinstance(results, dict) or results.get("schema") != SCHEMA:
            parser.error(f"{path} is not a model-benchmark results file (expected schema {SCHEMA!r})")
        parts.append(render_markdown(results))
    text = "\n".join(parts)
    if args.out:
        atomic_write_text(args.out, text)
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
