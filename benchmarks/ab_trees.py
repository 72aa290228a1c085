"""Is a refactor slower? The engine of two checkouts of this repository, timed alternately, through the public API.

    python benchmarks/ab_trees.py OLD_TREE NEW_TREE [--variants b0 b2] [--dtypes fp32 bf16] [--rounds 3]

Each (tree, variant, dtype) runs in a fresh process that imports the package from that tree (an editable install
of either is bypassed), builds ``optimize(Segformer.from_config(variant, 150, seed=0), dtype=...)`` and times 22
calls of ``engine(pixels)`` at 512², batch 1, after 3 warm-up calls; rounds alternate old, new, old, new so drift
hits both. Both trees need their extension built in place (``python setup.py build_ext --inplace``). Writes
``results/ab-<cpu>-<date>.json`` (CPU model and ISA, every run's median, the ratio of the medians) and prints it.
"""

import argparse
import datetime
import statistics
import subprocess
import sys
from pathlib import Path

import torch

from bench_common.harness import cpu_isa, device_name, write_json

#: The child: imports segformer_fast from TREE only and prints one median in milliseconds.
CHILD = """
import statistics, sys, time
tree, variant, dtype_name = sys.argv[1:4]
sys.meta_path[:] = [f for f in sys.meta_path if "editable" not in type(f).__module__]
sys.path.insert(0, tree)
import torch, segformer_fast
assert segformer_fast.__file__.startswith(tree), segformer_fast.__file__
dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype_name]
engine = segformer_fast.optimize(segformer_fast.Segformer.from_config(variant, num_labels=150, seed=0).eval(),
                                 dtype=dtype)
pixels = torch.randn(1, 3, 512, 512, generator=torch.Generator().manual_seed(0)).to(dtype)
times = []
with torch.inference_mode():
    for i in range(25):
        start = time.perf_counter()
        engine(pixels)
        if i >= 3:
            times.append(time.perf_counter() - start)
print(statistics.median(times) * 1e3)
"""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("old", type=Path)
    parser.add_argument("new", type=Path)
    parser.add_argument("--variants", nargs="+", default=["b0", "b2"])
    parser.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    runs = {}
    for round_index in range(args.rounds):
        for name, tree in (("old", args.old), ("new", args.new)):
            for variant in args.variants:
                for dtype in args.dtypes:
                    out = subprocess.run([sys.executable, "-c", CHILD, str(tree.resolve()), variant, dtype],
                                         check=True, capture_output=True, text=True).stdout
                    median = float(out.split()[-1])
                    runs.setdefault(f"{variant} {dtype}", {}).setdefault(name, []).append(median)
                    print(f"round {round_index + 1} {name} {variant} {dtype}: {median:.1f} ms")
    rows = [{"setting": key, "old_ms": value["old"], "new_ms": value["new"],
             "new_over_old": statistics.median(value["new"]) / statistics.median(value["old"])}
            for key, value in runs.items()]
    for row in rows:
        print(f"{row['setting']}: new / old = {row['new_over_old']:.3f} (medians of {args.rounds} runs each)")
    cpu = torch.device("cpu")
    document = {"device": device_name(cpu), "cpu_isa": cpu_isa(), "date": datetime.date.today().isoformat(),
                "old": str(args.old), "new": str(args.new), "threads": torch.get_num_threads(), "rows": rows}
    out = args.out or Path(__file__).parent / "results" / f"ab-cpu-{datetime.date.today().isoformat()}.json"
    write_json(out, document)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
