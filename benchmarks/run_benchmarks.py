#!/usr/bin/env python
"""Run the benchmark suite as a script (same code as ``streamtag bench``).

Unlike ``streamtag bench``, which writes a report only with ``--out``, the script writes
``benchmarks/results/bench.json`` next to itself unless ``--out`` is given.
"""

import sys
from pathlib import Path

from streamtag.cli import main

RESULTS = Path(__file__).resolve().parent / "results" / "bench.json"


def bench_argv(argv: list[str]) -> list[str]:
    """``streamtag bench`` arguments: ``argv``, plus ``--out RESULTS`` when it names no report path."""
    if any(arg == "--out" or arg.startswith("--out=") for arg in argv):
        return ["bench", *argv]
    return ["bench", *argv, "--out", str(RESULTS)]


if __name__ == "__main__":
    sys.exit(main(bench_argv(sys.argv[1:])))
