"""One-call use of the engine from Python: tag a file as ``streamtag replay --fast`` would, in a plain loop."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence

import numpy as np

from .backends import Backend
from .engine import ENGINE_OPTIONS, StreamStats, StreamTagger, drive
from .errors import ConfigError
from .events import Event, EventDetector, EventParams
from .sources import WavReplaySource
from .steps import Collector, Output


@dataclasses.dataclass
class FileResult:
    probs: np.ndarray  # (frames, classes)
    events: list[Event]
    stats: StreamStats
    nonfinite_in_file: int = 0  # NaN/Inf samples the file itself held (replaced by 0 when decoded)
    error: str | None = None  # the file was truncated or broke mid-way: the audio before it was tagged


def tag_file(
    backend: Backend,
    path: str | os.PathLike,
    events: EventDetector | EventParams | bool | None = True,
    outputs: Sequence[Output] = (),
    **engine_options,
) -> FileResult:
    """Decode ``path`` a block at a time, feed one :class:`StreamTagger` (a new stream's state) and collect
    every score and event; ``outputs`` get every step too and are closed at the end. No thread: the same
    steps as ``replay --fast``. ``events``: as :class:`StreamTagger`'s (default: the model's own event
    settings, as replay's; ``None`` for scores alone). ``engine_options``: its other options, except
    ``sample_rate`` (a file is read at its own rate and resampled to the model's). The backend holds this
    file's state while it runs: two calls at once (two threads) need a backend each."""
    if "sample_rate" in engine_options:
        raise ConfigError("tag_file reads the file's own sample rate: leave sample_rate out")
    unknown = set(engine_options) - ENGINE_OPTIONS
    if unknown:
        raise ConfigError(f"tag_file takes {', '.join(sorted(ENGINE_OPTIONS))}, not {', '.join(sorted(unknown))}")
    if not hasattr(backend, "config"):
        given = f"{backend!r} given"
        raise ConfigError(f"tag_file takes an open backend, as tag_file(make_backend('onnx'), path) ({given})")
    outputs = list(outputs)  # a generator would be used up by the check
    wrong = [o for o in outputs if not (callable(getattr(o, "write", None)) and callable(getattr(o, "close", None)))]
    if wrong:  # an AttributeError at the first step, after the file was opened
        raise ConfigError(
            f"tag_file's outputs each need write(step) and close(), as streamtag.outputs' do ({wrong[0]!r} given)"
        )
    feats = backend.config.features
    try:  # the outputs are closed however it ends, a file that cannot be opened included
        source = WavReplaySource(path, feats.sample_rate, speed=0, min_samples=feats.hop_length)
        tagger = StreamTagger(backend, events=events, **engine_options)
        sink = Collector()
        drive(tagger, source.chunks(), [sink, *outputs], broke_off=lambda: bool(source.error))
    finally:
        for out in outputs:
            out.close()
    return FileResult(sink.probs, sink.events, tagger.stats, source.status.nonfinite_samples, source.error)
