"""Pure functions behind the log-mel features; stateless and tested offline.

The features are torchaudio's: a periodic Hann window, the power spectrum of a
``win_length``-point DFT, HTK mel filters from
``torchaudio.functional.melscale_fbanks`` (0 Hz to Nyquist, no norm), then
``log(mel + log_floor)``. Framing is causal: frame ``i`` ends at sample
``(i + 1) * hop_length`` and looks back ``win_length`` samples, with zeros before
the stream starts, so a frame never waits for future audio.

The DFT is written as two matrix products (cosine and sine, window folded in)
rather than ``torch.stft``: it is the same arithmetic and exports to plain ONNX
MatMuls. The torch side computes it in float64 (streaming equals offline to float32
rounding, whatever the BLAS blocking); the exported graph uses float32 for speed,
which moves quiet bins by up to ~2e-4 in log-mel and probabilities by far less.
"""

from __future__ import annotations

import math

import torch
import torchaudio

from ..config import FeatureConfig


def dft_matrices(cfg: FeatureConfig, dtype: torch.dtype = torch.float64) -> tuple[torch.Tensor, torch.Tensor]:
    """Windowed real-DFT matrices, each ``(win_length, n_freqs)``: ``frames @ m`` gives Re and Im."""
    n = torch.arange(cfg.win_length, dtype=torch.float64)
    k = torch.arange(cfg.n_freqs, dtype=torch.float64)
    window = torch.hann_window(cfg.win_length, periodic=True, dtype=torch.float64)
    angle = 2.0 * math.pi * n[:, None] * k[None, :] / cfg.win_length
    real = window[:, None] * torch.cos(angle)
    imag = -window[:, None] * torch.sin(angle)
    return real.to(dtype), imag.to(dtype)


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


def fused_matrices(cfg: FeatureConfig, dtype: torch.dtype = torch.float64) -> tuple[torch.Tensor, torch.Tensor]:
    """``[Re | Im]`` DFT ``(win_length, 2 * n_freqs)`` and ``[mel; mel]`` ``(2 * n_freqs, n_mels)``.

    ``|X|^2 @ mel == ([Re | Im] ** 2) @ [mel; mel]``: two matmuls and one square (fewer ONNX kernels).
    """
    real, imag = dft_matrices(cfg, dtype)
    mel = mel_filterbank(cfg, dtype)
    return torch.cat([real, imag], dim=1), torch.cat([mel, mel], dim=0)


def log_mel_frames(frames: torch.Tensor, dft: torch.Tensor, mel_fb: torch.Tensor, log_floor: float) -> torch.Tensor:
    """``(..., win_length)`` frames -> ``(..., n_mels)`` float32 log-mel, computed in the matrices' dtype."""
    spectrum = frames.to(dft.dtype) @ dft  # (..., win) dot (win, 2 * freq)
    # (..., 2 * freq) dot (2 * freq, n_mels) -> (..., n_mels)
    return torch.log((spectrum * spectrum) @ mel_fb + log_floor).float()


def log_mel_offline(signal: torch.Tensor, cfg: FeatureConfig) -> torch.Tensor:
    """Whole-signal log-mel ``(..., time) -> (..., n_frames, n_mels)``; equals the streaming output."""
    dft, mel_fb = fused_matrices(cfg)
    return log_mel_frames(frame_causal(signal.float(), cfg), dft, mel_fb, cfg.log_floor)
