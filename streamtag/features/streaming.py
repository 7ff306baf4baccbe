"""Log-mel as a module: the hop step (models/step.py) runs it on ``win_length - hop_length`` samples of
left context plus the new hop, so a signal fed hop by hop gives exactly the frames of
:func:`~streamtag.features.functional.log_mel_offline` over the whole signal (same causal framing,
same matrices).
"""

from __future__ import annotations

import torch
from torch import nn

from ..config import FeatureConfig
from .functional import dft_matrices, frame_causal, log_mel_frames, mel_filterbank


class LogMel(nn.Module):
    """Frames ``(..., win_length)`` -> log-mel ``(..., n_mels)``; constants stored as buffers.

    ``dtype`` is the arithmetic precision (float64 reference; float32 in exported graphs).

    Example:
        >>> feats = LogMel(FeatureConfig()).from_signal(torch.randn(16000))  # (100, 64)
    """

    def __init__(self, cfg: FeatureConfig, dtype: torch.dtype = torch.float64) -> None:
        super().__init__()
        self.cfg = cfg
        cos, sin = dft_matrices(cfg, dtype)
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)
        self.register_buffer("mel_fb", mel_filterbank(cfg, dtype), persistent=False)

    def forward(self, frames: torch.Tensor) -> torch.Tensor:
        return log_mel_frames(frames, self.cos, self.sin, self.mel_fb, self.cfg.log_floor)

    def from_signal(self, signal: torch.Tensor) -> torch.Tensor:
        """Offline: ``(..., time)`` -> ``(..., time // hop_length, n_mels)``."""
        return self(frame_causal(signal, self.cfg))
