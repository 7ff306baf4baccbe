"""Replay of an audio file as a simulated stream, through the same ring as the microphone.

``read_audio`` is the one reader for files everywhere (replay, training, eval):
anything soundfile reads, any channels, bit depth and rate, downmixed to mono and
resampled with soxr. NaN and Inf samples are replaced by 0 and counted.
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import numpy as np
import soundfile as sf
import soxr

from ..errors import AudioFileError, ConfigError
from ..ring import SpscRing
from .base import SourceStatus


def read_audio(path: str | os.PathLike, sample_rate: int, min_samples: int = 1) -> tuple[np.ndarray, int]:
    """Read ``path`` as mono float32 at ``sample_rate``; returns ``(samples, nonfinite_count)``.

    Raises :class:`AudioFileError` with the reason for anything that is not usable audio.
    """
    path = Path(path)
    if not path.exists():
        raise AudioFileError(f"{path}: no such file")
    if path.is_dir():
        raise AudioFileError(f"{path} is a directory, not an audio file")
    try:
        data, rate = sf.read(str(path), dtype="float32", always_2d=True)
    except (sf.LibsndfileError, RuntimeError, TypeError, ValueError, EOFError, OSError) as exc:
        reason = str(exc).split(":")[-1].strip() or type(exc).__name__
        raise AudioFileError(f"{path} is not a readable audio file ({reason}); use WAV, FLAC or OGG") from None
    if data.size == 0:
        raise AudioFileError(f"{path} holds no audio samples")
    mono = data.mean(axis=1, dtype=np.float32) if data.shape[1] > 1 else data[:, 0]
    bad = ~np.isfinite(mono)
    nonfinite = int(bad.sum())
    if nonfinite:
        mono = np.where(bad, np.float32(0.0), mono)
    if rate != sample_rate:
        mono = soxr.resample(mono, rate, sample_rate, quality="HQ").astype(np.float32, copy=False)
    if mono.shape[0] < min_samples:
        raise AudioFileError(
            f"{path} is {mono.shape[0] / sample_rate * 1000:.1f} ms long, shorter than one hop "
            f"({min_samples / sample_rate * 1000:.0f} ms): nothing to tag"
        )
    return np.ascontiguousarray(mono, dtype=np.float32), nonfinite


class WavReplaySource:
    """Pushes a file's samples into the ring in mic-sized blocks from a producer thread.

    Args:
        path: any file soundfile reads.
        sample_rate (int): the model rate; the file is resampled to it.
        block_size (int): samples per push, as a device callback would deliver. (Default: one hop)
        speed (float): 1 paces in real time (full ring drops, as live); 2 is twice as fast;
            0 is as fast as possible (waits for ring space, drops nothing). (Default: ``1``)
        repeat (int): play the file this many times back to back (long-run tests). (Default: ``1``)
    """

    is_live = False

    def __init__(
        self,
        path: str | os.PathLike,
        sample_rate: int,
        block_size: int = 160,
        speed: float = 1.0,
        repeat: int = 1,
        min_samples: int = 1,
    ) -> None:
        if speed < 0:
            raise ConfigError(f"--speed must be >= 0 ({speed} given; 0 means as fast as possible)")
        if repeat < 1:
            raise ConfigError(f"repeat must be >= 1 ({repeat} given)")
        self.samples, nonfinite = read_audio(path, sample_rate, min_samples)
        self.sample_rate = sample_rate
        self.block_size = block_size
        self.speed = speed
        self.repeat = repeat
        self.description = f"{Path(path).name} ({'fast' if speed == 0 else f'x{speed:g}'})"
        self.status = SourceStatus(nonfinite_samples=nonfinite)
        self.error: str | None = None
        self._stop = threading.Event()
        self._done = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def duration_s(self) -> float:
        return self.repeat * self.samples.shape[0] / self.sample_rate

    def start(self, ring: SpscRing) -> None:
        self._thread = threading.Thread(target=self._produce, args=(ring,), name="streamtag-replay", daemon=True)
        self._thread.start()

    def _produce(self, ring: SpscRing) -> None:
        try:
            pushed = 0
            t0 = time.perf_counter()
            for _ in range(self.repeat):
                for start in range(0, self.samples.shape[0], self.block_size):
                    if self._stop.is_set():
                        return
                    block = self.samples[start : start + self.block_size]
                    if self.speed == 0:
                        ring.write_blocking(block, self._stop)
                    else:
                        due = t0 + (pushed + block.shape[0]) / (self.sample_rate * self.speed)
                        delay = due - time.perf_counter()
                        if delay > 0:
                            time.sleep(delay)
                        ring.push(block)
                    pushed += block.shape[0]
        finally:
            self._done.set()
            ring.doorbell.ring()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    @property
    def finished(self) -> bool:
        return self._done.is_set()
