"""Save and load model folders (torch side). Weights go through safetensors only: no pickle."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ..config import ModelConfig
from ..errors import ConfigError, ModelFileError
from ..modelfile import CONFIG_NAME, WEIGHTS_NAME, load_config, resolve_model_dir
from .base import StreamingModel, build_model


def save_model(model: StreamingModel, cfg: ModelConfig, folder: str | os.PathLike) -> Path:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(folder / WEIGHTS_NAME))
    os.chmod(folder / WEIGHTS_NAME, 0o644)  # safetensors writes 0600: a model is meant to be shared
    (folder / CONFIG_NAME).write_text(cfg.to_json() + "\n")
    return folder


def load_model(path: str | os.PathLike | None = None) -> tuple[ModelConfig, StreamingModel]:
    """Load ``(config, model)`` in eval mode; the config is checked against the weights."""
    folder = resolve_model_dir(path)
    cfg = load_config(folder)
    try:
        model = build_model(cfg)
    except ConfigError as exc:
        raise ModelFileError(f"{folder / CONFIG_NAME}: {exc}") from None
    try:
        weights = load_file(str(folder / WEIGHTS_NAME))
    except (SafetensorError, OSError, ValueError) as exc:
        raise ModelFileError(
            f"{folder / WEIGHTS_NAME} is not a safetensors file ({exc}); weights are never unpickled"
        ) from None
    check_weights(model, weights, folder)
    model.load_state_dict(weights)
    return cfg, model.eval()


def check_weights(model: StreamingModel, weights: dict[str, torch.Tensor], folder: Path) -> None:
    """Name the first disagreement between config-built shapes and the stored tensors."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(weights))
    extra = sorted(set(weights) - set(expected))
    if missing or extra:
        raise ModelFileError(
            f"{folder}: config and weights disagree (missing tensors: {missing[:3]}, unexpected: {extra[:3]}); "
            "was config.json edited or copied from another model?"
        )
    for name, tensor in expected.items():
        if tuple(weights[name].shape) != tuple(tensor.shape):
            raise ModelFileError(
                f"{folder}: config and weights disagree on '{name}': config implies {tuple(tensor.shape)}, "
                f"weights hold {tuple(weights[name].shape)} (check labels, n_mels and arch_params)"
            )
