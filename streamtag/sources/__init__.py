"""Audio sources: each pushes float32 mono blocks into a :class:`~streamtag.ring.SpscRing`.

Nothing downstream knows which source it is. ``MicrophoneSource`` lives in
:mod:`streamtag.sources.device` and is imported only where a microphone is used,
so replay, training and benchmarks work without PortAudio.
"""

from .base import Source, SourceStatus
from .file import WavReplaySource, read_audio

__all__ = ["Source", "SourceStatus", "WavReplaySource", "read_audio"]
