import numpy as np
import torch
import torchaudio

from streamtag.config import FeatureConfig
from streamtag.features import LogMel, log_mel_offline

from .conftest import EXAMPLES, read_clip


def _streaming(signal: np.ndarray, cfg: FeatureConfig) -> np.ndarray:
    """Hop by hop as the hop step does it: kept left context + the new hop -> one frame."""
    log_mel, context = LogMel(cfg), torch.zeros(cfg.context_length)
    x, frames = torch.from_numpy(signal), []
    for i in range(0, x.numel() - cfg.hop_length + 1, cfg.hop_length):
        frame = torch.cat([context, x[i : i + cfg.hop_length]])
        frames.append(log_mel(frame))
        context = frame[cfg.hop_length :]
    return torch.stack(frames).numpy()


def _check_stream_equals_offline(signal):
    cfg = FeatureConfig()
    offline = log_mel_offline(torch.from_numpy(signal), cfg).numpy()
    streamed = _streaming(signal, cfg)
    assert offline.shape == (signal.size // cfg.hop_length, cfg.n_mels)
    # 1e-5, absolute and relative: log-mel values reach ~15, where float32 spacing is ~1e-6
    np.testing.assert_allclose(streamed, offline, atol=1e-5, rtol=1e-5)


def test_streaming_equals_offline_on_repo_clip():
    _check_stream_equals_offline(read_clip(EXAMPLES / "rain.flac"))


def test_streaming_equals_offline_on_esc50_clips(esc50):
    for name in sorted((esc50 / "audio").iterdir())[:5]:
        _check_stream_equals_offline(read_clip(name))


def test_matches_torchaudio_melspectrogram():
    """Same definition as torchaudio's MelSpectrogram (periodic Hann, HTK, power 2) on causally padded audio."""
    cfg = FeatureConfig()
    signal = torch.from_numpy(read_clip(EXAMPLES / "dog.flac"))
    ours = log_mel_offline(signal, cfg)
    padded = torch.cat([torch.zeros(cfg.context_length), signal])
    mel = torchaudio.transforms.MelSpectrogram(
        sample_rate=cfg.sample_rate,
        n_fft=cfg.win_length,
        hop_length=cfg.hop_length,
        n_mels=cfg.n_mels,
        center=False,
        power=2.0,
        mel_scale="htk",
        norm=None,
    )(padded)
    ref = torch.log(mel + cfg.log_floor).T[: ours.shape[0]]
    assert ref.shape == ours.shape
    assert (ours - ref).abs().max().item() < 2e-3  # float32 DFT as matmul vs FFT
    assert (ours - ref).abs().mean().item() < 1e-4


def test_tone_peaks_in_the_right_band():
    cfg = FeatureConfig()
    t = np.arange(16000) / 16000
    feats = log_mel_offline(torch.from_numpy(np.sin(2 * np.pi * 1000 * t).astype(np.float32)), cfg)
    fb = torchaudio.functional.melscale_fbanks(cfg.n_freqs, 0, 8000, cfg.n_mels, 16000, None, "htk")
    expected_band = int(fb[round(1000 / 8000 * (cfg.n_freqs - 1))].argmax())
    assert int(feats[50].argmax()) == expected_band
