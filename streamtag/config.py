"""Frozen configuration records. Every tunable number of the pipeline lives here.

A model folder's ``config.json`` is a :class:`ModelConfig` written by
:func:`ModelConfig.to_json`; loading validates every field so that a typo fails
loudly instead of giving silently wrong features.
"""

from __future__ import annotations

import dataclasses as _dc
import json as _json
from typing import Any

from .errors import ConfigError


@_dc.dataclass(frozen=True)
class FeatureConfig:
    """Log-mel features, computed causally: one frame per hop from the last ``win_length`` samples.

    Args:
        sample_rate (int): model rate in Hz; audio at other rates is resampled to it. (Default: ``16000``)
        win_length (int): analysis window in samples, also the FFT size. (Default: ``400`` = 25 ms)
        hop_length (int): samples per frame, the frame budget. (Default: ``160`` = 10 ms)
        n_mels (int): mel bands, HTK scale, 0 Hz to Nyquist. (Default: ``64``)
        log_floor (float): added to mel power before the log, so silence stays finite. (Default: ``1e-6``)
    """

    sample_rate: int = 16000
    win_length: int = 400
    hop_length: int = 160
    n_mels: int = 64
    log_floor: float = 1e-6

    def __post_init__(self) -> None:
        if not 4000 <= self.sample_rate <= 192000:
            raise ConfigError(f"sample_rate must be between 4000 and 192000 Hz ({self.sample_rate} given)")
        if not 0 < self.hop_length <= self.win_length:
            raise ConfigError(
                f"hop_length must be in 1..win_length ({self.hop_length} given, win_length {self.win_length})"
            )
        if not 1 <= self.n_mels <= self.win_length // 2 + 1:
            raise ConfigError(f"n_mels must be in 1..{self.win_length // 2 + 1} ({self.n_mels} given)")
        if not self.log_floor > 0:
            raise ConfigError(f"log_floor must be > 0 ({self.log_floor} given)")

    @property
    def n_freqs(self) -> int:
        return self.win_length // 2 + 1

    @property
    def context_length(self) -> int:
        """Samples of left context kept between hops (``win_length - hop_length``)."""
        return self.win_length - self.hop_length

    @property
    def frame_seconds(self) -> float:
        """The frame budget: one hop in seconds."""
        return self.hop_length / self.sample_rate


OUTPUTS = ("sigmoid", "softmax")


@_dc.dataclass(frozen=True)
class ModelConfig:
    """What a model folder's ``config.json`` holds: architecture, sizes, features and labels.

    Args:
        arch (str): a name registered in :mod:`streamtag.models` (``lstm``, ``attention``, ``cnn``).
        labels (tuple of str): class names, in output order.
        features (FeatureConfig): how the model's input is computed.
        arch_params (dict): keyword arguments of the architecture's constructor.
        output (str): ``sigmoid``: an independent probability per class, any number of sounds at once
            and all low for none (multi-label); ``softmax``: one distribution over the classes, for
            truly single-label data. (Default: ``softmax``, what models saved before the choice were)
    """

    arch: str
    labels: tuple[str, ...]
    features: FeatureConfig = FeatureConfig()
    arch_params: dict[str, Any] = _dc.field(default_factory=dict)
    output: str = "softmax"

    def __post_init__(self) -> None:
        if self.output not in OUTPUTS:
            raise ConfigError(f"output must be one of {', '.join(OUTPUTS)} ({self.output!r} given)")
        if len(self.labels) < 1:
            raise ConfigError("a model needs at least one label (0 given)")
        if len(set(self.labels)) != len(self.labels):
            raise ConfigError("labels must be unique")

    @property
    def num_classes(self) -> int:
        return len(self.labels)

    @property
    def multi_label(self) -> bool:
        return self.output == "sigmoid"

    def to_dict(self) -> dict[str, Any]:
        return {
            "arch": self.arch,
            "labels": list(self.labels),
            "features": _dc.asdict(self.features),
            "arch_params": dict(self.arch_params),
            "output": self.output,
        }

    def to_json(self) -> str:
        return _json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, data: Any) -> ModelConfig:
        if not isinstance(data, dict):
            raise ConfigError("model config must be a JSON object")
        unknown = set(data) - {"arch", "labels", "features", "arch_params", "output"}
        if unknown:
            raise ConfigError(f"unknown model config keys: {sorted(unknown)}")
        for key in ("arch", "labels"):
            if key not in data:
                raise ConfigError(f"model config lacks '{key}'")
        feats = data.get("features", {})
        field_names = {f.name for f in _dc.fields(FeatureConfig)}
        if not isinstance(feats, dict) or set(feats) - field_names:
            raise ConfigError(f"model config 'features' keys must be among {sorted(field_names)}")
        labels = data["labels"]
        if not isinstance(labels, list) or not all(isinstance(x, str) for x in labels):
            raise ConfigError("model config 'labels' must be a list of strings")
        params = data.get("arch_params", {})
        if not isinstance(params, dict):
            raise ConfigError("model config 'arch_params' must be an object")
        try:
            features = FeatureConfig(**feats)
        except TypeError as exc:
            raise ConfigError(f"model config 'features': {exc}") from None
        output = data.get("output", "softmax")
        return cls(
            arch=str(data["arch"]), labels=tuple(labels), features=features, arch_params=params, output=str(output)
        )
