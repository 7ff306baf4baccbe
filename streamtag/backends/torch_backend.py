"""The reference backend: the eager :class:`~streamtag.models.step.HopStep` (CPU or CUDA)."""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np

from ..errors import BackendUnavailable, ConfigError

try:
    import torch
except ImportError:  # pragma: no cover - torch is a dependency
    raise BackendUnavailable("the torch backend needs PyTorch: pip install 'streamtag[train]'") from None

from ..modelfile import resolve_model_dir
from ..models.io import load_model
from ..models.step import HopStep


def _check_device(device: str) -> torch.device:
    """``cpu``, ``cuda`` or ``cuda:N`` of a visible GPU; anything else is a :class:`ConfigError` naming the flag."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        dev = None
    if dev is None or dev.type not in ("cpu", "cuda"):
        raise ConfigError(f"--torch-device must be cpu, cuda or cuda:N ({device!r} given)")
    if dev.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ConfigError(f"--torch-device {device} asked for, but no CUDA GPU is visible (use --torch-device cpu)")
        if dev.index is not None and dev.index >= count:
            raise ConfigError(f"--torch-device {device}: only {count} CUDA GPU(s) visible (cuda:0 to cuda:{count - 1})")
    return dev


class TorchBackend:
    def __init__(
        self,
        model: str | os.PathLike | None = None,
        batch_size: int = 1,
        device: str = "cpu",
        threads: int | None = None,
    ) -> None:
        self.device = _check_device(device)
        if threads:  # process-wide in torch: only when the caller asks
            torch.set_num_threads(threads)
        self.folder = resolve_model_dir(model)
        self.config, net = load_model(self.folder)
        self.labels = self.config.labels
        self.batch_size = batch_size
        self.step = HopStep(self.config, net).to(self.device).eval()
        # On a GPU, hops go in and probabilities come out through page-locked buffers: the copies
        # run at full bus speed instead of through a pageable staging copy.
        pinned = self.device.type == "cuda"
        hop, classes = self.config.features.hop_length, self.config.num_classes
        self._audio_in = torch.zeros(batch_size, hop, pin_memory=pinned)
        self._probs_out = torch.zeros(batch_size, classes, pin_memory=pinned)
        self.reset_states()

    def reset_states(self) -> None:
        self._state = tuple(s.to(self.device) for s in self.step.init_state(self.batch_size))

    @torch.inference_mode()
    def __call__(self, audio: np.ndarray) -> np.ndarray:
        self._audio_in.numpy()[...] = audio.reshape(self._audio_in.shape)
        x = self._audio_in.to(self.device, non_blocking=True)
        probs, *self._state = self.step(x, *self._state)
        self._probs_out.copy_(probs, non_blocking=True)
        if self.device.type == "cuda":
            torch.cuda.current_stream(self.device).synchronize()
        return self._probs_out.numpy()

    def get_state(self) -> list[np.ndarray]:
        return [s.cpu().numpy().copy() for s in self._state]

    def zero_state(self, batch_size: int) -> list[np.ndarray]:
        return [s.numpy().copy() for s in self.step.init_state(batch_size)]

    # -- many streams: the reference semantics, gathered and scattered per call ---------
    def new_pool(self, capacity: int) -> list[np.ndarray]:
        return self.zero_state(capacity)

    def clear_slots(self, pool: list[np.ndarray], slots: Sequence[int]) -> None:
        for arr in pool:
            arr[slots] = 0.0

    @torch.inference_mode()
    def step_slots(self, pool: list[np.ndarray], slots: np.ndarray, audio: np.ndarray) -> np.ndarray:
        inputs = [
            torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32)) for a in (audio, *(s[slots] for s in pool))
        ]
        probs, *new_state = self.step(*(t.to(self.device) for t in inputs))
        for arr, new in zip(pool, new_state):
            arr[slots] = new.cpu().numpy()
        return probs.cpu().numpy()
