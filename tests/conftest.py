"""Shared fixtures: real clips (repo examples, and ../shared ESC-50 when present) and tiny models built in code."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "streamtag" / "assets" / "examples"
ESC50 = REPO.parent / "shared" / "data" / "esc50"

ARCH_PARAMS = {
    "lstm": {"hidden": 32, "pool_seconds": [0.3, 1.0]},
    "cnn": {"hidden": 24, "dilations": [1, 2, 4], "pool_seconds": [0.5]},
    "attention": {"hidden": 32, "heads": 2, "layers": 2, "window": 30, "pool_seconds": [0.5]},
}
LABELS = ("dog", "rain", "chainsaw", "rooster", "other")
# "<arch>-ml": multi-label (sigmoid), with the input-level normaliser and the gated head
VARIANTS = sorted(ARCH_PARAMS) + [f"{arch}-ml" for arch in sorted(ARCH_PARAMS)]


@pytest.fixture(autouse=True, scope="session")
def _isolated_cache(tmp_path_factory):
    os.environ["STREAMTAG_CACHE"] = str(tmp_path_factory.mktemp("cache"))


@pytest.fixture(scope="session")
def esc50() -> Path:
    if not (ESC50 / "meta" / "esc50.csv").is_file():
        pytest.skip(f"ESC-50 clips not found at {ESC50} (../shared absent)")
    return ESC50


@pytest.fixture(scope="session")
def dog_clip() -> Path:
    return EXAMPLES / "dog.flac"


def make_model(variant: str, folder: Path, seed: int = 0) -> Path:
    import torch

    from streamtag.config import ModelConfig
    from streamtag.models import build_model
    from streamtag.models.io import save_model

    torch.manual_seed(seed)
    arch, multi_label = variant.removesuffix("-ml"), variant.endswith("-ml")
    params = dict(ARCH_PARAMS[arch], level_seconds=1.0, pool_gate=True) if multi_label else ARCH_PARAMS[arch]
    cfg = ModelConfig(arch=arch, labels=LABELS, arch_params=params, output="sigmoid" if multi_label else "softmax")
    model = build_model(cfg)
    with torch.no_grad():  # plausible input statistics so outputs are not saturated
        model.feat_mean.fill_(-8.0)
        model.feat_std.fill_(3.0)
        if model.head.gate is not None:  # a gate that varies from frame to frame, as a trained one does
            model.head.gate.weight.normal_(0.0, 0.3)
            model.head.gate.bias.fill_(0.0)
    return save_model(model, cfg, folder)


@pytest.fixture(scope="session", params=VARIANTS)
def model_dir(request, tmp_path_factory) -> Path:
    return make_model(request.param, tmp_path_factory.mktemp(request.param))


@pytest.fixture(scope="session")
def cnn_dir(tmp_path_factory) -> Path:
    return make_model("cnn", tmp_path_factory.mktemp("cnn_single"))


def run_cli(*args: str, timeout: float = 120, **kwargs):
    """Run ``python -m streamtag`` in a subprocess (as a user would); returns CompletedProcess."""
    import subprocess

    return subprocess.run(
        [sys.executable, "-m", "streamtag", *map(str, args)], capture_output=True, text=True, timeout=timeout, **kwargs
    )


def start_cli(*args: str, env=None):
    """Start ``python -m streamtag`` in the background (for signal and live tests); text pipes."""
    import subprocess

    return subprocess.Popen(
        [sys.executable, "-m", "streamtag", *map(str, args)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def read_clip(path: Path, rate: int = 16000) -> np.ndarray:
    from streamtag.sources import read_audio

    return read_audio(path, rate)[0]
