"""Audio from a pipe (``streamtag replay -``): a WAV stream or raw PCM, read as it arrives.

``ffmpeg -i rtsp://camera/stream -f wav - | streamtag replay -`` is the usual way in: ffmpeg
writes a WAV header with an unknown length and then PCM for as long as the stream runs.
libsndfile cannot read a stream it cannot seek, so the header is parsed here; raw PCM
(``--raw-rate``, ``--raw-format``) needs no header at all. Like a file, a pipe waits for
the worker (nothing is dropped): the writer is blocked by the pipe instead.
"""

from __future__ import annotations

import dataclasses
import struct
from typing import BinaryIO

import numpy as np

from ..errors import AudioFileError, ConfigError
from ..resample import check_rate, resample_chunks
from ..ring import SpscRing
from .base import ProducerSource, mono_finite, push_paced

RAW_FORMATS = {"s16le": ("<i2", 2**15), "s32le": ("<i4", 2**31), "f32le": ("<f4", 1.0)}
READ_SECONDS = 0.1


@dataclasses.dataclass(frozen=True)
class PcmFormat:
    """How the bytes of a pipe become samples."""

    rate: int
    channels: int
    dtype: str  # numpy dtype of one sample ("<i2", "<i4", "<f4"); 24-bit PCM is widened on read
    scale: float  # divide by this to get [-1, 1]
    width: int  # bytes per sample in the stream
    data_bytes: int | None = None  # from a WAV header; None: until the pipe closes

    @classmethod
    def raw(cls, rate: int, fmt: str, channels: int = 1) -> PcmFormat:
        if fmt not in RAW_FORMATS:
            raise ConfigError(f"--raw-format {fmt}: choose from {', '.join(RAW_FORMATS)}")
        check_rate(rate, "--raw-rate")
        if not 1 <= channels <= 64:
            raise ConfigError(f"--raw-channels must be in 1..64 ({channels} given)")
        dtype, scale = RAW_FORMATS[fmt]
        return cls(rate, channels, dtype, scale, int(dtype[-1]))


class PcmDecoder:
    """Interleaved PCM bytes in pieces of any size (a pipe's reads, WebSocket messages) -> float32 samples
    ``(frames, channels)`` in -1..1; a part-frame at the end of a piece waits for the next. NaN/Inf (floats of
    the wrong format) are passed on: the caller counts or replaces them."""

    def __init__(self, fmt: PcmFormat) -> None:
        self.fmt = fmt
        self.frame_bytes = fmt.width * fmt.channels
        self._carry = b""

    def __call__(self, data: bytes) -> np.ndarray:
        data = self._carry + data if self._carry else data
        usable = len(data) - len(data) % self.frame_bytes
        data, self._carry = data[:usable], data[usable:]
        fmt = self.fmt
        if fmt.width == 3:  # 24-bit: widen each sample to the top three bytes of an int32
            raw = np.frombuffer(data, np.uint8).reshape(-1, 3)
            wide = np.zeros((raw.shape[0], 4), np.uint8)
            wide[:, 1:] = raw
            samples = wide.view("<i4").reshape(-1).astype(np.float32) / fmt.scale
        elif fmt.scale == 1.0:  # floats as they are (NaN and Inf too: the caller counts or replaces them)
            samples = np.frombuffer(data, fmt.dtype).astype(np.float32)
        else:  # integers: converted and scaled in one pass (a server decodes thousands of messages a second)
            samples = np.divide(np.frombuffer(data, fmt.dtype), np.float32(fmt.scale), dtype=np.float32)
        return samples.reshape(-1, fmt.channels)

    @property
    def pending(self) -> int:
        """Bytes of a part-frame waiting for the rest."""
        return len(self._carry)

    def ended_short(self, what: str, fix: str) -> str | None:
        """What to say of a stream (``what``) that ended part-way into a frame, its bytes untagged (a wrong format
        or channel count shows so); None when it ended on a whole frame."""
        if not self.pending:
            return None
        return (
            f"{what} ended {self.pending} byte(s) into a frame ({self.frame_bytes} bytes a frame); they were not "
            f"tagged: {fix}"
        )


def stdin_stream() -> BinaryIO:
    """Standard input as a buffered stream of its own. Its reader thread may be blocked in a read when the run
    stops (a camera's ffmpeg stalled, then SIGTERM); on ``sys.stdin.buffer`` that thread held the lock Python
    takes to close stdin at exit, and the interpreter aborted ("could not acquire lock", exit 134)."""
    import io
    import sys

    return io.BufferedReader(io.FileIO(sys.stdin.fileno(), "rb", closefd=False))


