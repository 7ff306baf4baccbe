"""What an engine hands its outputs: one :class:`Step` per hop, and the :class:`Output` protocol.

Kept apart from the engine and the worker so that an output (a file writer, the live
view, a network sink) imports only what it is given, never the loop that feeds it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Protocol

import numpy as np

from .events import Event


@dataclasses.dataclass
class Step:
    """One hop's result. ``probs`` is owned by the step (outputs may keep it)."""

    frame_index: int
    t: float  # stream time at the end of the hop, seconds
    probs: np.ndarray
    events: list[Event]
    labels: Sequence[str]
    frame_seconds: float = 0.01
    audio: np.ndarray | None = None  # the hop's samples at the model rate, after the gain (owned)

    @property
    def onset(self) -> float:
        """Stream time at the start of the hop."""
        return self.t - self.frame_seconds

    @property
    def has_scores(self) -> bool:
        """False for the event-only steps sent when a stream ends or resets."""
        return self.probs.size > 0


class Output(Protocol):
    """Gets every step; decides itself what to show or write."""

    def write(self, step: Step) -> None: ...

    def close(self) -> None: ...


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

    @property
    def probs(self) -> np.ndarray:
        """``(frames, classes)``; ``(0, 0)`` before the first hop."""
        return np.stack(self.rows) if self.rows else np.zeros((0, 0), np.float32)
