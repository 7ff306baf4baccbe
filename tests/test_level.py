"""The input-level normaliser: streaming == offline, gain invariance once adapted, quiet input stays quiet."""

import numpy as np
import pytest
import torch

from streamtag.config import FeatureConfig, ModelConfig
from streamtag.features import log_mel_offline
from streamtag.models import build_model
from streamtag.models.level import LevelNorm, white_noise_level

from .conftest import EXAMPLES, read_clip

CFG = FeatureConfig(log_floor=1e-9)  # what `streamtag train` uses


def _feats(samples: np.ndarray) -> torch.Tensor:
    return log_mel_offline(torch.from_numpy(samples.astype(np.float32)), CFG)[None]


def test_streaming_equals_offline_for_any_chunking():
    level = LevelNorm(CFG, level_seconds=0.5, floor_db=-70.0)
    x = _feats(read_clip(EXAMPLES / "dog.flac"))
    offline, end_state = level(x, level.init_state(1, "cpu"))
    rng = np.random.default_rng(0)
    for _ in range(3):
        state, outs, i = level.init_state(1, "cpu"), [], 0
        while i < x.shape[1]:
            n = int(rng.integers(1, 300)) if i else 257  # a chunk boundary leaves one frame: the offline edge case
            out, state = level(x[:, i : i + n], state)
            outs.append(out)
            i += n
        assert (torch.cat(outs, 1) - offline).abs().max().item() < 1e-4
        assert (state[0] - end_state[0]).abs().max().item() < 1e-4


@pytest.mark.parametrize("gain_db", [-30.0, -10.0, 6.0])
def test_a_gain_change_leaves_normalised_features_unchanged(gain_db):
    """A gain adds a constant to log-mel; the normaliser removes it from the first frame on (cumulative start)."""
    level = LevelNorm(CFG, level_seconds=3.0, floor_db=-90.0)
    audio = read_clip(EXAMPLES / "chainsaw.flac")
    ref, _ = level(_feats(audio), level.init_state(1, "cpu"))
    raw_quiet = _feats(audio * 10 ** (gain_db / 20))
    quiet, _ = level(raw_quiet, level.init_state(1, "cpu"))
    # bins that stay 10 dB above the log floor (near-empty bins of a quieter input reach the floor)
    audible = raw_quiet > np.log(CFG.log_floor) + 10 * np.log(10) / 10
    assert audible.float().mean().item() > 0.5
    assert (quiet - ref)[audible].abs().max().item() < 0.05  # log units; raw features moved by |gain| / 4.3
    raw_shift = abs(gain_db) * np.log(10) / 10
    assert (_feats(audio * 10 ** (gain_db / 20)) - _feats(audio)).abs().mean().item() > 0.8 * raw_shift


def test_input_below_the_floor_is_not_blown_up():
    """A quiet hiss (a microphone's self-noise) stays far below where a sound at normal level sits."""
    level = LevelNorm(CFG, level_seconds=1.0, floor_db=-70.0)
    rng = np.random.default_rng(0)
    hiss = rng.normal(0, 10 ** (-90 / 20), 16000 * 2).astype(np.float32)  # -90 dBFS RMS
    loud = rng.normal(0, 10 ** (-20 / 20), 16000 * 2).astype(np.float32)
    quiet_out, _ = level(_feats(hiss), level.init_state(1, "cpu"))
    loud_out, _ = level(_feats(loud), level.init_state(1, "cpu"))
    assert quiet_out.mean().item() < -4.0  # 20 dB below the floor, in natural-log units
    assert abs(loud_out.mean().item()) < 0.5  # above the floor: normalised to its own level
    assert white_noise_level(CFG, -50) - white_noise_level(CFG, -70) == pytest.approx(20 * np.log(10) / 10, abs=1e-3)


def test_model_probabilities_hold_across_input_level():
    """End to end through a multi-label model with the normaliser: -25 dB gives the probabilities of 0 dB."""
    torch.manual_seed(0)
    params = {"hidden": 16, "dilations": [1, 2], "pool_seconds": [0.5]}
    cfg = ModelConfig("cnn", ("a", "b", "c"), CFG, dict(params, level_seconds=3.0), "sigmoid")
    model = build_model(cfg).eval()
    audio = read_clip(EXAMPLES / "rain.flac")  # no digital silence: exact zeros stay at the floor at any gain
    with torch.inference_mode():
        ref, _ = model(_feats(audio), model.init_state(1))
        quiet, _ = model(_feats(audio * 10 ** (-25 / 20)), model.init_state(1))
        without = build_model(ModelConfig("cnn", ("a", "b", "c"), CFG, params, "sigmoid"))
        without.load_state_dict(model.state_dict())
        without.eval()
        raw_ref, _ = without(_feats(audio), without.init_state(1))
        raw_quiet, _ = without(_feats(audio * 10 ** (-25 / 20)), without.init_state(1))
    moved = (torch.sigmoid(quiet) - torch.sigmoid(ref)).abs().max().item()
    assert moved < 0.02
    assert (torch.sigmoid(raw_quiet) - torch.sigmoid(raw_ref)).abs().max().item() > 5 * moved
