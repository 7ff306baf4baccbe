"""Fast CPU backend: the exported hop step on onnxruntime, one thread, no allocation per hop.

Inputs, outputs and two full state sets are allocated once and bound by pointer
(``io_binding``); each call writes into one set and reads the other, then the
two swap. Models with delay lines (the CNN's dilated convolutions) keep their
history in rings this module owns: the graph gathers the few rows it reads and
returns one new row per line, which lands in place, so no hop copies the history.
A backlog of hops (a file, fast replay) runs on the chunk graph instead: many hops of
the same state in one call (see :meth:`OnnxBackend.step_hops`).
Never imports torch unless a graph must be exported first.
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ..errors import BackendUnavailable, ModelFileError, raise_if_interrupted
from ..modelfile import (
    CHUNK_KEY,
    CHUNK_NAME,
    FINGERPRINT_KEY,
    ONNX_NAME,
    RING_KEY,
    cache_dir,
    fingerprint,
    load_config,
    resolve_model_dir,
    writable_cache,
)
from . import OwnStreams

try:
    import onnxruntime as ort
except ImportError as exc:  # pragma: no cover - onnxruntime is a dependency
    import importlib.util

    if importlib.util.find_spec("onnxruntime") is None:
        raise BackendUnavailable("the onnx backend needs onnxruntime: pip install onnxruntime") from None
    raise_if_interrupted(exc)  # installed, its import cut short by a Ctrl-C
    # installed but broken: say what failed, not that it is missing
    raise BackendUnavailable(f"onnxruntime is installed but failed to import ({exc})") from None


def _session(path: Path, threads: int) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.log_severity_level = 3
    opts.add_session_config_entry("session.set_denormal_as_zero", "1")  # decaying state never hits slow denormals
    try:
        return ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises its own untyped errors
        raise ModelFileError(f"{path} is not a loadable ONNX graph: {str(exc).splitlines()[0]}") from None


def open_session(folder: Path, threads: int = 1, chunk: bool = False) -> ort.InferenceSession:
    """The ONNX session of a model folder's hop step (``chunk``: its chunk step): the shipped graph, the
    cached export, or a fresh export."""
    return _open(folder, threads, chunk)[0]


def graph_path(folder: Path) -> Path:
    """Where the up-to-date exported step of a model folder lives (exported first if need be)."""
    return _open(folder, 1)[1]


def _open(folder: Path, threads: int, chunk: bool = False) -> tuple[ort.InferenceSession, Path]:
    expected = fingerprint(folder)
    name = CHUNK_NAME if chunk else ONNX_NAME
    cached = _cached(expected, chunk)
    for path in (folder / name, cached):
        session = _current(path, threads, expected, chunk)
        if session is not None:
            return session, path
    try:
        from ..models.export import export_chunk_onnx, export_onnx
    except ImportError:
        raise BackendUnavailable(
            f"{folder} has no up-to-date {name}, and exporting one needs torch (the train extra: "
            "pip install '.[train]'), or export it into the folder where torch is installed: "
            f"streamtag export {folder} --onnx {folder}/model.onnx --chunk-onnx {folder}/chunk.onnx"
        ) from None
    writable_cache(cached.parent)
    if chunk:
        export_chunk_onnx(folder, cached)
    else:  # the chunk graph too, now: opened mid-stream later (a backlog), it must not cost an export then
        export_onnx(folder, cached)
        chunk_cached = _cached(expected, True)
        if _current(folder / CHUNK_NAME, 1, expected, True) is None and not chunk_cached.is_file():
            try:
                export_chunk_onnx(folder, chunk_cached)
            except Exception as exc:  # the hop step is what a stream needs; backlogs then go hop by hop
                warnings.warn(f"no chunk graph for {folder}: {exc}", RuntimeWarning, stacklevel=2)
    return _session(cached, threads), cached


def _cached(fingerprint: str, chunk: bool) -> Path:
    """Where the export of a model with this fingerprint is cached (hop step, or chunk step)."""
    return cache_dir() / "onnx" / (f"{fingerprint}.chunk.onnx" if chunk else f"{fingerprint}.onnx")


def _current(path: Path, threads: int, expected: str, chunk: bool) -> ort.InferenceSession | None:
    """A session on ``path`` if it holds this model's up-to-date graph of the kind asked for, else None."""
    if not path.is_file():
        return None
    session = _session(path, threads)
    meta = session.get_modelmeta().custom_metadata_map
    return session if meta.get(FINGERPRINT_KEY) == expected and (CHUNK_KEY in meta) == chunk else None


