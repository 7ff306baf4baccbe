"""The reference backend: the eager :class:`~streamtag.models.step.HopStep` (CPU or CUDA)."""

from __future__ import annotations

import os

import numpy as np

from ..errors import BackendUnavailable, ConfigError, raise_if_interrupted
from . import OwnStreams

try:
    import torch
except ImportError as exc:  # pragma: no cover - torch is a dependency
    raise_if_interrupted(exc)
    raise BackendUnavailable("the torch backend needs PyTorch: pip install '.[train]' (streamtag's folder)") from None

from ..modelfile import resolve_model_dir
from ..models.io import load_model
from ..models.step import ChunkStep, HopStep


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


class TorchState:
    """State of ``capacity`` streams, kept on the backend's device between calls."""

    def __init__(self, tensors: list[torch.Tensor]) -> None:
        self.tensors = tensors
        self.capacity = tensors[0].shape[0]


class TorchBackend(OwnStreams):
    """The reference: the eager hop step. One primitive, :meth:`step` on a state from :meth:`new_state`
    (state stays on the device: a GPU's streams never travel through host memory); ``backend(audio)``
    is a thin adapter stepping the backend's own ``batch_size`` streams."""

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
        self.step_module = HopStep(self.config, net).to(self.device).eval()
        self.chunk_module = ChunkStep(self.step_module)  # a backlog of hops in one forward, same state
        # On a GPU, hops go in and probabilities come out through page-locked buffers: the copies
        # run at full bus speed instead of through a pageable staging copy.
        self._pinned = self.device.type == "cuda"
        self._own = self.new_state(batch_size)
        self._all = np.arange(batch_size)

    # -- the single-stream adapter (OwnStreams) ---------------------------------------
    def get_state(self) -> list[np.ndarray]:
        return [s.cpu().numpy().copy() for s in self._own.tensors]

    def zero_state(self, batch_size: int) -> list[np.ndarray]:
        return [s.numpy().copy() for s in self.step_module.init_state(batch_size)]

    # -- the primitive ------------------------------------------------------------
    @torch.inference_mode()
    def new_state(self, capacity: int, lockstep: bool = False) -> TorchState:
        return TorchState([s.to(self.device) for s in self.step_module.init_state(capacity)])

    @torch.inference_mode()
    def clear(self, state: TorchState, slots) -> None:
        index = torch.as_tensor(np.asarray(slots), dtype=torch.long, device=self.device)
        for t in state.tensors:
            t.index_fill_(0, index, 0.0)

    @torch.inference_mode()
    def snapshot(self, state: TorchState, slot: int) -> list[np.ndarray]:
        return [t[slot].cpu().numpy().copy() for t in state.tensors]

    @torch.inference_mode()
    def restore(self, state: TorchState, slot: int, rows: list[np.ndarray]) -> None:
        for t, row in zip(state.tensors, rows):
            t[slot] = torch.from_numpy(row).to(t.device)

    @torch.inference_mode()
    def step(self, state: TorchState, slots: np.ndarray, audio: np.ndarray) -> np.ndarray:
        n = len(slots)
        whole = self._whole(state, slots)
        x = torch.from_numpy(np.ascontiguousarray(audio, dtype=np.float32).reshape(n, -1))
        if self._pinned:
            x = x.pin_memory()
        x = x.to(self.device, non_blocking=True)
        if whole:  # every stream, in order: no gather or scatter
            probs, *new = self.step_module(x, *state.tensors)
            state.tensors = list(new)
        else:
            index = torch.as_tensor(np.asarray(slots), dtype=torch.long, device=self.device)
            probs, *new = self.step_module(x, *(t.index_select(0, index) for t in state.tensors))
            for t, rows in zip(state.tensors, new):
                t.index_copy_(0, index, rows)
        return probs.cpu().numpy()

    @torch.inference_mode()
    def step_rounds(self, state: TorchState, slots: np.ndarray, audio: np.ndarray) -> np.ndarray:
        """``k`` hops of the streams in ``slots``, ``(k, n, hop) -> (k, n, classes)``, their state gathered and
        scattered once (see the onnx backend's)."""
        k, n = audio.shape[:2]
        if k == 0:
            return np.zeros((0, n, len(self.labels)), np.float32)
        if k == 1 or self._whole(state, slots):
            return np.stack([self.step(state, slots, audio[r]) for r in range(k)])
        index = torch.as_tensor(np.asarray(slots), dtype=torch.long, device=self.device)
        x = torch.from_numpy(np.ascontiguousarray(audio, dtype=np.float32).reshape(k, n, -1)).to(self.device)
        tensors = [t.index_select(0, index) for t in state.tensors]
        out = []
        for r in range(k):
            probs, *tensors = self.step_module(x[r], *tensors)
            out.append(probs)
        for t, rows in zip(state.tensors, tensors):
            t.index_copy_(0, index, rows)
        return torch.stack(out).cpu().numpy()

    @staticmethod
    def _whole(state: TorchState, slots: np.ndarray) -> bool:
        """Every stream of the state, in order: stepped with no gather or scatter."""
        n = len(slots)
        return n == state.capacity and bool((np.asarray(slots) == np.arange(n)).all())

    @torch.inference_mode()
    def step_slot_hops(self, state: TorchState, slot: int, audio: np.ndarray) -> np.ndarray:
        one = TorchState([t[slot : slot + 1].clone() for t in state.tensors])  # a pool's and a lockstep's are alike
        probs = self.step_hops(one, audio[None])[0]
        for t, row in zip(state.tensors, one.tensors):
            t[slot] = row[0]
        return probs

    @torch.inference_mode()
    def step_hops(self, state: TorchState, audio: np.ndarray) -> np.ndarray:
        """``k`` hops of every stream of ``state``: ``(n, k, hop) -> (n, k, classes)``, one forward over them."""
        n = audio.shape[0]
        x = torch.from_numpy(np.ascontiguousarray(audio, dtype=np.float32).reshape(n, -1)).to(self.device)
        probs, *new = self.chunk_module(x, *state.tensors)
        state.tensors = list(new)
        return probs.cpu().numpy()
