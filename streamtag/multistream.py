"""Many streams, one worker: every stream that has a full hop is stepped in one batched call.

Each stream has its own slot of state (audio context and model state). Streams
join and leave at any time; a leaving stream's slot is zeroed and reused by the
next one to join. This is the engine a network server would stand on::

    tagger = MultiStreamTagger(capacity=256)
    tagger.join("kitchen")
    tagger.feed("kitchen", samples)          # any number of samples, model rate
    for name, t, probs in tagger.step():     # all ready hops, one call per hop round
        ...
    tagger.leave("kitchen")
"""

from __future__ import annotations

import heapq
import os
from collections.abc import Iterator

import numpy as np

from .backends import make_backend
from .errors import ConfigError


class _Stream:
    __slots__ = ("slot", "pending", "fill", "frames")

    def __init__(self, slot: int, hop: int) -> None:
        self.slot, self.fill, self.frames = slot, 0, 0
        self.pending = np.zeros(hop * 64, dtype=np.float32)  # grows if a caller feeds in big chunks


class MultiStreamTagger:
    """Args:
    model: model folder (the bundled default when ``None``).
    backend (str): ``onnx`` or ``torch``.
    capacity (int): most streams at once (state is preallocated for all of them).
    """

    def __init__(
        self, model: str | os.PathLike | None = None, backend: str = "onnx", capacity: int = 64, **backend_options
    ) -> None:
        if capacity < 1:
            raise ConfigError(f"capacity must be >= 1 ({capacity} given)")
        self.backend = make_backend(backend, model, **backend_options)
        self.labels = self.backend.labels
        self.hop = self.backend.config.features.hop_length
        self.frame_seconds = self.backend.config.features.frame_seconds
        self.capacity = capacity
        self.pool = self.backend.new_pool(capacity)
        self.streams: dict[str, _Stream] = {}
        self._free = list(range(capacity))  # a heap: joining takes the lowest slot, so busy slots stay 0..n-1
        self._audio = np.zeros((capacity, self.hop), np.float32)

    def join(self, name: str) -> None:
        if name in self.streams:
            raise ConfigError(f"stream '{name}' has already joined")
        if not self._free:
            raise ConfigError(f"all {self.capacity} stream slots are in use; raise capacity or let a stream leave")
        self.streams[name] = _Stream(heapq.heappop(self._free), self.hop)

    def leave(self, name: str) -> None:
        stream = self.streams.pop(self._known(name))
        self.backend.clear_slots(self.pool, [stream.slot])
        heapq.heappush(self._free, stream.slot)

    def reset(self, name: str) -> None:
        """Forget a stream's past (state and unconsumed samples), keeping its slot."""
        stream = self.streams[self._known(name)]
        self.backend.clear_slots(self.pool, [stream.slot])
        stream.fill = 0

    def feed(self, name: str, samples: np.ndarray) -> None:
        stream = self.streams[self._known(name)]
        n = samples.shape[0]
        if stream.fill + n > stream.pending.shape[0]:
            grown = np.zeros(max(2 * stream.pending.shape[0], stream.fill + n), dtype=np.float32)
            grown[: stream.fill] = stream.pending[: stream.fill]
            stream.pending = grown
        stream.pending[stream.fill : stream.fill + n] = samples
        stream.fill += n

    def step(self) -> Iterator[tuple[str, float, np.ndarray]]:
        """Run hop rounds until no stream has a full hop; yields ``(name, t_end_s, probs)`` per stream-frame."""
        while True:
            ready = sorted((s.slot, name, s) for name, s in self.streams.items() if s.fill >= self.hop)
            if not ready:
                return
            n = len(ready)
            slots = np.fromiter((slot for slot, _, _ in ready), dtype=np.int64, count=n)
            for i, (_, _, s) in enumerate(ready):
                self._audio[i] = s.pending[: self.hop]
            probs = self.backend.step_slots(self.pool, slots, self._audio[:n]).copy()  # rows outlive this round
            for i, (_, name, s) in enumerate(ready):
                s.pending[: s.fill - self.hop] = s.pending[self.hop : s.fill]
                s.fill -= self.hop
                s.frames += 1
                yield name, s.frames * self.frame_seconds, probs[i]

    def _known(self, name: str) -> str:
        if name not in self.streams:
            raise ConfigError(f"no stream named '{name}' (joined: {', '.join(self.streams) or 'none'})")
        return name