MIN_CHUNK_HOPS = 6  # fewer hops than this step one by one: the chunk graph's fixed cost outweighs them


class Rings:
    """The delay lines of a graph and where their rows live.

    Line ``l`` is read ``lags[l]`` frames back and needs ``sizes[l] = max(lags[l]) + 1`` rows.
    Two layouts: the backend's own streams use one ``(frames, streams, lines, width)`` ring
    (every line ``frames`` long, so a hop's rows land together and each position has a
    prebuilt binding); a pool packs each slot's lines back to back (``rows_per_slot`` rows,
    less than half the memory, so a thousand streams' history stays in cache).
    """

    def __init__(self, spec: str) -> None:
        data = json.loads(spec)
        self.frames, self.width = int(data["frames"]), int(data["width"])
        self.lags = np.asarray(data["lags"], dtype=np.int64)  # (lines, taps per line)
        self.lines = self.lags.shape[0]
        self._line = np.arange(self.lines, dtype=np.int64)[:, None, None]
        self.sizes = self.lags.max(axis=1) + 1
        self.base = np.concatenate([[0], np.cumsum(self.sizes)[:-1]])  # first row of each line in a slot
        self.rows_per_slot = int(self.sizes.sum())

    def time_major_taps(self, position: int, streams: int) -> np.ndarray:
        """``(lines, streams, taps)`` row indices into a ``(frames, streams, lines, width)`` ring at ``position``."""
        t = (position - self.lags) % self.frames  # (lines, taps)
        b = np.arange(streams, dtype=np.int64)[:, None]
        return np.ascontiguousarray((t[:, None, :] * streams + b) * self.lines + self._line)

    def history(self, line: int, end: int) -> np.ndarray:
        """Positions in a time-major ring of ``line``'s history before hop ``end``, oldest first: as many rows
        as its longest lag reads (what the chunk graph takes and gives back as that line's state)."""
        size = int(self.sizes[line]) - 1
        return (end - size + np.arange(size)) % self.frames

    def slot_history(self, line: int, end: int) -> np.ndarray:
        """Rows of a pool slot holding ``line``'s history before hop ``end``, oldest first (as :meth:`history`
        for a time-major ring): hop ``f`` of a line lives in row ``base + f % size``."""
        size = int(self.sizes[line])
        return self.base[line] + (end - (size - 1) + np.arange(size - 1)) % size

    def round_rows(self, slots: np.ndarray, frames: np.ndarray, hops: int) -> tuple[np.ndarray, np.ndarray]:
        """Every row index ``hops`` hops of pool slots need, from ``frames`` (each slot's hops so far) on: the rows
        hop ``h`` reads, ``taps[h]`` ``(lines, n, taps)`` (the graph's ``ring_taps``), and the rows its new
        delay-line rows go to, ``writes[h]`` ``(n * lines)`` into the ring seen as ``(rows, width)``. Worked out
        for a round's hops in one go: hop by hop it took 4-10% of a server's round of 50 streams."""
        hop = np.arange(hops)[:, None, None]
        first = (slots * self.rows_per_slot)[:, None]  # (n, 1): each slot's first row
        at = frames[None, :, None] + hop  # (hops, n, 1): the hop each slot is at
        taps = (at[:, None] - self.lags[None, :, None, :]) % self.sizes[None, :, None, None]  # (hops, lines, n, taps)
        taps += self.base[:, None, None] + first  # (lines, n, 1)
        writes = at % self.sizes + self.base + first  # (hops, n, lines)
        return taps, writes.reshape(hops, len(slots) * self.lines)


