"""Runtimes that run the hop step. Chosen once at start-up; the worker never branches on them.

A backend is one class with the :class:`Backend` shape, added to ``BACKENDS``.
Imports are lazy: the onnx backend never imports torch.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Sequence
from typing import Protocol

import numpy as np

from ..config import ModelConfig
from ..errors import ConfigError


class Backend(Protocol):
    """Runtime side of a model: holds the streaming state of ``batch_size`` streams."""

    config: ModelConfig
    labels: Sequence[str]
    batch_size: int

    def __call__(self, audio: np.ndarray) -> np.ndarray:
        """One hop ``(batch, hop)`` float32 -> probabilities ``(batch, classes)`` (a reused buffer)."""

    def reset_states(self) -> None:
        """Zero every stream's state, as at stream start."""

    def get_state(self) -> list[np.ndarray]:
        """Copies of the state arrays, batch first (context first)."""

    def set_state(self, state: Sequence[np.ndarray]) -> None:
        """Replace the state with arrays shaped like :meth:`get_state`'s."""

    def zero_state(self, batch_size: int) -> list[np.ndarray]:
        """Fresh state arrays for ``batch_size`` streams (for callers that hold state themselves)."""

    def run_batch(self, audio: np.ndarray, state: Sequence[np.ndarray]) -> tuple[np.ndarray, list[np.ndarray]]:
        """Any batch: ``(probs, new_state)`` with state passed explicitly; the backend's own state is untouched."""


BACKENDS = {
    "onnx": "streamtag.backends.onnx_backend:OnnxBackend",
    "torch": "streamtag.backends.torch_backend:TorchBackend",
}


def make_backend(name: str, model: str | os.PathLike | None = None, batch_size: int = 1, **options) -> Backend:
    """Open ``model`` (a folder; the bundled default when ``None``) on the named backend."""
    if name not in BACKENDS:
        raise ConfigError(f"unknown backend '{name}' (choose from: {', '.join(BACKENDS)})")
    module_name, class_name = BACKENDS[name].split(":")
    cls = getattr(importlib.import_module(module_name), class_name)
    return cls(model, batch_size=batch_size, **options)
