"""``streamtag export``: write a model's hop step as ONNX for deployment elsewhere."""

from __future__ import annotations

from ..outputs.files import check_output_path


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "export",
        help="export a model's streaming step to ONNX",
        description="Export the hop step (features, model step, softmax; audio context and state as explicit "
        "inputs and outputs, dynamic batch) to ONNX. Writing it as DIR/model.onnx makes every later "
        "run of that model skip the export.",
    )
    p.add_argument("model", nargs="?", metavar="MODEL", help="model folder (default: the bundled model)")
    p.add_argument("--onnx", required=True, metavar="OUT", help="output .onnx path (its folder must exist)")
    p.set_defaults(handler=run)


def run(args) -> int:
    check_output_path(args.onnx, "--onnx")  # its folder must exist: nothing is created
    from ..models.export import export_onnx

    path = export_onnx(args.model, args.onnx)
    print(f"wrote {path}")
    return 0
