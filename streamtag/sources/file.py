"""Replay of an audio file as a simulated stream, through the same ring as the microphone.

Anything soundfile reads, any channels, bit depth and rate: downmixed to mono,
resampled with soxr, NaN and Inf samples replaced by 0 and counted. ``read_audio``
loads a whole file (training, eval, plots); :class:`WavReplaySource` decodes ~1 s
blocks as it plays, so an hours-long recording starts at once and never sits in
memory whole.
"""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import soundfile as sf
import soxr

from ..errors import AudioFileError, ConfigError, is_whole
from ..resample import check_rate, resample_chunks
from ..ring import SpscRing
from .base import ProducerSource, mono_finite, push_paced

_READ_ERRORS = (sf.LibsndfileError, RuntimeError, TypeError, ValueError, EOFError, OSError)
# the extensions of files libsndfile reads (a folder is searched for these by tag, train and eval)
AUDIO_SUFFIXES = (
    *(".wav", ".flac", ".ogg", ".oga", ".opus", ".mp3", ".aif", ".aiff", ".aifc", ".au", ".w64", ".rf64", ".caf"),
    *(".sph", ".nist"),
)
READ_BLOCK_SECONDS = 1.28  # decoded at a time: 128 hops, one full chunk-graph call
# containers libsndfile does not read, which ffmpeg turns into a WAV stream for ``replay -`` and ``tag -``
FFMPEG_SUFFIXES = (".m4a", ".aac", ".mp4", ".m4v", ".mov", ".mkv", ".webm", ".wma", ".avi", ".3gp", ".amr", ".ac3")
# a data size a writer that cannot seek back (ffmpeg -f wav to a pipe) puts in the header: "until the end"
_UNKNOWN_SIZES = (0xFFFFFFFF, 0x7FFFFFFF)


def _reason(exc: Exception) -> str:
    return str(exc).split(":")[-1].strip() or type(exc).__name__


def probe_audio(path: str | os.PathLike):
    """``soundfile.info`` of a usable audio file, or :class:`AudioFileError` saying what is wrong."""
    path = Path(path)
    if not path.exists():
        raise AudioFileError(f"{path}: no such file")
    if path.is_dir():
        raise AudioFileError(f"{path} is a directory, not an audio file")
    if not path.is_file():  # a named pipe or <(...) would be read twice (the probe, then the run): it has no rewind
        raise AudioFileError(f"{path} is a pipe or a device, not a file: give - as the input and feed it on stdin")
    try:
        info = sf.info(_native(path))
    except _READ_ERRORS as exc:
        raise _unreadable(path, exc) from None
    if info.frames <= 0 or info.samplerate <= 0:
        raise AudioFileError(f"{path} holds no audio samples")
    return info


def _native(path: str | os.PathLike) -> str | bytes:
    """The name to give libsndfile: bytes on POSIX, so a name that is not UTF-8 (a legacy Latin-1 archive) opens
    (soundfile encodes a str strictly and fails on it); Windows takes the str."""
    return str(path) if os.name == "nt" else os.fsencode(path)


def _unreadable(path: Path, exc: Exception) -> AudioFileError:
    """Why ``path`` cannot be read, and what to do: an empty file, a container ffmpeg reads, anything else."""
    with contextlib.suppress(OSError):
        if path.is_file() and path.stat().st_size == 0:
            return AudioFileError(f"{path} is empty (0 bytes): nothing to tag")
    try:
        open(path, "rb").close()
    except PermissionError:
        return AudioFileError(f"{path}: permission denied; give this user read access to it")
    except OSError:
        pass
    if path.suffix.lower() in FFMPEG_SUFFIXES:
        return AudioFileError(
            f"{path}: {path.suffix.lower()} files are not read directly; decode with ffmpeg into a pipe: "
            f"ffmpeg -i '{path}' -f wav - | streamtag replay - (or streamtag tag - --name NAME)"
        )
    return AudioFileError(f"{path} is not a readable audio file ({_reason(exc)}); use WAV, FLAC, OGG, MP3 or AIFF")


def _check_length(path: Path, samples: float, sample_rate: int, min_samples: int) -> None:
    if samples < min_samples:
        raise AudioFileError(
            f"{path} is {samples / sample_rate * 1000:.1f} ms long, shorter than one hop "
            f"({min_samples / sample_rate * 1000:.0f} ms): nothing to tag"
        )


def read_audio(path: str | os.PathLike, sample_rate: int, min_samples: int = 1) -> tuple[np.ndarray, int]:
    """Read all of ``path`` as mono float32 at ``sample_rate``; returns ``(samples, nonfinite_count)``.

    Raises :class:`AudioFileError` with the reason for anything that is not usable audio.
    """
    check_rate(sample_rate, "sample_rate")
    path = Path(path)
    probe_audio(path)
    try:
        data, rate = sf.read(_native(path), dtype="float32", always_2d=True)
    except _READ_ERRORS as exc:
        raise _unreadable(path, exc) from None
    if data.size == 0:
        raise AudioFileError(f"{path} holds no audio samples")
    mono, nonfinite = mono_finite(data)
    if rate != sample_rate:
        mono = soxr.resample(mono, rate, sample_rate, quality="HQ").astype(np.float32, copy=False)
    _check_length(path, mono.shape[0], sample_rate, min_samples)
    return mono, nonfinite


