"""Fast CPU backend: the exported hop step on onnxruntime, one thread, no allocation per hop.

Inputs, outputs and two full state sets are allocated once and bound by pointer
(``io_binding``); each call writes into one set and reads the other, then the
two swap. Models with delay lines (the CNN's dilated convolutions) keep their
history in rings this module owns: the graph gathers the few rows it reads and
returns one new row per line, which lands in place, so no hop copies the history.
Never imports torch unless a graph must be exported first.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ..errors import BackendUnavailable, ModelFileError
from ..modelfile import FINGERPRINT_KEY, ONNX_NAME, RING_KEY, cache_dir, fingerprint, load_config, resolve_model_dir

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


class Rings:
    """The delay lines of a graph: ``frames`` rows per line and stream, read ``lags`` frames back."""

    def __init__(self, spec: str) -> None:
        data = json.loads(spec)
        self.frames, self.width = int(data["frames"]), int(data["width"])
        self.lags = np.asarray(data["lags"], dtype=np.int64)  # (lines, taps per line)
        self.lines = self.lags.shape[0]
        self._line = np.arange(self.lines, dtype=np.int64)[:, None]

    def time_major_taps(self, position: int, streams: int) -> np.ndarray:
        """``(lines, streams, taps)`` row indices into a ``(frames, streams, lines, width)`` ring at ``position``."""
        t = (position - self.lags) % self.frames  # (lines, taps)
        b = np.arange(streams, dtype=np.int64)[:, None]
        return np.ascontiguousarray((t[:, None, :] * streams + b) * self.lines + self._line[:, :, None])

    def slot_major_taps(self, slots: np.ndarray, positions: np.ndarray, out: np.ndarray) -> None:
        """``(lines, n, taps)`` row indices into a ``(slots, frames, lines, width)`` ring, each slot at its position."""
        t = (positions[:, None] - self.lags[:, None, :]) % self.frames  # (lines, n, taps)
        np.add((slots[:, None] * self.frames + t) * self.lines, self._line[:, :, None], out=out)


class OnnxPool:
    """State of up to ``capacity`` streams stepped in any subset (see :meth:`OnnxBackend.step_slots`)."""

    def __init__(self, backend: OnnxBackend, capacity: int) -> None:
        hop, classes = backend.config.features.hop_length, backend.config.num_classes
        self.capacity = capacity
        self.state = backend.zero_state(capacity)
        self.state_in = backend.zero_state(capacity)  # gathered inputs when the slots are not 0..n-1
        self.state_out = backend.zero_state(capacity)
        self.audio = np.zeros((capacity, hop), np.float32)
        self.probs = np.zeros((capacity, classes), np.float32)
        self.all_slots = np.arange(capacity)
        rings = backend.rings
        if rings is not None:
            self.ring = np.zeros((capacity, rings.frames, rings.lines, rings.width), np.float32)
            self.position = np.zeros(capacity, np.int64)  # where each slot's next row goes
            self.taps = np.zeros(rings.lines * capacity * rings.lags.shape[1], np.int64)  # (lines, n, taps) for any n
            self.rows = np.zeros((capacity, rings.lines * rings.width), np.float32)
        self.bindings: dict[tuple[bool, int], ort.IOBinding] = {}


class OnnxBackend:
    def __init__(self, model: str | os.PathLike | None = None, batch_size: int = 1, threads: int = 1) -> None:
        folder = resolve_model_dir(model)
        self.config = load_config(folder)
        self.labels = self.config.labels
        self.batch_size = batch_size
        self.session = open_session(folder, threads)
        meta = self.session.get_modelmeta().custom_metadata_map
        self.rings = Rings(meta[RING_KEY]) if RING_KEY in meta else None
        ring_io = ("audio", "ring", "ring_taps")
        self._state_inputs = [i.name for i in self.session.get_inputs() if i.name not in ring_io]
        self._state_shapes = [tuple(i.shape[1:]) for i in self.session.get_inputs() if i.name not in ring_io]
        hop = self.config.features.hop_length
        self._audio = np.zeros((batch_size, hop), dtype=np.float32)
        self._probs = np.zeros((batch_size, self.config.num_classes), dtype=np.float32)
        self._sets = [self.zero_state(batch_size) for _ in range(2)]
        if self.rings is None:
            self._bindings = [
                [self._bind(self._audio, self._sets[i], self._probs, self._sets[1 - i]) for i in range(2)]
            ]
        else:  # one binding per ring position and state set: the hop itself does no index arithmetic
            r = self.rings
            self._ring = np.zeros((r.frames, batch_size, r.lines, r.width), np.float32)
            self._taps = [r.time_major_taps(p, batch_size) for p in range(r.frames)]
            self._bindings = [
                [
                    self._bind(self._audio, self._sets[i], self._probs, self._sets[1 - i], self._ring, self._taps[p], p)
                    for i in range(2)
                ]
                for p in range(r.frames)
            ]
        self._current = 0
        self._position = 0

    def _bind(
        self,
        audio: np.ndarray,
        state_in: Sequence[np.ndarray],
        probs: np.ndarray,
        state_out: Sequence[np.ndarray],
        ring: np.ndarray | None = None,
        taps: np.ndarray | None = None,
        rows: np.ndarray | int | None = None,
    ) -> ort.IOBinding:
        """Bind arrays by pointer: onnxruntime reads and writes them in place, allocating nothing.

        ``rows`` is a buffer, or a position ``p`` of a time-major ring: the new rows land in ``ring[p]``.
        """
        binding = self.session.io_binding()
        inputs = [("audio", audio), *zip(self._state_inputs, state_in)]
        outputs = [("probs", probs), *zip((n + "_out" for n in self._state_inputs), state_out)]
        if ring is not None:
            inputs += [("ring", ring.reshape(-1, ring.shape[-1])), ("ring_taps", taps)]
            outputs.append(("ring_rows", ring[rows].reshape(len(audio), -1) if isinstance(rows, int) else rows))
        for name, arr in inputs:
            binding.bind_input(name, "cpu", 0, arr.dtype, list(arr.shape), arr.ctypes.data)
        for name, arr in outputs:
            binding.bind_output(name, "cpu", 0, arr.dtype, list(arr.shape), arr.ctypes.data)
        return binding

    def __call__(self, audio: np.ndarray) -> np.ndarray:
        self._audio[...] = audio.reshape(self._audio.shape)
        self.session.run_with_iobinding(self._bindings[self._position][self._current])
        self._current = 1 - self._current
        if self.rings is not None:
            self._position = (self._position + 1) % self.rings.frames
        return self._probs

    def reset_states(self) -> None:
        for arr in self._sets[self._current]:
            arr.fill(0.0)
        if self.rings is not None:
            self._ring.fill(0.0)

    def get_state(self) -> list[np.ndarray]:
        """Copies of the current state arrays (and the ring, time-major, last), for inspection."""
        rings = [] if self.rings is None else [self._ring.copy()]
        return [arr.copy() for arr in self._sets[self._current]] + rings

    def zero_state(self, batch_size: int) -> list[np.ndarray]:
        """Zeroed state arrays (batch first) for the graph's state inputs; rings are kept apart."""
        return [np.zeros((batch_size, *shape), dtype=np.float32) for shape in self._state_shapes]

    # -- many streams ------------------------------------------------------------
    def new_pool(self, capacity: int) -> OnnxPool:
        return OnnxPool(self, capacity)

    def clear_slots(self, pool: OnnxPool, slots: Sequence[int]) -> None:
        for arr in pool.state:
            arr[slots] = 0.0
        if self.rings is not None:
            pool.ring[slots] = 0.0
            pool.position[slots] = 0

    def step_slots(self, pool: OnnxPool, slots: np.ndarray, audio: np.ndarray) -> np.ndarray:
        """Step the streams in ``slots`` (distinct, ascending is fastest) by one hop each, in one call.

        Returns their probabilities ``(len(slots), classes)``, a view valid until the next call.
        When ``slots`` is ``0..n-1`` the state is read in place; otherwise it is gathered first.
        """
        n = len(slots)
        in_place = slots[0] == 0 and slots[-1] == n - 1 and bool((slots == pool.all_slots[:n]).all())
        pool.audio[:n] = audio
        if not in_place:
            for src, dst in zip(pool.state, pool.state_in):
                np.take(src, slots, axis=0, out=dst[:n])
        if self.rings is not None:
            taps = pool.taps[: pool.taps.size // pool.capacity * n].reshape(self.rings.lines, n, -1)
            self.rings.slot_major_taps(slots, pool.position[slots], taps)
        binding = pool.bindings.get((in_place, n))
        if binding is None:
            state_in = pool.state if in_place else pool.state_in
            ring_args = () if self.rings is None else (pool.ring, taps, pool.rows[:n])
            binding = self._bind(
                pool.audio[:n], [a[:n] for a in state_in], pool.probs[:n], [a[:n] for a in pool.state_out], *ring_args
            )
            pool.bindings[(in_place, n)] = binding
        self.session.run_with_iobinding(binding)
        for dst, src in zip(pool.state, pool.state_out):
            if in_place:
                dst[:n] = src[:n]
            else:
                dst[slots] = src[:n]
        if self.rings is not None:
            positions = pool.position[slots]
            pool.ring[slots, positions] = pool.rows[:n].reshape(n, self.rings.lines, -1)
            pool.position[slots] = (positions + 1) % self.rings.frames
        return pool.probs[:n]
