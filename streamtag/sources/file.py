"""Replay of an audio file as a simulated stream, through the same ring as the microphone.

Anything soundfile reads, any channels, bit depth and rate: downmixed to mono,
resampled with soxr, NaN and Inf samples replaced by 0 and counted. ``read_audio``
loads a whole file (training, eval, plots); :class:`WavReplaySource` decodes ~1 s
blocks as it plays, so an hours-long recording starts at once and never sits in
memory whole.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import re
import shlex
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import soundfile as sf
import soxr

from ..errors import AudioFileError, ConfigError, is_whole
from ..resample import check_rate, resample_chunks
from ..ring import SpscRing
from .base import ProducerSource, mono_finite, push_paced
from .pipe import PcmDecoder, PcmFormat, read_wav_header

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
SIZE_WRAP = 1 << 32  # a WAV header's sizes are 32-bit: a longer data chunk's size keeps only the remainder
# a file read shorter than its header announces (an MP3's frame count, FLAC's sample count) by more than this
# share, and a second, is cut short; within it, an MP3's count may be an encoder's estimate
SHORT_SHARE, SHORT_SECONDS = 0.01, 1.0
_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


def is_url(given: str | os.PathLike) -> bool:
    """``given`` names a stream (http://, rtsp://, ...), not a file (``Path`` would fold its ``//`` into one)."""
    return isinstance(given, str) and bool(_URL.match(given))


@dataclasses.dataclass(frozen=True)
class _HeaderlessWav:
    """A WAV file whose header does not say how long it is: its PCM is read to the end of the file."""

    fmt: PcmFormat
    start: int  # the first sample's byte offset
    frames: int


@dataclasses.dataclass(frozen=True)
class AudioInfo:
    """What :func:`probe_audio` learnt of a file."""

    frames: int
    samplerate: int
    extra_info: str
    headerless: _HeaderlessWav | None = None  # read past libsndfile, which takes the header at its word


def _reason(exc: Exception) -> str:
    return str(exc).split(":")[-1].strip() or type(exc).__name__


def probe_audio(path: str | os.PathLike) -> AudioInfo:
    """What a usable audio file holds, or :class:`AudioFileError` saying what is wrong."""
    if not isinstance(path, (str, os.PathLike)):  # read_audio(None) was a bare TypeError from pathlib
        raise ConfigError(f"an audio file is given by its path, a str or Path ({type(path).__name__} given)")
    if is_url(path):
        raise AudioFileError(
            f"{path}: a URL, not a file; decode it with ffmpeg into a pipe: "
            f"ffmpeg -i {shlex.quote(str(path))} -f wav - | streamtag replay - (or streamtag tag - --name NAME)"
        )
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
    headerless = _headerless_wav(path, info.frames)
    if headerless is not None:
        return AudioInfo(headerless.frames, headerless.fmt.rate, info.extra_info, headerless)
    if info.frames <= 0 or info.samplerate <= 0:
        raise AudioFileError(f"{path} holds no audio samples")
    return AudioInfo(info.frames, info.samplerate, info.extra_info)


def _headerless_wav(path: Path, frames: int) -> _HeaderlessWav | None:
    """A WAV file whose header does not give its length, which libsndfile takes at its word: a data size of 0
    (a recorder stopped before it went back to write it: libsndfile reads nothing) or one that wrapped past
    4 GiB (a long recording by a writer that knows no RF64: libsndfile reads the remainder). Its samples are
    read to the end of the file, as a pipe's are. None for any other file."""
    try:
        with open(_native(path), "rb") as f:
            fmt = read_wav_header(f)
            start = f.tell()
            usable = os.fstat(f.fileno()).st_size - start
    except (AudioFileError, OSError, ValueError):  # not a WAV, or one read_wav_header does not read (8-bit, ADPCM)
        return None
    frame_bytes = fmt.width * fmt.channels
    if fmt.data_bytes is None:  # 0 or "unknown" (RF64's too): libsndfile reads those it counts frames of itself
        cut = frames <= 0
    else:  # the true size less a whole number of 4 GiB (a chunk after the data would break this: left alone)
        cut = usable > fmt.data_bytes and (usable - fmt.data_bytes) % SIZE_WRAP == 0
    if not cut or usable < frame_bytes:
        return None
    return _HeaderlessWav(dataclasses.replace(fmt, data_bytes=None), start, usable // frame_bytes)


def _headerless_blocks(path: Path, wav: _HeaderlessWav, frames: int) -> Iterator[np.ndarray]:
    """A headerless WAV's samples ``(frames, channels)``, ``frames`` at a time, to the end of the file."""
    decode = PcmDecoder(wav.fmt)
    left = wav.frames * decode.frame_bytes
    with open(_native(path), "rb") as f:
        f.seek(wav.start)
        while left > 0:
            data = f.read(min(left, frames * decode.frame_bytes))
            if not data:
                return
            left -= len(data)
            yield decode(data)


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
            f"{_ffmpeg_pipe(path)}"
        )
    if _container(path):  # a WAV or AIFF holding an encoding libsndfile lacks (G.726, some ADPCM)
        return AudioFileError(
            f"{path} cannot be read ({_reason(exc)}): its encoding may be one only ffmpeg decodes; try "
            f"{_ffmpeg_pipe(path)}"
        )
    return AudioFileError(f"{path} is not a readable audio file ({_reason(exc)}); use WAV, FLAC, OGG, MP3 or AIFF")


def _container(path: Path) -> bool:
    """``path`` starts as a WAV or AIFF does (so a failure to read it is its encoding, not garbage)."""
    try:
        with open(_native(path), "rb") as f:
            head = f.read(12)
    except OSError:
        return False
    return (head[:4] in (b"RIFF", b"RF64") and head[8:12] == b"WAVE") or (
        head[:4] == b"FORM" and head[8:12] in (b"AIFF", b"AIFC")
    )


def _ffmpeg_pipe(path: Path) -> str:
    """The command that decodes ``path`` into ``replay -``, quoted for a POSIX shell."""
    return f"ffmpeg -i {shlex.quote(str(path))} -f wav - | streamtag replay - (or streamtag tag - --name NAME)"


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
    info = probe_audio(path)
    path = Path(path)
    rate = info.samplerate
    try:
        if info.headerless is not None:
            data = np.concatenate(list(_headerless_blocks(path, info.headerless, max(info.frames, 1))))
        else:
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


def _missing_part(info: AudioInfo) -> str | None:
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
        info = probe_audio(path)
        self.path = Path(path)
        self.info = info
        self.file_rate = info.samplerate
        self._short_by = _missing_part(info)
        self.warning: str | None = None  # said after the run: something about the file worth knowing
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
        read = self._frames_read / self.file_rate
        # an MP3's Xing/Info frame and FLAC's header count their samples; an MP3 without one has a count libsndfile
        # estimated from the size and first bitrate ("constant"), which a complete file may fall far short of
        counted = "bitrate mode   : constant" not in self.info.extra_info
        missing = self.info.frames - self._frames_read
        if (
            self._short_by is None
            and counted
            and missing > max(SHORT_SHARE * self.info.frames, SHORT_SECONDS * self.file_rate)
        ):
            self._short_by = f"{missing / self.info.frames:.0%}"
        if self._short_by is not None:
            self.error = (
                f"{self.path} is truncated: {self._short_by} of its audio is missing; "
                f"the {read:.2f} s that could be read were tagged"
            )
        elif "Last page lacks an end-of-stream bit" in self.info.extra_info:  # Ogg: how much is lost is not known
            self.warning = (
                f"{self.path.name} ends without its end-of-stream mark (cut short?): its {read:.2f} s were tagged"
            )
        elif self._power_mix < 1e-3 * self._power_channels and self._power_channels > 1e-8 * self._frames_read:
            self.warning = (
                f"{self.path.name}: its channels cancel out when averaged to mono (one is phase-inverted?); tag one "
                f"channel: ffmpeg -i {shlex.quote(str(self.path))} -af 'pan=mono|c0=c0' -f wav - | streamtag replay -"
            )

    def _file_chunks(self) -> Iterator[np.ndarray]:
        self._frames_read = 0
        self._power_channels = self._power_mix = 0.0  # sums of squares: the channels' mean, and their mix's
        for data in self._blocks():
            self._frames_read += data.shape[0]
            mono, nonfinite = mono_finite(data)
            self.status.nonfinite_samples += nonfinite
            if data.shape[1] > 1 and not nonfinite:
                self._power_channels += float(np.square(data, dtype=np.float64).sum()) / data.shape[1]
                self._power_mix += float(np.square(mono, dtype=np.float64).sum())
            yield mono

    def _blocks(self) -> Iterator[np.ndarray]:
        """The file's samples ``(frames, channels)``, about ``READ_BLOCK_SECONDS`` at a time."""
        frames = max(1, int(self.file_rate * READ_BLOCK_SECONDS))
        if self.info.headerless is not None:
            yield from _headerless_blocks(self.path, self.info.headerless, frames)
            return
        small = max(1, self.file_rate // 10)
        read = 0
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
                    for _ in range(read // small):
                        f.read(small, dtype="float32")
                    f.read(read % small, dtype="float32")
                    frames = small
                    continue
                if not data.shape[0]:
                    break
                read += data.shape[0]
                yield data
        finally:
            f.close()

    def _push(self, ring: SpscRing) -> None:
        chunks = (chunk for _ in range(self.repeat) if not self.error for chunk in self.chunks())
        push_paced(ring, chunks, self.block_size, self.sample_rate, self.speed, self._stop)