def read_wav_header(stream: BinaryIO) -> PcmFormat:
    """Parse a RIFF/WAVE header up to its ``data`` chunk; the stream is left at the first sample."""

    def need(n: int) -> bytes:
        data = stream.read(n)
        if len(data) < n:
            raise AudioFileError("stdin ended inside the WAV header")
        return data

    head = stream.read(12)
    if not head:
        raise AudioFileError("stdin is empty: nothing was piped in (did the command before the | fail?)")
    if len(head) < 12 or head[:4] not in (b"RIFF", b"RF64") or head[8:12] != b"WAVE":
        raise AudioFileError(
            "stdin is not a WAV stream: pipe WAV (ffmpeg ... -f wav -) or raw PCM with --raw-rate and --raw-format"
        )
    fmt = None
    while True:
        chunk_id, size = struct.unpack("<4sI", need(8))
        if chunk_id == b"fmt ":
            body = need(size + (size & 1))
            if size < 16:  # (a bare struct.error from the unpack below)
                raise AudioFileError(f"stdin: the WAV stream's fmt chunk is {size} bytes, not the 16 it needs")
            code, channels, rate, _, _, bits = struct.unpack("<HHIIHH", body[:16])
            if code == 0xFFFE and size >= 26:  # WAVE_FORMAT_EXTENSIBLE: the sub-format's first two bytes
                code = struct.unpack("<H", body[24:26])[0]
            fmt = (code, channels, rate, bits)
        elif chunk_id == b"data":
            break
        else:
            need(size + (size & 1))
    if fmt is None:
        raise AudioFileError("stdin: the WAV stream has no fmt chunk before its data")
    code, channels, rate, bits = fmt
    kinds = {(1, 16): ("<i2", 2**15), (1, 32): ("<i4", 2**31), (1, 24): ("<i4", 2**31), (3, 32): ("<f4", 1.0)}
    if (code, bits) not in kinds or channels < 1 or rate < 1:
        raise AudioFileError(f"stdin: WAV format {code} with {bits}-bit samples is not read from a pipe (16/24/32-bit)")
    dtype, scale = kinds[(code, bits)]
    unknown = size in (0, 0xFFFFFFFF)  # ffmpeg writes these when it cannot know the length
    return PcmFormat(rate, channels, dtype, scale, bits // 8, None if unknown else size)


class PipeSource(ProducerSource):
    """Pushes a pipe's samples into the ring from a reader thread, resampled to the model rate.

    Args:
        stream: a binary stream (``sys.stdin.buffer``).
        sample_rate (int): the model rate.
        fmt (PcmFormat or None): raw PCM layout; None reads a WAV header first.
        block_size (int): samples per push. (Default: one hop)
        speed (float): 1 paces in real time, 0 as fast as the pipe delivers. (Default: ``1``)
    """

    thread_name = "streamtag-pipe"
    outputs_wait_for_audio = True  # an empty stdin (a failed upstream command) must not cost the last run's files
    join_timeout = 1.0  # a reader blocked on an idle pipe ends with the process

    def __init__(
        self,
        stream: BinaryIO,
        sample_rate: int,
        fmt: PcmFormat | None = None,
        block_size: int = 160,
        speed: float = 1.0,
    ) -> None:
        super().__init__()
        self.stream = stream
        self.fmt = fmt if fmt is not None else read_wav_header(stream)  # a bad header fails here, before any work
        self.sample_rate, self.block_size, self.speed = sample_rate, block_size, speed
        self.description = f"stdin ({self.fmt.rate} Hz, {self.fmt.channels} ch)"
        self.warning: str | None = None  # said after the run: what arrived that could not be used

    def _samples(self):
        """Mono float32 at the pipe's rate, about ``READ_SECONDS`` at a time, until the pipe or the data ends."""
        fmt = self.fmt
        decode = PcmDecoder(fmt)
        block = max(1, int(fmt.rate * READ_SECONDS)) * decode.frame_bytes
        left = fmt.data_bytes
        while not self._stop.is_set():
            want = block if left is None else min(block, left)
            data = self.stream.read(want) if want else b""
            if not data:

                def seconds(n: int) -> float:
                    return n / decode.frame_bytes / fmt.rate

                if left:  # the header named a length the stream did not deliver: say so, as a short file does
                    self.error = (
                        f"stdin ended early: {seconds(fmt.data_bytes - left):.2f} s of the "
                        f"{seconds(fmt.data_bytes):.2f} s of audio its WAV header announced arrived; "
                        "what arrived was tagged"
                    )
                else:
                    self.warning = decode.ended_short("stdin", "check --raw-format and --raw-channels")
                break
            if left is not None:
                left -= len(data)
            mono, nonfinite = mono_finite(decode(data))
            self.status.nonfinite_samples += nonfinite
            yield mono

    def chunks(self):
        """Mono float32 at the model rate as the pipe delivers it; a read error, or a stream that ends before
        one hop, ends it and sets ``error``."""
        delivered = 0
        try:
            for chunk in resample_chunks(self._samples(), self.fmt.rate, self.sample_rate):
                delivered += chunk.size
                yield chunk
        except OSError as exc:
            self.error = f"reading stdin failed ({exc.strerror or exc})"
        if delivered < self.block_size and not self.error and not self._stop.is_set():
            self.error = f"stdin ended with no audio to tag ({delivered} samples, less than one hop)"

    def _push(self, ring: SpscRing) -> None:
        push_paced(ring, self.chunks(), self.block_size, self.sample_rate, self.speed, self._stop)
