#!/usr/bin/env python
"""The benchmark suite: per-hop latency, cost per stream, batched scale, memory, the silero-vad peer and
whole-process CPU. Prints a Markdown table and writes ``benchmarks/results/bench.json`` (or ``--out``).

    python benchmarks/run_benchmarks.py [--quick] [--out JSON] [--plot PNG] [--backend onnx|torch|both]
                                        [--model DIR] [--mic DEVICE]

silero-vad is compared when installed (``pip install 'streamtag[bench]'``); it is never a dependency of
streamtag itself. ``streamtag bench`` is the short check of whether a machine runs a model in real time.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

RESULTS = Path(__file__).resolve().parent / "results" / "bench.json"


def parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="small run (a few minutes); the tests use it")
    p.add_argument("--out", default=str(RESULTS), help=f"JSON report (default {RESULTS})")
    p.add_argument("--plot", help="save a per-frame latency CDF with the budget marked")
    p.add_argument("--backend", choices=["onnx", "torch", "both"], default="both")
    p.add_argument("--model", help="model folder (default: the bundled model)")
    p.add_argument("--mic", help="also measure end-to-end latency live from this input device")
    return p.parse_args(argv)


def main(argv: list[str]) -> int:
    from streamtag.outputs.files import check_output_path

    args = parse(argv)
    check_output_path(args.out, "--out")
    if args.plot:
        check_output_path(args.plot, "--plot")
    import suite

    backends = ("onnx", "torch") if args.backend == "both" else (args.backend,)
    suite.run(args.quick, args.out, args.plot, backends, args.model, args.mic)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
