"""Audio -> log-mel frames. Never imports :mod:`streamtag.models`."""

from .functional import frame_causal, log_mel_offline
from .streaming import LogMel, StreamingLogMel

__all__ = ["LogMel", "StreamingLogMel", "frame_causal", "log_mel_offline"]
