"""Many streams, one batched model call a round: one :class:`~streamtag.engine.StreamTagger` per stream.

Each stream has its own engine (hops, input guard, reset policies, events) and its own
slot of model state in one pool. A round takes one hop from every stream that has one
and steps them all in a single backend call. Streams join and leave at any time; a
leaving stream's slot is cleared and reused by the next one to join. This is the engine
a network server stands on::

    tagger = MultiStreamTagger(capacity=256)
    tagger.join("kitchen")
    tagger.feed("kitchen", samples)          # any number of samples, float32 mono
    for name, step in tagger.step():         # every ready hop, with its events
        ...
    for step in tagger.leave("kitchen"):     # closes the events still open
        ...
"""

from __future__ import annotations

import heapq
import os
from collections.abc import Iterator

import numpy as np

from .backends import make_backend
from .engine import StreamTagger
from .errors import ConfigError
from .events import EventParams
from .steps import Step


class _PoolSlot:
    """The :class:`~streamtag.engine.HopModel` of one stream: its slot in the shared pool."""

    def __init__(self, owner: MultiStreamTagger, slot: int) -> None:
        self.owner, self.slot = owner, slot
        self._slots = np.array([slot], np.int64)

    def step(self, hops: np.ndarray) -> np.ndarray:  # used when a stream is fed through its engine alone
        b, out = self.owner.backend, np.empty((len(hops), len(self.owner.labels)), np.float32)
        for i in range(len(hops)):  # each call's rows are valid until the next
            out[i] = b.step_slots(self.owner.pool, self._slots, hops[i : i + 1])[0]
        return out

    def clear(self) -> None:
        self.owner.backend.clear_slots(self.owner.pool, self._slots)


class MultiStreamTagger:
    """Args:
    model: model folder (the bundled default when ``None``).
    backend (str): ``onnx`` or ``torch``.
    capacity (int): most streams at once (state is preallocated for all of them).
    events: as :class:`~streamtag.engine.StreamTagger`'s, for every stream. (Default: ``True``)
    engine_options: more :class:`~streamtag.engine.StreamTagger` arguments for every stream
        (``reset_every_s``, ``reset_on_silence_s``, ``gain_db``); ``join`` may give a stream its own
        ``sample_rate``.
    """

    def __init__(
        self,
        model: str | os.PathLike | None = None,
        backend: str = "onnx",
        capacity: int = 64,
        events: bool | EventParams | None = True,
        engine_options: dict | None = None,
        **backend_options,
    ) -> None:
        if capacity < 1:
            raise ConfigError(f"capacity must be >= 1 ({capacity} given)")
        self.backend = make_backend(backend, model, **backend_options)
        self.labels = self.backend.labels
        self.hop = self.backend.config.features.hop_length
        self.frame_seconds = self.backend.config.features.frame_seconds
        self.capacity = capacity
        self.pool = self.backend.new_pool(capacity)
        self.streams: dict[str, StreamTagger] = {}
        self._events = events
        self._engine_options = dict(engine_options or {})
        self._free = list(range(capacity))  # a heap: joining takes the lowest slot, so busy slots stay 0..n-1
        self._audio = np.zeros((capacity, self.hop), np.float32)

    def join(self, name: str, sample_rate: int | None = None) -> StreamTagger:
        """Add a stream (its samples at ``sample_rate``, the model's by default); returns its engine."""
        if name in self.streams:
            raise ConfigError(f"stream '{name}' has already joined")
        if not self._free:
            raise ConfigError(f"all {self.capacity} stream slots are in use; raise capacity or let a stream leave")
        slot = heapq.heappop(self._free)
        try:
            engine = StreamTagger(
                self.backend,
                sample_rate=sample_rate,
                events=self._events,
                hop_model=_PoolSlot(self, slot),
                **self._engine_options,
            )
        except Exception:
            heapq.heappush(self._free, slot)
            raise
        self.streams[name] = engine
        return engine

    def leave(self, name: str) -> list[Step]:
        """Remove a stream; returns its last steps (the hops it still held, then its events closed)."""
        engine = self.streams[self._known(name)]
        out = engine.feed(np.zeros(0, np.float32))  # its last hops, stepped alone: a leaver does not wait
        out += engine.finish()
        del self.streams[name]
        heapq.heappush(self._free, engine.hop_model.slot)
        return out

    def reset(self, name: str) -> list[Step]:
        """Forget a stream's past (model state), keeping its slot; returns the steps of events it closed."""
        return self.streams[self._known(name)].reset()

    def feed(self, name: str, samples) -> None:
        """Queue samples for a stream (checked as :meth:`StreamTagger.push` does); :meth:`step` steps them."""
        self.streams[self._known(name)].push(samples)

    def step(self) -> Iterator[tuple[str, Step]]:
        """Run hop rounds until no stream has a whole hop; yields ``(name, step)`` in order per stream.

        A round steps every stream that has a hop in one backend call; steps own their rows.
        """
        while True:
            ready = sorted((e.hop_model.slot, name, e) for name, e in self.streams.items() if e.ready)
            if not ready:
                return
            n = len(ready)
            slots = np.fromiter((slot for slot, _, _ in ready), dtype=np.int64, count=n)
            hops = []
            for i, (_, name, engine) in enumerate(ready):
                for step in engine.before_hop():  # a due reset clears the slot before the hop
                    yield name, step
                hop = engine.take(1)
                self._audio[i] = hop[0]
                hops.append(hop)
            probs = self.backend.step_slots(self.pool, slots, self._audio[:n])
            for i, (_, name, engine) in enumerate(ready):
                for step in engine.complete(hops[i], probs[i : i + 1]):
                    yield name, step

    def _known(self, name: str) -> str:
        if name not in self.streams:
            raise ConfigError(f"no stream named '{name}' (joined: {', '.join(self.streams) or 'none'})")
        return name
