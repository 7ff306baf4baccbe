"""torch -> ONNX export of the hop step and the chunk step, with audio context and model state as explicit I/O.

The hop step (``model.onnx``) is what a live stream runs every 10 ms; the chunk step (``chunk.onnx``) runs
up to :data:`CHUNK_HOPS` hops of a backlog in one call (files, fast replay) on the same state.
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import torch

from ..modelfile import CHUNK_KEY, FINGERPRINT_KEY, RING_KEY, fingerprint, resolve_model_dir
from .io import load_model
from .step import ChunkStep, HopStep, RingHopStep

OPSET = 17
CHUNK_HOPS = 128  # hops per chunk call at most: 1.28 s, past which the per-call cost no longer shows


def export_onnx(model_dir: str | os.PathLike | None, out_path: str | os.PathLike) -> Path:
    """Write the hop step of a model folder as ONNX (dynamic batch), tagged with its fingerprint."""
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
    dynamic = {**{n: {0: "batch"} for n in inputs + outputs}, "ring": {0: "rows"}, "ring_taps": {1: "batch"}}
    return _write(step, args, inputs, outputs, dynamic, metadata, out_path)


def export_chunk_onnx(model_dir: str | os.PathLike | None, out_path: str | os.PathLike) -> Path:
    """Write the chunk step of a model folder as ONNX: dynamic batch and hops (1 to :data:`CHUNK_HOPS`)."""
    folder = resolve_model_dir(model_dir)
    cfg, model = load_model(folder)
    step = ChunkStep(HopStep(cfg, model, feature_dtype=torch.float32), CHUNK_HOPS).eval()
    batch, hops = 2, CHUNK_HOPS
    names = step.state_names()
    args = [torch.zeros(batch, hops * cfg.features.hop_length), *step.init_state(batch)]
    inputs = ["audio", *names]
    outputs = ["probs", *[n + "_out" for n in names]]
    dynamic = {n: {0: "batch"} for n in inputs + outputs}
    dynamic["audio"][1] = "samples"
    dynamic["probs"][1] = "hops"
    metadata = {FINGERPRINT_KEY: fingerprint(folder), CHUNK_KEY: str(CHUNK_HOPS)}
    return _write(step, args, inputs, outputs, dynamic, metadata, out_path)


def _write(step, args, inputs, outputs, dynamic, metadata: dict[str, str], out_path) -> Path:
    import onnx

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
            dynamic_axes=dynamic,
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
