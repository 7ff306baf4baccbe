"""torch -> ONNX export of the hop step, with audio context and model state as explicit I/O."""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import torch

from ..modelfile import FINGERPRINT_KEY, RING_KEY, fingerprint, resolve_model_dir
from .io import load_model
from .step import HopStep, RingHopStep

OPSET = 17


def export_onnx(model_dir: str | os.PathLike | None, out_path: str | os.PathLike) -> Path:
    """Write the hop step of a model folder as ONNX (dynamic batch), tagged with its fingerprint."""
    import onnx

    folder = resolve_model_dir(model_dir)
    cfg, model = load_model(folder)
    step = HopStep(cfg, model, feature_dtype=torch.float32).eval()  # float32: fast MLAS kernels
    lines = model.delay_lines()
    if lines is not None:
        step = RingHopStep(step).eval()
    batch = 2
    state = step.init_state(batch)
    names = step.state_names()
    args = [torch.zeros(batch, cfg.features.hop_length), *state]
    inputs = ["audio", *names]
    outputs = ["probs", *[n + "_out" for n in names]]
    metadata = {FINGERPRINT_KEY: fingerprint(folder)}
    if lines is not None:
        n_lags = len(lines.lags[0])
        args += [
            torch.zeros(lines.frames * batch * len(lines.lags), lines.width),
            torch.zeros(len(lines.lags), batch, n_lags, dtype=torch.long),
        ]
        inputs += ["ring", "ring_taps"]
        outputs += ["ring_rows"]
        metadata[RING_KEY] = json.dumps({"frames": lines.frames, "lags": lines.lags, "width": lines.width})
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_suffix(".tmp")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            step,
            tuple(args),
            str(tmp),
            input_names=inputs,
            output_names=outputs,
            dynamic_axes={
                **{n: {0: "batch"} for n in inputs + outputs},
                "ring": {0: "rows"},
                "ring_taps": {1: "batch"},
            },
            opset_version=OPSET,
            dynamo=False,
        )
    graph = onnx.load(str(tmp))
    for key, value in metadata.items():
        entry = graph.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.save(graph, str(tmp))
    os.replace(tmp, out_path)
    return out_path
