"""One-call use of the streaming pipeline from Python: tag a file as ``streamtag replay --fast`` would."""

from __future__ import annotations

import dataclasses
import os

import numpy as np

from .events import Event, EventDetector
from .sources import WavReplaySource
from .worker import Step, Summary, Worker


class Collector:
    """An output that keeps every step's scores and every event (for tests, eval and notebooks)."""

    def __init__(self) -> None:
        self.rows: list[np.ndarray] = []
        self.events: list[Event] = []

    def write(self, step: Step) -> None:
        if step.has_scores:
            self.rows.append(step.probs)
        self.events.extend(step.events)

    def close(self) -> None:
        pass


@dataclasses.dataclass
class FileResult:
    probs: np.ndarray  # (frames, classes)
    events: list[Event]
    summary: Summary


def tag_file(
    backend,
    path: str | os.PathLike,
    block_size: int | None = None,
    speed: float = 0.0,
    detector: EventDetector | None = None,
    outputs=(),
) -> FileResult:
    """Replay ``path`` through ring, worker and ``backend`` (state reset first); collect all scores and events."""
    feats = backend.config.features
    backend.reset_states()
    if detector is not None:
        detector.reset_states()
    source = WavReplaySource(
        path, feats.sample_rate, block_size=block_size or feats.hop_length, speed=speed, min_samples=feats.hop_length
    )
    sink = Collector()
    worker = Worker(source, backend, [sink, *outputs], detector)
    worker.start()
    worker.join()
    return FileResult(np.stack(sink.rows), sink.events, worker.summary())