class _PoolRings:
    """A pool's delay lines through ``hops`` hops of ``slots`` (:meth:`Rings.round_rows`): hop ``r`` puts its
    taps in the pool's tap buffer (bound to the graph) with :meth:`before` and stores its new rows with
    :meth:`after`; :meth:`done` moves the slots on. Without rings (a model with none) every call does nothing."""

    def __init__(self, rings: Rings | None, pool: OnnxPool, slots: np.ndarray, hops: int) -> None:
        self.taps = None
        if rings is None:
            return
        n = len(slots)
        self.pool, self.slots, self.hops = pool, slots, hops
        self.taps = pool.taps[: pool.taps.size // pool.capacity * n].reshape(rings.lines, n, -1)
        self._taps, self._writes = rings.round_rows(slots, pool.frames[slots], hops)
        self._ring, self._rows = pool.ring.reshape(-1, rings.width), pool.rows[:n].reshape(-1, rings.width)

    def before(self, r: int) -> None:
        if self.taps is not None:
            self.taps[...] = self._taps[r]

    def after(self, r: int) -> None:
        if self.taps is not None:
            self._ring[self._writes[r]] = self._rows

    def done(self) -> None:
        if self.taps is not None:
            self.pool.frames[self.slots] += self.hops


class OnnxPool:
    """State of up to ``capacity`` streams stepped in any subset (see :meth:`OnnxBackend.step`)."""

    def __init__(self, backend: OnnxBackend, capacity: int) -> None:
        hop, classes = backend.config.features.hop_length, backend.config.num_classes
        self.capacity = capacity
        self.sets = [backend.zero_state(capacity) for _ in range(2)]  # the current one and its successor
        self.current = 0
        self.high_water = 0  # slots at or above this one have never held a stream
        self.state_in = backend.zero_state(capacity)  # gathered inputs when the slots are not 0..n-1
        self.state_out = backend.zero_state(capacity)
        self.audio = np.zeros((capacity, hop), np.float32)
        self.probs = np.zeros((capacity, classes), np.float32)
        self.all_slots = np.arange(capacity)
        rings = backend.rings
        if rings is not None:
            self.ring = np.zeros((capacity, rings.rows_per_slot, rings.width), np.float32)
            self.frames = np.zeros(capacity, np.int64)  # hops each slot has stepped: its place in its rings
            self.taps = np.zeros(rings.lines * capacity * rings.lags.shape[1], np.int64)  # (lines, n, taps) for any n
            self.rows = np.zeros((capacity, rings.lines * rings.width), np.float32)
        self.bindings: dict[tuple[bool, int, int], ort.IOBinding] = {}

    @property
    def state(self) -> list[np.ndarray]:
        return self.sets[self.current]


class LockstepState:
    """State of ``n`` streams that always step together (one stream, or a fixed batch): the whole hop is one
    prebuilt binding. Hop ``k`` reads state set ``k % 2`` and, with rings, writes position ``k % frames``
    of one time-major ``(frames, streams, lines, width)`` ring, so a hop does no index arithmetic."""

    def __init__(self, backend: OnnxBackend, n: int) -> None:
        hop, classes = backend.config.features.hop_length, backend.config.num_classes
        self.capacity = n
        self.audio = np.zeros((n, hop), np.float32)
        self.audio_flat = self.audio.reshape(-1)
        self.probs = np.zeros((n, classes), np.float32)
        self.sets = [backend.zero_state(n) for _ in range(2)]
        r = backend.rings
        self.ring = None if r is None else np.zeros((r.frames, n, r.lines, r.width), np.float32)
        taps = [] if r is None else [r.time_major_taps(p, n) for p in range(r.frames)]  # bound by pointer: kept
        self._taps = taps
        period = 2 if r is None else 2 * r.frames
        self.schedule = []
        for k in range(period):
            sets = self.sets[k % 2], self.sets[1 - k % 2]
            rings = () if r is None else (self.ring, taps[k % r.frames], k % r.frames)
            self.schedule.append(backend._bind(self.audio, sets[0], self.probs, sets[1], *rings))
        self.tick = 0

    @property
    def state(self) -> list[np.ndarray]:
        return self.sets[self.tick % 2]


class OnnxBackend(OwnStreams):
    """The hop step on onnxruntime. One primitive, :meth:`step` on a state from :meth:`new_state`;
    ``backend(audio)`` is a thin adapter stepping the backend's own ``batch_size`` streams in lockstep."""

    def __init__(self, model: str | os.PathLike | None = None, batch_size: int = 1, threads: int = 1) -> None:
        self.folder = folder = resolve_model_dir(model)
        self.config = load_config(folder)
        self.labels = self.config.labels
        self.batch_size = batch_size
        self.threads = threads
        self.session = open_session(folder, threads)
        self._chunk: ort.InferenceSession | None = None  # opened on the first backlog
        self._no_chunk = False
        meta = self.session.get_modelmeta().custom_metadata_map
        self.rings = Rings(meta[RING_KEY]) if RING_KEY in meta else None
        ring_io = ("audio", "ring", "ring_taps")
        self._state_inputs = [i.name for i in self.session.get_inputs() if i.name not in ring_io]
        self._state_shapes = [tuple(i.shape[1:]) for i in self.session.get_inputs() if i.name not in ring_io]
        self._own = self.new_state(batch_size, lockstep=True)
        self._all = np.arange(batch_size)

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

    # -- the single-stream adapter (OwnStreams) ---------------------------------------
    def get_state(self) -> list[np.ndarray]:
        """Copies of the own streams' state arrays (and the ring, time-major, last), for inspection."""
        own = self._own
        return [arr.copy() for arr in own.state] + ([] if own.ring is None else [own.ring.copy()])

    def zero_state(self, batch_size: int) -> list[np.ndarray]:
        """Zeroed state arrays (batch first) for the graph's state inputs; rings are kept apart."""
        return [np.zeros((batch_size, *shape), dtype=np.float32) for shape in self._state_shapes]

    # -- the primitive ------------------------------------------------------------
    def new_state(self, capacity: int, lockstep: bool = False) -> OnnxPool | LockstepState:
        """State for ``capacity`` streams. ``lockstep``: every step steps all of them (fastest: prebuilt).
        A pool's chunk graph (a leaving stream's backlog, :meth:`step_slot_hops`) is opened now, not in the middle
        of a busy server's round."""
        if lockstep:
            return LockstepState(self, capacity)
        self._chunk_session()
        return OnnxPool(self, capacity)

    def clear(self, state: OnnxPool | LockstepState, slots: Sequence[int]) -> None:
        """These streams back to a new stream's state."""
        for arr in state.sets[0] + state.sets[1]:
            arr[slots] = 0.0
        if self.rings is None:
            return
        if isinstance(state, LockstepState):
            state.ring[:, slots] = 0.0
        else:
            state.ring[slots] = 0.0
            state.frames[slots] = 0

    def snapshot(self, pool: OnnxPool, slot: int) -> list[np.ndarray]:
        """Copies of one pool stream's state: every state row, and its rings and place in them."""
        rows = [arr[slot].copy() for arr in pool.state]
        if self.rings is not None:
            rows += [pool.ring[slot].copy(), np.array(pool.frames[slot])]
        return rows

    def restore(self, pool: OnnxPool, slot: int, rows: list[np.ndarray]) -> None:
        """One pool stream's state back from :meth:`snapshot` (taken in any pool of this model)."""
        n = len(pool.state)
        for arr, row in zip(pool.state, rows[:n]):
            arr[slot] = row
        if self.rings is not None:
            pool.ring[slot], pool.frames[slot] = rows[n], int(rows[n + 1])
        pool.high_water = max(pool.high_water, slot + 1)

    def step(self, state: OnnxPool | LockstepState, slots: np.ndarray, audio: np.ndarray) -> np.ndarray:
        """One hop for each stream in ``slots`` (distinct; ascending is fastest), all in one call.

        ``audio`` is ``(len(slots), hop)``; returns probabilities ``(len(slots), classes)``, a view valid
        until the next call. Streams not named keep their state. A lockstep state steps all its streams.
        """
        if isinstance(state, LockstepState):
            state.audio_flat[:] = audio.reshape(-1)
            self.session.run_with_iobinding(state.schedule[state.tick % len(state.schedule)])
            state.tick += 1
            return state.probs
        return self._step_pool(state, slots, audio)

    def _step_pool(self, pool: OnnxPool, slots: np.ndarray, audio: np.ndarray) -> np.ndarray:
        """When ``slots`` is ``0..n-1`` the state is read in place and the new state written to the pool's
        second set, which then becomes current (nothing copied when no other slot is in use); otherwise the
        slots' state is gathered, stepped and scattered back (:meth:`_step_gathered`)."""
        if not self._in_place(pool, slots):
            return self._step_gathered(pool, slots, audio[None])[0]
        n = len(slots)
        pool.high_water = max(pool.high_water, n)
        pool.audio[:n] = audio
        rings = _PoolRings(self.rings, pool, slots, 1)
        rings.before(0)
        self.session.run_with_iobinding(self._pool_binding(pool, (True, n, pool.current), rings.taps))
        successor = pool.sets[1 - pool.current]
        for dst, src in zip(successor, pool.state):  # slots not stepped carry over
            dst[n : pool.high_water] = src[n : pool.high_water]
        pool.current = 1 - pool.current
        rings.after(0)
        rings.done()
        return pool.probs[:n]

    def step_rounds(self, pool: OnnxPool, slots: np.ndarray, audio: np.ndarray) -> np.ndarray:
        """``k`` hops of the streams in ``slots``, ``(k, n, hop) -> (k, n, classes)``: what ``k`` calls of
        :meth:`step` give, with the slots' state gathered once and scattered once instead of every hop (a server's
        round: each stream's 100 ms message is 10 hops, and its streams are seldom slots ``0..n-1``)."""
        if not self._in_place(pool, slots):
            return self._step_gathered(pool, slots, audio)
        out = np.empty((len(audio), len(slots), self.config.num_classes), np.float32)
        for r in range(len(audio)):  # stepped in place: nothing gathered to save
            out[r] = self._step_pool(pool, slots, audio[r])
        return out

    def _step_gathered(self, pool: OnnxPool, slots: np.ndarray, audio: np.ndarray) -> np.ndarray:
        """``k`` hops ``(k, n, hop)`` of slots that are not ``0..n-1``: their state gathered into ``state_in``, hop
        ``r`` reading one of ``state_in`` / ``state_out`` and writing the other, the last written scattered back."""
        k, n = audio.shape[:2]
        out = np.empty((k, n, self.config.num_classes), np.float32)
        pool.high_water = max(pool.high_water, int(slots.max()) + 1)
        for src, dst in zip(pool.state, pool.state_in):
            np.take(src, slots, axis=0, out=dst[:n])
        buffers = (pool.state_in, pool.state_out)
        rings = _PoolRings(self.rings, pool, slots, k)
        for r in range(k):
            pool.audio[:n] = audio[r]
            rings.before(r)
            self.session.run_with_iobinding(self._pool_binding(pool, (False, n, r % 2), rings.taps))
            out[r] = pool.probs[:n]
            rings.after(r)
        rings.done()
        for dst, src in zip(pool.state, buffers[k % 2]):
            dst[slots] = src[:n]
        return out

    @staticmethod
    def _in_place(pool: OnnxPool, slots: np.ndarray) -> bool:
        n = len(slots)
        return bool(slots[0] == 0 and slots[-1] == n - 1 and (slots == pool.all_slots[:n]).all())

    def _pool_binding(self, pool: OnnxPool, key: tuple[bool, int, int], taps: np.ndarray | None) -> ort.IOBinding:
        """The binding of a pool hop of ``n`` streams, ``key = (in_place, n, which)``, made once: in place, from
        state set ``which`` to the other; gathered, from ``state_in`` to ``state_out`` (``which`` 0) or back (1)."""
        binding = pool.bindings.get(key)
        if binding is None:
            in_place, n, which = key
            sets = pool.sets if in_place else (pool.state_in, pool.state_out)
            state_in, state_out = sets[which], sets[1 - which]
            ring_args = () if self.rings is None else (pool.ring, taps, pool.rows[:n])
            binding = self._bind(
                pool.audio[:n], [a[:n] for a in state_in], pool.probs[:n], [a[:n] for a in state_out], *ring_args
            )
            pool.bindings[key] = binding
        return binding

    # -- a backlog: many hops of a lockstep state in one call -------------------------
    def step_hops(self, state: LockstepState, audio: np.ndarray) -> np.ndarray:
        """``k`` hops of every stream of a lockstep state: ``audio (n, k, hop) -> probabilities (n, k, classes)``.

        The same results as ``k`` calls of :meth:`step` (to float rounding, ~1e-6), in ``k / 128`` calls of
        the chunk graph; the state goes on from there, so hop steps and chunks can alternate freely. The chunk
        graph keeps each delay line as its last frames (the model's own state layout); they are gathered from
        the ring before the call and written back after it.
        """
        if not isinstance(state, LockstepState):
            raise TypeError("step_hops steps a lockstep state (new_state(n, lockstep=True)); a pool steps hop by hop")
        if audio.shape[1] < MIN_CHUNK_HOPS:
            return self._step_each(state, audio)
        session = self._chunk_session()
        if session is None:  # no chunk graph to be had: hop by hop, the same results
            return self._step_each(state, audio)
        probs, feeds = self._run_chunks(session, audio, self._chunk_feeds(state))
        self._store_chunk_state(state, feeds, audio.shape[1])
        return probs

    def _run_chunks(
        self, session: ort.InferenceSession, audio: np.ndarray, feeds: dict[str, np.ndarray]
    ) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """``(n, k, hop)`` audio through the chunk graph from state ``feeds``, a chunk a call: probabilities
        ``(n, k, classes)`` and the state after the last hop."""
        n, k, _ = audio.shape
        parts = []
        for start in range(0, k, self._chunk_hops):
            piece = np.ascontiguousarray(audio[:, start : start + self._chunk_hops]).reshape(n, -1)
            probs, *new = session.run(None, {"audio": piece, **feeds})
            parts.append(probs)
            feeds = dict(zip(self._chunk_state, new))
        return (parts[0] if len(parts) == 1 else np.concatenate(parts, axis=1)), feeds

    def step_slot_hops(self, pool: OnnxPool, slot: int, audio: np.ndarray) -> np.ndarray:
        """``k`` hops of one pool stream, ``(k, hop) -> (k, classes)``, on the chunk graph: its state and delay
        lines are read out of the pool, stepped, and written back (:meth:`step_hops` does the same for a
        lockstep state). A leaving stream's backlog stepped hop by hop, one stream a call, held a busy server's
        worker for seconds."""
        k = len(audio)
        session = self._chunk_session() if k >= MIN_CHUNK_HOPS else None
        if session is None:
            slots, out = np.array([slot]), np.empty((k, self.config.num_classes), np.float32)
            for i in range(k):
                out[i] = self._step_pool(pool, slots, audio[i : i + 1])[0]
            return out
        feeds = {name: arr[slot : slot + 1].copy() for name, arr in zip(self._state_inputs, pool.state)}
        r, end = self.rings, 0
        if r is not None:
            end = int(pool.frames[slot])
            for line, name in enumerate(self._line_names):
                feeds[name] = pool.ring[slot, r.slot_history(line, end)][None]
        probs, feeds = self._run_chunks(session, audio[None], feeds)
        for name, arr in zip(self._state_inputs, pool.state):
            arr[slot] = feeds[name][0]
        if r is not None:
            for line, name in enumerate(self._line_names):
                pool.ring[slot, r.slot_history(line, end + k)] = feeds[name][0]
            pool.frames[slot] = end + k
        pool.high_water = max(pool.high_water, slot + 1)
        return probs[0]

    def _step_each(self, state: LockstepState, audio: np.ndarray) -> np.ndarray:
        n, k, _ = audio.shape
        out = np.empty((n, k, self.config.num_classes), np.float32)
        for i in range(k):
            out[:, i] = self.step(state, None, audio[:, i])
        return out

    def _chunk_session(self) -> ort.InferenceSession | None:
        """The chunk graph, opened on first use; ``None`` (with a warning) when the folder has none and torch is
        not there to export one, or this onnxruntime cannot load it: hop by hop is as right, only slower."""
        if self._chunk is None and not self._no_chunk:
            try:
                self._chunk = open_session(self.folder, self.threads, chunk=True)
            except (BackendUnavailable, ModelFileError) as exc:  # hop by hop gives the same results
                warnings.warn(f"stepping backlogs hop by hop, slower: {exc}", RuntimeWarning, stacklevel=2)
                self._no_chunk = True
                return None
            self._chunk_hops = int(self._chunk.get_modelmeta().custom_metadata_map[CHUNK_KEY])
            self._chunk_state = [i.name for i in self._chunk.get_inputs()][1:]
            # the delay lines are the chunk graph's state entries the hop graph keeps in rings, in line order
            self._line_names = [name for name in self._chunk_state if name not in self._state_inputs]
        return self._chunk

    def _chunk_feeds(self, state: LockstepState) -> dict[str, np.ndarray]:
        feeds = dict(zip(self._state_inputs, state.sets[state.tick % 2]))
        r = self.rings
        for line, name in enumerate(self._line_names):
            rows = r.history(line, state.tick)
            feeds[name] = np.ascontiguousarray(state.ring[rows, :, line].transpose(1, 0, 2))  # (n, size, width)
        return feeds

    def _store_chunk_state(self, state: LockstepState, new: dict[str, np.ndarray], k: int) -> None:
        state.tick += k
        for name, arr in zip(self._state_inputs, state.sets[state.tick % 2]):
            arr[...] = new[name]
        r = self.rings
        for line, name in enumerate(self._line_names):
            history = new[name]  # (n, size, width), oldest first
            state.ring[r.history(line, state.tick), :, line] = history.transpose(1, 0, 2)
