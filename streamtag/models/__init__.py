"""Causal models (torch side: training, offline forward, export). Import registers the architectures."""

from . import attention, cnn, lstm  # noqa: F401  (registration)
from .base import State, StreamingModel, architectures, build_model, register

__all__ = ["State", "StreamingModel", "architectures", "build_model", "register"]
