"""KVTC quality per byte on SmolLM2-135M-Instruct (CPU): same as
`lnarize-serve kvtc eval`, kept here with the other benchmark scripts.

    python benchmarks/kvtc_eval.py --out-dir bench-results/kvtc [--contexts 8 ...]
"""

import sys

from lnarize_serve.cli import main

if __name__ == "__main__":
    sys.exit(main(["kvtc", "eval", *sys.argv[1:]]))
