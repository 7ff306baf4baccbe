"""Causal input-level normalisation: the same sound at any gain gives the same features.

A gain multiplies the power spectrum, so it adds one constant to every log-mel value.
:class:`LevelNorm` subtracts a running estimate of the input level (the frame's mean
log-mel over bands), which removes that constant once the estimate has adapted, and
keeps spectral shape and the contrast between a sound and its background. The
estimate is a cumulative mean for the first ``level_seconds`` of a stream (so the
first frames are already normalised) and an exponential mean after that (so it
forgets, and state stays bounded over hours).

The subtracted level never goes below ``floor_db``: the level of white noise at that
RMS in dBFS. Below it the features are absolute again, so a quiet room stays quiet
(its hiss is not blown up to look like rain) while anything above the floor is
level-invariant.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..config import FeatureConfig
from ..features.functional import mel_filterbank

State = tuple[torch.Tensor, ...]


def white_noise_bands(cfg: FeatureConfig) -> torch.Tensor:
    """Expected mel power per band ``(n_mels,)`` float64 of white noise at 0 dBFS RMS.

    White noise of variance 1 has expected power ``sum(w**2)`` in every DFT bin, so each mel
    band holds that times the sum of its filter weights; other levels scale it.
    """
    window = torch.hann_window(cfg.win_length, periodic=True, dtype=torch.float64)
    return float((window**2).sum()) * mel_filterbank(cfg).sum(0)


def white_noise_level(cfg: FeatureConfig, rms_db: float) -> float:
    """Mean log-mel (the quantity :class:`LevelNorm` tracks) of white noise at ``rms_db`` dBFS RMS."""
    band_power = 10.0 ** (rms_db / 10.0) * white_noise_bands(cfg)
    return float(torch.log(band_power + cfg.log_floor).mean())


class LevelNorm(nn.Module):
    """``(batch, time, n_mels)`` log-mel -> the same minus the running input level.

    State: one ``(batch, 2)`` tensor, the level estimate and the frames counted so far
    (capped at the time constant), zeros for a new stream. ``step`` and ``forward``
    run the same recurrence; offline it is evaluated in closed form, chunk by chunk.
    """

    n_state = 1
    chunk = 256

    def __init__(self, cfg: FeatureConfig, level_seconds: float, floor_db: float) -> None:
        super().__init__()
        if not level_seconds > 0:
            raise ValueError(f"level_seconds must be > 0 ({level_seconds} given)")
        self.frames = max(1, int(round(level_seconds / cfg.frame_seconds)))
        self.floor = white_noise_level(cfg, floor_db)
        self._tri: torch.Tensor | None = None  # the exponential phase's weights, built on first use

    def init_state(self, batch_size: int, device) -> State:
        return (torch.zeros(batch_size, 2, device=device),)

    def step(self, frame: torch.Tensor, state: State) -> tuple[torch.Tensor, State]:
        """One frame ``(batch, n_mels)``; written with plain ops for the exported graph."""
        (prev,) = state
        level, count = prev[:, :1], prev[:, 1:]
        count = torch.clamp(count + 1.0, max=float(self.frames))
        level = level + (frame.mean(dim=1, keepdim=True) - level) / count
        out = frame - torch.clamp(level, min=self.floor)
        return out, (torch.cat([level, count], dim=1),)

    def forward(self, feats: torch.Tensor, state: State) -> tuple[torch.Tensor, State]:
        if feats.shape[1] == 1:
            out, state = self.step(feats[:, 0], state)
            return out[:, None], state
        (prev,) = state
        level, count = prev[:, 0].double(), prev[:, 1].double()
        frame_level = feats.double().mean(dim=2)  # (batch, time)
        levels = []
        for start in range(0, frame_level.shape[1], self.chunk):
            part = frame_level[:, start : start + self.chunk]
            run = self._chunk(part, level, count)
            levels.append(run)
            level, count = run[:, -1], torch.clamp(count + part.shape[1], max=float(self.frames))
        levels = torch.cat(levels, dim=1)
        out = feats - torch.clamp(levels, min=self.floor).to(feats.dtype)[:, :, None]
        return out, (torch.stack([level, count], dim=1).to(prev.dtype),)

    def _chunk(self, x: torch.Tensor, level: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
        """Closed form of ``l_t = l_{t-1} + (x_t - l_{t-1}) / n_t``, ``n_t = min(count + t + 1, frames)``.

        While ``n_t`` still counts up it is a cumulative mean, ``l_t = (count * l_prev + x_0 + .. + x_t) / n_t``;
        once it is capped it is an exponential mean with ``a = 1 - 1 / frames``,
        ``l_t = a^(t - s + 1) l_{s-1} + sum_{k=s..t} a^(t - k) x_k / frames`` from the first capped frame ``s``.
        Both are evaluated for every ``t`` (a cumulative sum, and one fixed lower-triangular matrix) and the
        right one is picked per frame: no ``time x time`` temporaries, and nothing to evaluate per chunk size.
        """
        t = x.shape[1]
        steps = torch.arange(t, dtype=torch.float64, device=x.device)[None, :]  # (1, time)
        frames = float(self.frames)
        counting = (count[:, None] + steps + 1.0) <= frames  # (batch, time): n_t not capped yet
        cumulative = (count[:, None] * level[:, None] + torch.cumsum(x, dim=1)) / (count[:, None] + steps + 1.0)
        first = torch.clamp(frames - count, min=0.0)[:, None]  # s: frames still counting (may pass this chunk)
        last_counted = torch.minimum(torch.clamp(first - 1.0, min=0.0), steps[:, -1:]).long()
        base = torch.where(first > 0, torch.gather(cumulative, 1, last_counted), level[:, None])  # l_{s-1}
        decay = 1.0 - 1.0 / frames
        weights = self._weights(t, decay, x.device)  # (k, t): a^(t - k) / frames where k <= t
        tail = torch.where(counting, 0.0, x) @ weights
        carry = torch.exp((steps - first + 1.0) * math.log(decay)) * base
        return torch.where(counting, cumulative, carry + tail)

    def _weights(self, t: int, decay: float, device) -> torch.Tensor:
        size = max(self.chunk, t)
        if self._tri is None or self._tri.shape[0] < size or self._tri.device != torch.device(device):
            k = torch.arange(size, dtype=torch.float64, device=device)
            diff = k[None, :] - k[:, None]  # t - k, rows k, columns t: no transpose in the graph
            self._tri = torch.where(diff >= 0, decay ** diff.clamp(min=0) / self.frames, 0.0)
        return self._tri[:t, :t]
