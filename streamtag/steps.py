"""What an engine hands its outputs: one :class:`Step` per hop, and the :class:`Output` protocol.

Kept apart from the engine and the worker so that an output (a file writer, the live
view, a network sink) imports only what it is given, never the loop that feeds it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Iterator, Sequence
from typing import Protocol, runtime_checkable

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


@dataclasses.dataclass
class StepBlock:
    """The hops of one stream that one model call completed, ``k`` rows at once: how runners that move many
    hops (serve, tag) read an engine's results without a Python object per hop. :meth:`steps` is the same as
    one :class:`Step` per row. Arrays are owned by the block."""

    first_frame: int
    probs: np.ndarray  # (k, classes)
    events: dict[int, list[Event]]  # row -> that hop's events; rows without any are absent
    labels: Sequence[str]
    frame_seconds: float = 0.01
    audio: np.ndarray | None = None  # (k, hop), at the model rate, after the gain

    def __len__(self) -> int:
        return self.probs.shape[0]

    def t(self, row: int) -> float:
        """Stream time at the end of hop ``row``."""
        return (self.first_frame + row + 1) * self.frame_seconds

    def steps(self) -> list[Step]:
        fs, first, audio, events = self.frame_seconds, self.first_frame, self.audio, self.events
        return [
            Step(
                first + i,
                (first + i + 1) * fs,
                self.probs[i],
                events.get(i) or [],
                self.labels,
                fs,
                None if audio is None else audio[i],
            )
            for i in range(len(self))
        ]


def _steps_of(item: Step | StepBlock) -> Sequence[Step]:
    return item.steps() if isinstance(item, StepBlock) else (item,)


def named_steps(items: Iterable[tuple[str, Step | StepBlock]]) -> Iterator[tuple[str, Step]]:
    """``(name, block or step)`` pairs, in order -> ``(name, step)`` pairs: a pool's ``step()`` from its
    ``step_blocks()``."""
    for name, item in items:
        for step in _steps_of(item):
            yield name, step


def as_steps(items: Iterable[Step | StepBlock]) -> list[Step]:
    """Blocks and steps, in order -> steps."""
    return [step for item in items for step in _steps_of(item)]


@runtime_checkable
class Output(Protocol):
    """Gets every step; decides itself what to show or write. An output may also have
    ``write_block(block)`` for a :class:`StepBlock` (else it gets the block's steps one by one)."""

    def write(self, step: Step) -> None: ...

    def close(self) -> None: ...


def write_to(output: Output, item: Step | StepBlock) -> None:
    """Hand a step or a block to an output: whole to one that has ``write_block``, else step by step."""
    if not isinstance(item, StepBlock):
        output.write(item)
    elif hasattr(output, "write_block"):
        output.write_block(item)
    else:
        for step in item.steps():
            output.write(step)


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
