"""Audio -> log-mel frames. Never imports :mod:`streamtag.models`."""

from .functional import frame_causal, log_mel_offline
from .streaming import LogMel

__all__ = ["LogMel", "frame_causal", "log_mel_offline"]
