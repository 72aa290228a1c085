"""Model benchmark: SegFormer runners side by side (reference, transformers, torch.compile, ...).

    python benchmarks/bench_model.py                       # default grid for the device (see benchmarks/README.md)
    python benchmarks/bench_model.py --variants b0,b2 --resolutions ade cityscapes --batch 1 16 --dtype fp16

All the logic lives in segformer_fast.bench (shared with `segformer-fast bench`).
"""

import sys

from segformer_fast.bench import main

if __name__ == "__main__":
    sys.exit(main())
