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

        ``l_t = prod(a_0..a_t) * l_prev + sum_k g_k * prod(a_{k+1}..a_t) * x_k`` with ``g = 1 / n``,
        ``a = 1 - g``. Only ``a_0`` can be 0 (a new stream), so the products after it are taken in
        log space and ``a_0`` multiplies the carry alone.
        """
        steps = torch.arange(1, x.shape[1] + 1, dtype=torch.float64, device=x.device)
        n = torch.clamp(count[:, None] + steps, max=float(self.frames))  # (batch, time)
        g = 1.0 / n
        log_a = torch.log1p(-g[:, 1:])  # a_1.. are > 0
        cum = torch.cat([g.new_zeros(g.shape[0], 1), torch.cumsum(log_a, dim=1)], dim=1)  # sum log a_1..a_t
        diff = cum[:, :, None] - cum[:, None, :]  # (batch, t, k): log prod a_{k+1}..a_t
        lower = torch.ones(x.shape[1], x.shape[1], dtype=torch.bool, device=x.device).tril()
        weights = torch.where(lower, torch.exp(diff.clamp(max=0.0)), 0.0) * g[:, None, :]
        carry = (1.0 - g[:, :1]) * torch.exp(cum) * level[:, None]
        return carry + (weights @ x[:, :, None])[:, :, 0]
