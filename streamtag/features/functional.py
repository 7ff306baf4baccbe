"""Pure functions behind the log-mel features; stateless and tested offline.

The features are torchaudio's: a periodic Hann window, the power spectrum of a
``win_length``-point DFT, HTK mel filters from
``torchaudio.functional.melscale_fbanks`` (0 Hz to Nyquist, no norm), then
``log(mel + log_floor)``. Framing is causal: frame ``i`` ends at sample
``(i + 1) * hop_length`` and looks back ``win_length`` samples, with zeros before
the stream starts, so a frame never waits for future audio.

The DFT is written as two matrix products (cosine and sine, window folded in)
rather than ``torch.stft``: it is the same arithmetic and exports to plain ONNX
MatMuls. The Hann window is symmetric (``w[n] == w[N - n]``, ``w[0] == 0``), so the
frame is folded first: ``x[n] + x[N - n]`` meets the cosines and ``x[n] - x[N - n]``
the sines, which halves the multiply-adds of the largest product in the step.
The torch side computes it in float64 (streaming equals offline to float32
rounding, whatever the BLAS blocking); the exported graph uses float32 for speed,
which moves quiet bins by up to ~2e-4 in log-mel and probabilities by far less.
"""

from __future__ import annotations

import math

import torch
import torchaudio

from ..config import FeatureConfig


def dft_matrices(cfg: FeatureConfig, dtype: torch.dtype = torch.float64) -> tuple[torch.Tensor, torch.Tensor]:
    """Folded, windowed real-DFT matrices, each ``(win_length // 2, n_freqs)``.

    Row ``n - 1`` belongs to samples ``n`` and ``N - n``: ``fold_sum @ cos`` is Re and
    ``fold_diff @ sin`` is Im of the windowed frame's DFT (see :func:`log_mel_frames`).
    """
    size = cfg.win_length
    n = torch.arange(1, size // 2 + 1, dtype=torch.float64)
    k = torch.arange(cfg.n_freqs, dtype=torch.float64)
    window = torch.hann_window(size, periodic=True, dtype=torch.float64)[1 : size // 2 + 1]
    if size % 2 == 0:  # the middle sample pairs with itself: the fold counts it twice
        window[-1] *= 0.5
    angle = 2.0 * math.pi * n[:, None] * k[None, :] / size
    return (window[:, None] * torch.cos(angle)).to(dtype), (-window[:, None] * torch.sin(angle)).to(dtype)


def mel_filterbank(cfg: FeatureConfig, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """HTK mel filters ``(n_freqs, n_mels)`` as torchaudio defines them."""
    fb = torchaudio.functional.melscale_fbanks(
        n_freqs=cfg.n_freqs,
        f_min=0.0,
        f_max=cfg.sample_rate / 2.0,
        n_mels=cfg.n_mels,
        sample_rate=cfg.sample_rate,
        norm=None,
        mel_scale="htk",
    )
    return fb.to(dtype)


def frame_causal(signal: torch.Tensor, cfg: FeatureConfig) -> torch.Tensor:
    """Cut ``(..., time)`` into causal frames ``(..., n_frames, win_length)``.

    ``n_frames = time // hop_length``: a trailing partial hop yields no frame, as in streaming.
    """
    pad = torch.zeros(*signal.shape[:-1], cfg.context_length, dtype=signal.dtype, device=signal.device)
    padded = torch.cat([pad, signal], dim=-1)
    n_frames = signal.shape[-1] // cfg.hop_length
    padded = padded[..., : n_frames * cfg.hop_length + cfg.context_length]
    return padded.unfold(-1, cfg.win_length, cfg.hop_length)


def log_mel_frames(
    frames: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mel_fb: torch.Tensor, log_floor: float
) -> torch.Tensor:
    """``(..., win_length)`` frames -> ``(..., n_mels)`` float32 log-mel, computed in the matrices' dtype."""
    frames = frames.to(cos.dtype)
    half = cos.shape[0]  # a Python int: the exported graph slices with constants
    head = frames[..., 1 : half + 1]  # x[1], ..., x[half]; x[0] meets w[0] == 0
    tail = frames[..., -half:].flip(-1)  # x[N - 1], ..., x[N - half] (a strided Slice: far faster than a Gather)
    real = (head + tail) @ cos  # (..., half) dot (half, freq)
    imag = (head - tail) @ sin
    # (..., freq) dot (freq, n_mels) -> (..., n_mels)
    return torch.log((real * real + imag * imag) @ mel_fb + log_floor).float()


def log_mel_offline(signal: torch.Tensor, cfg: FeatureConfig) -> torch.Tensor:
    """Whole-signal log-mel ``(..., time) -> (..., n_frames, n_mels)``; equals the streaming output."""
    cos, sin = dft_matrices(cfg)
    return log_mel_frames(frame_causal(signal.float(), cfg), cos, sin, mel_filterbank(cfg), cfg.log_floor)
