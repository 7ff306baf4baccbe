"""One-call use of the engine from Python: tag a file as ``streamtag replay --fast`` would, in a plain loop."""

from __future__ import annotations

import dataclasses
import os

import numpy as np

from .engine import StreamStats, StreamTagger, drive
from .events import Event, EventDetector
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
    backend,
    path: str | os.PathLike,
    detector: EventDetector | bool | None = True,
    outputs: tuple[Output, ...] = (),
    **engine_options,
) -> FileResult:
    """Decode ``path`` a block at a time, feed one :class:`StreamTagger` (state cleared first) and collect
    every score and event; ``outputs`` get every step too. No thread: the same steps as ``replay --fast``.
    ``detector``: as :class:`StreamTagger`'s ``events`` (default: the model's own event settings, as replay's;
    ``None`` for scores alone)."""
    feats = backend.config.features
    source = WavReplaySource(path, feats.sample_rate, speed=0, min_samples=feats.hop_length)
    backend.reset_states()
    tagger = StreamTagger(backend, events=detector, **engine_options)
    sink = Collector()
    drive(tagger, source.chunks(), [sink, *outputs])
    for out in outputs:
        out.close()
    return FileResult(sink.probs, sink.events, tagger.stats, source.status.nonfinite_samples, source.error)
