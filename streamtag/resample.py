"""Streaming resampling for devices that cannot run at the model rate (soxr keeps filter state across blocks)."""

from __future__ import annotations

import numbers
from collections.abc import Iterable, Iterator

import numpy as np
import soxr

from .errors import ConfigError

RATES = (1000, 384000)  # the input rates taken, in Hz: far outside them soxr's buffers grow past memory (or crash)


def check_rate(rate, what: str = "sample_rate") -> int:
    """``rate`` as an int if it is a whole number of Hz in :data:`RATES`, else ConfigError naming ``what``."""
    whole = isinstance(rate, numbers.Integral) or (isinstance(rate, float) and rate.is_integer())
    if isinstance(rate, bool) or not whole or not RATES[0] <= rate <= RATES[1]:
        raise ConfigError(f"{what} must be a whole number of Hz in {RATES[0]}..{RATES[1]} ({rate!r} given)")
    return int(rate)


class StreamResampler:
    """``process(block) -> block`` at ``out_rate``; chunk-safe, about ``soxr`` HQ's delay (a few ms)."""

    def __init__(self, in_rate: int, out_rate: int) -> None:
        self.in_rate, self.out_rate = in_rate, out_rate
        self._stream = soxr.ResampleStream(in_rate, out_rate, 1, dtype="float32", quality="HQ")

    def process(self, block: np.ndarray, last: bool = False) -> np.ndarray:
        return self._stream.resample_chunk(block, last=last)

    def reset_states(self) -> None:
        self._stream = soxr.ResampleStream(self.in_rate, self.out_rate, 1, dtype="float32", quality="HQ")


def resample_chunks(chunks: Iterable[np.ndarray], in_rate: int, out_rate: int) -> Iterator[np.ndarray]:
    """Mono chunks at ``out_rate`` as they come, then the filter's tail (the chunks as they are at one rate)."""
    if in_rate == out_rate:
        yield from chunks
        return
    stream = StreamResampler(in_rate, out_rate)
    for chunk in chunks:
        out = stream.process(chunk)
        if out.size and chunk.size and float(np.max(np.abs(chunk))) <= 1.0:
            # a loud recording within full scale overshoots it a little once filtered (its peaks between
            # samples): clipped here, or the engine's guard would call it a wrong input format
            np.clip(out, -1.0, 1.0, out=out)
        yield out
    yield stream.process(np.zeros(0, np.float32), last=True)
