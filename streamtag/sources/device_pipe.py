"""A sound card as a pipe: ``python -m streamtag.sources.device_pipe DEVICE RATE`` writes the card's audio to
stdout as mono float32 little-endian PCM at ``RATE`` Hz, until the card is missing, lost or silent for
:data:`STALL_SECONDS` (exit 1, the reason as the last line on stderr) or the reader goes (exit 0).

Why a process of its own: PortAudio finds a device plugged in after it started only by being terminated
and started again, and that closes every stream the process has open. ``serve`` with two sound cards would
cut one off each time it looks for the other; here each card has its own PortAudio, so ``serve`` reopens
one by starting this program again, as it restarts ffmpeg for a pulled source.
"""

from __future__ import annotations

import os
import signal
import sys
import time

import numpy as np

from ..errors import StreamtagError
from ..resample import StreamResampler
from ..ring import SpscRing

STALL_SECONDS = 2.0  # a card that delivers nothing this long is taken as lost (as live --reconnect)
POLL_S = 0.02  # the ring is read this often; it holds BUFFER_S, far more
BUFFER_S = 2.0


def run(device: str, rate: int, out) -> str | None:
    """Copy the card's audio to ``out`` until it fails (the reason) or ``out`` is closed (``None``)."""
    from .device import MicrophoneSource

    try:
        source = MicrophoneSource(rate, device, block_size=rate // 10)
    except StreamtagError as exc:  # said by serve, whose config key is device = ...
        return str(exc).replace("--device ", "device ", 1)
    ring = SpscRing(1 << int(np.ceil(np.log2(BUFFER_S * source.sample_rate))))
    buffer = np.zeros(ring.capacity, np.float32)
    resampler = StreamResampler(source.sample_rate, rate) if source.sample_rate != rate else None
    stopping = []
    signal.signal(signal.SIGTERM, lambda *_: stopping.append(True))
    try:
        source.start(ring)
    except StreamtagError as exc:
        return str(exc)
    last, said_behind, why = time.monotonic(), False, None
    try:
        while not stopping:
            got = ring.read_into(buffer)
            if got:
                block = buffer[:got] if resampler is None else resampler.process(buffer[:got])
                out.write(block.astype("<f4", copy=False).tobytes())
                out.flush()
                last = time.monotonic()
            elif source.finished:
                why = source.error
                break
            elif time.monotonic() - last > STALL_SECONDS:
                why = f"input device '{source.device_name}' gave no audio for {STALL_SECONDS:g} s"
                break
            if ring.dropped and not said_behind:  # the reader held us up for seconds: said once
                print(f"the reader fell behind '{source.device_name}'; samples are lost", file=sys.stderr, flush=True)
                said_behind = True
            time.sleep(POLL_S)
    except BrokenPipeError:  # the reader is gone: nothing to say to it
        pass
    finally:
        source.stop()
    return why


def main(argv: list[str]) -> int:
    if len(argv) != 2 or not argv[1].isdigit():
        print("usage: python -m streamtag.sources.device_pipe DEVICE RATE", file=sys.stderr)
        return 2
    why = run(argv[0], int(argv[1]), sys.stdout.buffer)
    if why:
        print(why, file=sys.stderr, flush=True)
    sys.stderr.flush()
    os._exit(1 if why else 0)  # not the interpreter's exit: PortAudio's clean-up may hang on a stuck device


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
