"""The source protocol and its accumulating status record."""

from __future__ import annotations

from typing import Protocol

from ..ring import SpscRing


class SourceStatus:
    """Counts of things that went wrong at the source, accumulated like sounddevice's ``CallbackFlags``.

    ``if status:`` is true when anything was counted; ``total |= other`` adds counts.
    """

    __slots__ = ("input_overflows", "input_underflows", "nonfinite_samples")

    def __init__(self, input_overflows: int = 0, input_underflows: int = 0, nonfinite_samples: int = 0) -> None:
        self.input_overflows = input_overflows  # PortAudio said samples were lost before our callback
        self.input_underflows = input_underflows  # PortAudio padded the block with silence
        self.nonfinite_samples = nonfinite_samples  # NaN/Inf samples replaced by 0

    def __bool__(self) -> bool:
        return any(getattr(self, name) for name in self.__slots__)

    def __ior__(self, other: SourceStatus) -> SourceStatus:
        for name in self.__slots__:
            setattr(self, name, getattr(self, name) + getattr(other, name))
        return self

    def as_dict(self) -> dict[str, int]:
        return {name: getattr(self, name) for name in self.__slots__}

    def __repr__(self) -> str:
        flags = ", ".join(f"{n.replace('_', ' ')}: {getattr(self, n)}" for n in self.__slots__ if getattr(self, n))
        return f"<SourceStatus: {flags or 'ok'}>"


class Source(Protocol):
    """Lifecycle: ``start(ring)``, then ``stop()``; ``finished`` once no more audio will come."""

    sample_rate: int  # rate of the samples pushed into the ring
    description: str
    status: SourceStatus
    is_live: bool  # True: a clock drives it and it may stall (device lost); False: a file
    error: str | None  # set when the source failed for good (device gone)

    def start(self, ring: SpscRing) -> None: ...

    def stop(self) -> None: ...

    @property
    def finished(self) -> bool: ...
