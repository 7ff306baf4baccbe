"""``streamtag bench``: latency, cost per stream, scale, memory and the silero-vad peer."""

from __future__ import annotations

from ..outputs.files import check_output_path


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "bench",
        help="benchmark per-frame latency, streams per core, memory and a peer",
        description="Measure per-frame compute (p50..max against the frame budget), end-to-end latency through "
        "the worker, batched streams per core, memory over a long replay, and silero-vad side by side "
        "(when installed). Prints a Markdown table; writes a JSON report only with --out.",
    )
    p.add_argument("--quick", action="store_true", help="small run (under a minute); CI uses it")
    p.add_argument("--out", metavar="JSON", help="write the JSON report here (default: nothing is written)")
    p.add_argument("--plot", metavar="PNG", help="save a per-frame latency CDF with the budget marked")
    p.add_argument("--backend", choices=["onnx", "torch", "both"], default="both")
    p.add_argument("--model", metavar="DIR", help="model folder (default: the bundled model)")
    p.add_argument("--mic", metavar="DEVICE", help="also measure end-to-end latency live from this input device")
    p.set_defaults(handler=run)


def run(args) -> int:
    if args.out:  # both paths checked before minutes of measuring
        check_output_path(args.out, "--out")
    if args.plot:
        check_output_path(args.plot, "--plot")
    from ..bench import run as run_bench

    backends = ("onnx", "torch") if args.backend == "both" else (args.backend,)
    run_bench(args.quick, args.out, args.plot, backends, args.model, args.mic)
    return 0