def _missing_part(info) -> str | None:
    """How much of a WAV/AIFF file its header promises but the file lacks (libsndfile reads what is there
    and only notes the shortfall in its log), e.g. ``"50%"``; None for a whole file."""
    match = re.search(r"^(?:data|SSND)\s*:\s*(\d+) \(should be (\d+)\)", info.extra_info or "", re.MULTILINE)
    if not match:
        return None
    promised, present = int(match.group(1)), int(match.group(2))
    if promised in _UNKNOWN_SIZES:  # a streamed header: the file is as long as it is
        return None
    return f"{1 - present / promised:.0%}" if promised > present else None


class WavReplaySource(ProducerSource):
    """Pushes a file's samples into the ring in mic-sized blocks from a producer thread.

    Args:
        path: any file soundfile reads.
        sample_rate (int): the model rate; the file is resampled to it as it plays.
        block_size (int): samples per push, as a device callback would deliver. (Default: one hop)
        speed (float): 1 paces in real time, 2 twice as fast, 0 as fast as possible. A file is never
            dropped from: when the ring is full the source waits for the worker (only live audio,
            which cannot wait, is dropped and counted). (Default: ``1``)
        repeat (int): play the file this many times back to back (long-run tests). (Default: ``1``)
        min_samples (int): refuse files shorter than this at the model rate. (Default: ``1``)

    Every problem known before playing (missing, unreadable, empty, too short) raises
    :class:`AudioFileError` here; a file that breaks mid-way sets ``error`` and ends the stream.
    """

    thread_name = "streamtag-replay"

    def __init__(
        self,
        path: str | os.PathLike,
        sample_rate: int,
        block_size: int = 160,
        speed: float = 1.0,
        repeat: int = 1,
        min_samples: int = 1,
    ) -> None:
        super().__init__()
        if not 0 <= speed < float("inf"):  # NaN fails too
            raise ConfigError(f"speed must be a finite number >= 0 ({speed} given; 0 means as fast as possible)")
        if repeat < 1:
            raise ConfigError(f"repeat must be >= 1 ({repeat} given)")
        if not is_whole(block_size) or block_size < 1:
            raise ConfigError(f"block_size must be a whole number of samples >= 1 ({block_size!r} given)")
        self.path = Path(path)
        info = probe_audio(self.path)
        self.file_rate = info.samplerate
        self._short_by = _missing_part(info)
        _check_length(self.path, info.frames * sample_rate / info.samplerate, sample_rate, min_samples)
        self.sample_rate = sample_rate
        self.block_size = block_size
        self.speed = speed
        self.repeat = repeat
        self.description = f"{self.path.name} ({'fast' if speed == 0 else f'x{speed:g}'})"

    def chunks(self) -> Iterator[np.ndarray]:
        """Mono float32 at the model rate, about ``READ_BLOCK_SECONDS`` at a time. A file that is truncated or
        breaks mid-way yields what could be read, then sets ``error`` saying so."""
        delivered = 0
        try:
            for chunk in resample_chunks(self._file_chunks(), self.file_rate, self.sample_rate):
                delivered += chunk.size
                yield chunk
        except _READ_ERRORS as exc:
            self.error = (
                f"{self.path} could not be read to the end ({_reason(exc)}); "
                f"the {delivered / self.sample_rate:.2f} s before that were tagged"
            )
            return
        if self._short_by is not None:
            self.error = (
                f"{self.path} is truncated: {self._short_by} of its audio is missing; "
                f"the {self._frames_read / self.file_rate:.2f} s that could be read were tagged"
            )

    def _file_chunks(self) -> Iterator[np.ndarray]:
        self._frames_read = 0
        frames = max(1, int(self.file_rate * READ_BLOCK_SECONDS))
        small = max(1, self.file_rate // 10)
        f = sf.SoundFile(_native(self.path))
        try:
            while True:  # read(), not blocks(): blocks() seeks back before every block (for overlaps)
                try:
                    data = f.read(frames, dtype="float32", always_2d=True)
                except _READ_ERRORS:
                    if frames <= small:
                        raise
                    # a broken block loses its good start too: decode up to it again, then 0.1 s at a time
                    f.close()
                    f = sf.SoundFile(_native(self.path))
                    for _ in range(self._frames_read // small):
                        f.read(small, dtype="float32")
                    f.read(self._frames_read % small, dtype="float32")
                    frames = small
                    continue
                if not data.shape[0]:
                    break
                self._frames_read += data.shape[0]
                mono, nonfinite = mono_finite(data)
                self.status.nonfinite_samples += nonfinite
                yield mono
        finally:
            f.close()

    def _push(self, ring: SpscRing) -> None:
        chunks = (chunk for _ in range(self.repeat) if not self.error for chunk in self.chunks())
        push_paced(ring, chunks, self.block_size, self.sample_rate, self.speed, self._stop)
