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
    folder: os.PathLike  # the model folder (its events.toml gives default event settings)
    batch_size: int

    def __call__(self, audio: np.ndarray) -> np.ndarray:
        """One hop ``(batch, hop)`` float32 -> probabilities ``(batch, classes)`` (a reused buffer)."""

    def reset_states(self) -> None:
        """Zero every stream's state, as at stream start."""

    def get_state(self) -> list[np.ndarray]:
        """Copies of the state arrays, for inspection (layout is the backend's own)."""

    def new_pool(self, capacity: int) -> object:
        """State for up to ``capacity`` streams, stepped by :meth:`step_slots` (opaque to callers)."""

    def clear_slots(self, pool: object, slots: Sequence[int]) -> None:
        """Zero these streams' state, as at stream start (a slot joining or leaving)."""

    def step_slots(self, pool: object, slots: np.ndarray, audio: np.ndarray) -> np.ndarray:
        """One hop for each stream in ``slots`` (distinct indices), all in one call.

        ``audio`` is ``(len(slots), hop)``; returns probabilities ``(len(slots), classes)``,
        valid until the next call. Streams not named keep their state untouched.
        """


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
