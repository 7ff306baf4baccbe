"""The source protocol and its accumulating status record."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable
from typing import Protocol

import numpy as np

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

    def start(self, ring: SpscRing) -> None:
        """Begin filling ``ring`` and return: the worker's thread starts after this, so a start that writes more
        than the ring holds (a few seconds) waits for ever (:class:`ProducerSource` fills it from a thread)."""

    def stop(self) -> None: ...

    @property
    def finished(self) -> bool: ...


def downmix(frames: np.ndarray) -> np.ndarray:
    """``(frames, channels)`` -> mono: the one channel as it is, or the channels' mean as float32."""
    return frames[:, 0] if frames.shape[1] == 1 else frames.mean(axis=1, dtype=np.float32)


def mono_finite(data: np.ndarray) -> tuple[np.ndarray, int]:
    """``(frames, channels)`` -> mono float32 with NaN/Inf replaced by 0; and how many were replaced."""
    mono = downmix(data)
    bad = ~np.isfinite(mono)
    nonfinite = int(bad.sum())
    if nonfinite:
        mono = np.where(bad, np.float32(0.0), mono)
    return np.ascontiguousarray(mono, dtype=np.float32), nonfinite


class ProducerSource:
    """A source that can wait (a file, a pipe): a thread runs :meth:`_push` into the ring, which waits
    for space rather than dropping. ``stop()`` ends it; ``finished`` once it has pushed all it will."""

    is_live = False
    thread_name = "streamtag-producer"
    join_timeout: float | None = None  # None: wait for the thread; a pipe's reader may block on an idle pipe

    def __init__(self) -> None:
        self.status = SourceStatus()
        self.error: str | None = None
        self._stop = threading.Event()
        self._done = threading.Event()
        self._thread: threading.Thread | None = None

    def _push(self, ring: SpscRing) -> None:
        raise NotImplementedError

    def start(self, ring: SpscRing) -> None:
        self._thread = threading.Thread(target=self._run, args=(ring,), name=self.thread_name, daemon=True)
        self._thread.start()

    def _run(self, ring: SpscRing) -> None:
        try:
            self._push(ring)
        except Exception as exc:  # a bug (or a custom source's): the run ends with it, not as a clean end
            self.error = f"the source {type(self).__name__} failed: {exc!r}"
            raise  # the traceback, on stderr
        finally:
            self._done.set()
            ring.doorbell.ring()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(self.join_timeout)

    @property
    def finished(self) -> bool:
        return self._done.is_set()


def push_paced(
    ring: SpscRing,
    chunks: Iterable[np.ndarray],
    block_size: int,
    sample_rate: int,
    speed: float,
    stop: threading.Event,
) -> bool:
    """Push audio into the ring in blocks of ``block_size``, at ``speed`` times real time (0: as fast as the
    worker takes it). A file or a pipe can wait, so a full ring is waited on, never dropped from.

    Returns False when ``stop`` ended it early.
    """
    pushed, t0 = 0, time.perf_counter()
    for chunk in chunks:
        for start in range(0, chunk.shape[0], block_size):
            if stop.is_set():
                return False
            block = chunk[start : start + block_size]
            if speed:
                delay = t0 + (pushed + block.shape[0]) / (sample_rate * speed) - time.perf_counter()
                if delay > 0:
                    time.sleep(delay)
            ring.write_blocking(block, stop)
            pushed += block.shape[0]
    return not stop.is_set()
