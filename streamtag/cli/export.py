"""``streamtag export``: write a model's hop step (and chunk step) as ONNX for deployment elsewhere."""

from __future__ import annotations

import sys
from pathlib import Path

from ..errors import ConfigError
from ..outputs.files import check_output_path


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "export",
        help="export a model's streaming step to ONNX",
        description="Export the hop step (features, model step, probabilities; audio context and state as "
        "explicit inputs and outputs, dynamic batch) to ONNX, and with --chunk-onnx the chunk step (the same "
        "state, up to 128 hops in one call: what files and fast replay run). Writing them as DIR/model.onnx and "
        "DIR/chunk.onnx makes every later run of that model skip the export.",
    )
    p.add_argument("model", nargs="?", metavar="MODEL", help="model folder (default: the bundled model)")
    p.add_argument("--onnx", metavar="OUT", help="output path of the hop step (its folder must exist)")
    p.add_argument("--chunk-onnx", metavar="OUT", help="output path of the chunk step (its folder must exist)")
    p.set_defaults(handler=run)


def run(args) -> int:
    if not (args.onnx or args.chunk_onnx):
        raise ConfigError("nothing to write: give --onnx OUT, --chunk-onnx OUT or both")
    from ..modelfile import resolve_model_dir

    folder = resolve_model_dir(args.model).resolve()
    chosen: dict[Path, str] = {}
    for flag, path, own in (("--onnx", args.onnx, "model.onnx"), ("--chunk-onnx", args.chunk_onnx, "chunk.onnx")):
        if not path:
            continue
        check_output_path(path, flag)  # its folder must exist: nothing is created
        real = Path(path).resolve()
        if real in chosen:
            raise ConfigError(f"{flag} {path} is also {chosen[real]}: give each graph a file of its own")
        chosen[real] = flag
        if real.parent == folder and real.name != own and real.name in ("model.onnx", "chunk.onnx"):
            raise ConfigError(f"{flag} writes the {own} of a model folder: name it {own} there, not {real.name}")
        if real.parent == folder and real.name != own and real.exists():  # the model's weights, config, ...
            raise ConfigError(f"{flag} {path} would replace the model's own {real.name}; write it elsewhere")
    from ..models.export import export_chunk_onnx, export_onnx

    for path, export in ((args.onnx, export_onnx), (args.chunk_onnx, export_chunk_onnx)):
        if path:
            print(f"wrote {export(args.model, path)}")
    elsewhere = [p for p in chosen if p.parent != folder]
    if elsewhere:  # for another runtime; streamtag itself runs a graph from its model's folder
        print(
            f"note: to run {elsewhere[0].name} with streamtag, put it, named model.onnx (chunk.onnx for the chunk "
            f"step), in a copy of {folder} (its config.json and model.safetensors)",
            file=sys.stderr,
        )
    return 0
