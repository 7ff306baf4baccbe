"""Stateful log-mel: one frame per hop, keeping ``win_length - hop_length`` samples of left context.

Chunk-safe: feeding a signal hop by hop gives exactly the frames of
:func:`~streamtag.features.functional.log_mel_offline` over the whole signal,
because both use the same causal framing and the same matrices.
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


class StreamingLogMel:
    """Hop-by-hop log-mel with explicit left context, like silero-vad's ``_context``.

    ``__call__(hop)`` takes ``(..., hop_length)`` samples and returns ``(..., n_mels)``.
    """

    def __init__(self, cfg: FeatureConfig) -> None:
        self.cfg = cfg
        self.log_mel = LogMel(cfg)
        self._context: torch.Tensor | None = None

    def reset_states(self) -> None:
        self._context = None

    def __call__(self, hop: torch.Tensor) -> torch.Tensor:
        if hop.shape[-1] != self.cfg.hop_length:
            raise ValueError(f"expected {self.cfg.hop_length} samples per hop ({hop.shape[-1]} given)")
        if self._context is None or self._context.shape[:-1] != hop.shape[:-1]:
            self._context = hop.new_zeros(*hop.shape[:-1], self.cfg.context_length)
        frame = torch.cat([self._context, hop], dim=-1)
        self._context = frame[..., self.cfg.hop_length :]
        return self.log_mel(frame)
