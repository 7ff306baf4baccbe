"""Fast CPU backend: the exported hop step on onnxruntime, one thread, no allocation per hop.

Inputs, outputs and two full state sets are allocated once and bound by pointer
(``io_binding``); each call writes into one set and reads the other, then the
two swap. Never imports torch unless a graph must be exported first.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ..errors import BackendUnavailable, ModelFileError
from ..modelfile import FINGERPRINT_KEY, ONNX_NAME, cache_dir, fingerprint, load_config, resolve_model_dir

try:
    import onnxruntime as ort
except ImportError:  # pragma: no cover - onnxruntime is a dependency
    raise BackendUnavailable("the onnx backend needs onnxruntime: pip install onnxruntime") from None


def _session(path: Path, threads: int) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.log_severity_level = 3
    try:
        return ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises its own untyped errors
        raise ModelFileError(f"{path} is not a loadable ONNX graph: {str(exc).splitlines()[0]}") from None


def open_session(folder: Path, threads: int = 1) -> ort.InferenceSession:
    """The ONNX session for a model folder: the shipped graph, the cached export, or a fresh export."""
    expected = fingerprint(folder)
    cached = cache_dir() / "onnx" / f"{expected}.onnx"
    for path in (folder / ONNX_NAME, cached):
        if path.is_file():
            session = _session(path, threads)
            if session.get_modelmeta().custom_metadata_map.get(FINGERPRINT_KEY) == expected:
                return session
    try:
        from ..models.export import export_onnx
    except ImportError:
        raise BackendUnavailable(
            f"{folder} has no up-to-date {ONNX_NAME}, and exporting one needs torch (pip install torch==2.11.0), "
            "or run 'streamtag export' where torch is installed"
        ) from None
    export_onnx(folder, cached)
    return _session(cached, threads)


class OnnxBackend:
    def __init__(self, model: str | os.PathLike | None = None, batch_size: int = 1, threads: int = 1) -> None:
        folder = resolve_model_dir(model)
        self.config = load_config(folder)
        self.labels = self.config.labels
        self.batch_size = batch_size
        self.session = open_session(folder, threads)
        self._state_inputs = [i for i in self.session.get_inputs() if i.name != "audio"]
        self._state_shapes = [(batch_size, *i.shape[1:]) for i in self._state_inputs]
        hop = self.config.features.hop_length
        self._audio = np.zeros((batch_size, hop), dtype=np.float32)
        self._probs = np.zeros((batch_size, self.config.num_classes), dtype=np.float32)
        self._sets = [[np.zeros(s, dtype=np.float32) for s in self._state_shapes] for _ in range(2)]
        self._bindings = [self._bind(self._sets[i], self._sets[1 - i]) for i in range(2)]
        self._current = 0

    def _bind(self, state_in: list[np.ndarray], state_out: list[np.ndarray]) -> ort.IOBinding:
        binding = self.session.io_binding()
        for name, arr in [("audio", self._audio)] + list(zip((i.name for i in self._state_inputs), state_in)):
            binding.bind_input(name, "cpu", 0, np.float32, list(arr.shape), arr.ctypes.data)
        binding.bind_output("probs", "cpu", 0, np.float32, list(self._probs.shape), self._probs.ctypes.data)
        for inp, arr in zip(self._state_inputs, state_out):
            binding.bind_output(inp.name + "_out", "cpu", 0, np.float32, list(arr.shape), arr.ctypes.data)
        return binding

    def __call__(self, audio: np.ndarray) -> np.ndarray:
        self._audio[...] = audio.reshape(self._audio.shape)
        self.session.run_with_iobinding(self._bindings[self._current])
        self._current = 1 - self._current
        return self._probs

    def reset_states(self) -> None:
        for arr in self._sets[self._current]:
            arr.fill(0.0)

    def get_state(self) -> list[np.ndarray]:
        return [arr.copy() for arr in self._sets[self._current]]

    def set_state(self, state: Sequence[np.ndarray]) -> None:
        for dst, src in zip(self._sets[self._current], state):
            dst[...] = src

    def zero_state(self, batch_size: int) -> list[np.ndarray]:
        return [np.zeros((batch_size, *shape[1:]), dtype=np.float32) for shape in self._state_shapes]

    def run_batch(self, audio: np.ndarray, state: Sequence[np.ndarray]) -> tuple[np.ndarray, list[np.ndarray]]:
        """Any batch size, allocating: ``(probs, new_state)``. For callers that gather streams themselves."""
        feeds = {"audio": np.ascontiguousarray(audio, dtype=np.float32)}
        feeds.update({i.name: s for i, s in zip(self._state_inputs, state)})
        probs, *new_state = self.session.run(None, feeds)
        return probs, new_state
