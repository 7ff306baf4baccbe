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

import copy
import functools
import heapq
import os
import threading
from collections.abc import Callable, Iterator

import numpy as np

from .backends import make_backend
from .engine import ENGINE_OPTIONS, AudioLike, StreamTagger, block_levels, one_thread
from .errors import ConfigError, is_whole
from .events import EventDetector, EventParams, check_close_reason, model_event_settings
from .steps import Step, StepBlock, named_steps


class _PoolSlot:
    """The :class:`~streamtag.engine.HopModel` of one stream: its slot in the shared pool."""

    def __init__(self, owner: MultiStreamTagger, slot: int) -> None:
        self.owner, self.slot = owner, slot
        self._slots = np.array([slot], np.int64)

    def step(self, hops: np.ndarray) -> np.ndarray:  # a stream fed through its engine alone (leaving, resetting)
        b = self.owner.backend
        if hasattr(b, "step_slot_hops"):
            return b.step_slot_hops(self.owner.pool, self.slot, hops)
        out = np.empty((len(hops), len(self.owner.labels)), np.float32)  # a backend of the older shape: a hop a call
        for i in range(len(hops)):  # each call's rows are valid until the next
            out[i] = b.step(self.owner.pool, self._slots, hops[i : i + 1])[0]
        return out

    def clear(self) -> None:
        self.owner.backend.clear(self.owner.pool, self._slots)


class _Left:
    """The :class:`~streamtag.engine.HopModel` of an engine whose stream has left: its slot may be another
    stream's now, so stepping it would write into that stream's state."""

    def __init__(self, name: str) -> None:
        self.name = name

    def step(self, hops: np.ndarray) -> np.ndarray:
        raise self._closed()

    def clear(self) -> None:
        raise self._closed()

    def _closed(self) -> ConfigError:
        return ConfigError(
            f"stream '{self.name}' has left its MultiStreamTagger: this engine is closed; join again for a new one"
        )


MAX_CAPACITY = 100_000  # streams in one pool: about 1,000 a core are stepped in real time, so more is a mistake


class MultiStreamTagger:
    """Many streams, one batched model call a round: ``join``, ``feed``, ``step``, ``leave``.

    Args:
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
        events: bool | EventParams | EventDetector | Callable[[], EventDetector] | None = True,
        engine_options: dict | None = None,
        **backend_options,
    ) -> None:
        if not is_whole(capacity) or not 1 <= capacity <= MAX_CAPACITY:  # before the model loads; a huge one was
            raise ConfigError(  # a bare MemoryError ("873 TiB")
                f"capacity must be a whole number in 1..{MAX_CAPACITY} ({capacity!r} given)"
            )
        self.backend = make_backend(backend, model, **backend_options)
        self.labels = self.backend.labels
        self.hop = self.backend.config.features.hop_length
        self.frame_seconds = self.backend.config.features.frame_seconds
        self.capacity = capacity
        self.pool = self.backend.new_state(capacity)
        self.streams: dict[str, StreamTagger] = {}
        if events is True:  # the model's events.toml, read once: parsing it at every join cost 1.7 ms a stream
            settings = model_event_settings(getattr(self.backend, "folder", None))
            events = EventDetector(self.labels, self.frame_seconds, *settings).fresh
        elif isinstance(events, EventDetector):  # a template: each stream a copy, the template left as it is
            events = functools.partial(copy.deepcopy, events)
        if not (events is None or isinstance(events, (bool, EventParams)) or callable(events)):  # said now, not
            raise ConfigError(  # at every join
                f"events must be True, None, EventParams, an EventDetector or a function making one "
                f"({type(events).__name__} given)"
            )
        self._events = events
        self._engine_options = dict(engine_options or {})
        unknown = set(self._engine_options) - ENGINE_OPTIONS
        if unknown:
            where = "; give a stream's sample_rate to join()" if "sample_rate" in unknown else ""
            raise ConfigError(
                f"engine_options takes {', '.join(sorted(ENGINE_OPTIONS))}, not {', '.join(sorted(unknown))}{where}"
            )
        # their values checked now, as every join would check them: an engine of no stream, on no slot
        StreamTagger(self.backend, events=None, hop_model=_Left("(a check)"), **self._engine_options)
        self.behind = False  # the last step_blocks(max_hops) left ready hops for the next round
        self.left_out = 0  # ready streams the last step_blocks(max_streams) left for the next round
        # the streams whose fed audio waits to be stepped, longest waiting first: the ones a round looks at (not
        # all of them), and those a round of at most max_streams takes first
        self._waiting: dict[str, None] = {}
        self._free = list(range(capacity))  # a heap: joining takes the lowest slot, so busy slots stay 0..n-1
        # feed() on one thread while step() runs on another scrambled streams' audio: refused (ServeWorker feeds
        # and steps on its own thread)
        self._one_thread = threading.RLock()

    @one_thread
    def join(self, name: str, sample_rate: int | None = None, events=None) -> StreamTagger:
        """Add a stream (its samples at ``sample_rate``, the model's by default; ``events``: its own event
        settings, as :class:`StreamTagger` takes them, instead of the pool's: ``None``, the default, is the pool's
        and ``False`` none); returns its engine."""
        if not isinstance(name, str) or not name:
            raise ConfigError(f"a stream's name is a non-empty string ({name!r} given)")
        if name in self.streams:
            raise ConfigError(f"stream '{name}' has already joined")
        if not self._free:
            raise ConfigError(f"all {self.capacity} stream slots are in use; raise capacity or let a stream leave")
        slot = heapq.heappop(self._free)
        try:
            engine = StreamTagger(
                self.backend,
                sample_rate=sample_rate,
                events=self._events if events is None else events,
                hop_model=_PoolSlot(self, slot),
                **self._engine_options,
            )
        except Exception:
            heapq.heappush(self._free, slot)
            raise
        self.streams[name] = engine
        return engine

    @property
    def waiting(self) -> int:
        """Streams with audio not yet stepped (a part-hop counts): how full the next round would be."""
        return len(self._waiting)

    @one_thread
    def snapshot(self, name: str) -> dict:
        """A stream's whole state (engine and model), to :meth:`restore` into a pool of the same model."""
        engine = self.streams[self._known(name)]
        return {"engine": engine.snapshot(), "model": self.backend.snapshot(self.pool, engine.hop_model.slot)}

    @one_thread
    def restore(self, name: str, snapshot: dict) -> None:
        """Give a joined stream the state a :meth:`snapshot` took (here or in another process), in a pool of the same
        model and backend; checked whole first, so a snapshot that does not fit changes nothing."""
        engine = self.streams[self._known(name)]
        rows = snapshot.get("model") if isinstance(snapshot, dict) else None
        here = self.backend.snapshot(self.pool, engine.hop_model.slot)
        if not isinstance(rows, list) or [np.shape(r) for r in rows] != [np.shape(r) for r in here]:
            raise ConfigError(  # another model's or backend's rows failed half-way, or broadcast into place unsaid
                f"stream '{name}': not a snapshot this pool can restore: take it with MultiStreamTagger.snapshot() "
                "from a pool of the same model and backend"
            )
        engine.restore(snapshot.get("engine"))
        self.backend.restore(self.pool, engine.hop_model.slot, snapshot["model"])
        if engine.pending_samples:  # audio it held there waits here
            self._waiting.setdefault(name)

    @one_thread
    def leave(self, name: str, reason: str = "stream_end") -> list[Step]:
        """Remove a stream; returns its last steps (the hops it still held, then its events closed with
        ``reason``)."""
        check_close_reason(reason)  # before its held hops are stepped: a refused call changes nothing
        engine = self.streams[self._known(name)]
        out = engine.feed(np.zeros(0, np.float32))  # its last hops, stepped alone: a leaver does not wait
        out += engine.finish(reason)
        del self.streams[name]
        self._waiting.pop(name, None)
        heapq.heappush(self._free, engine.hop_model.slot)
        engine.hop_model = _Left(name)
        return out

    @one_thread
    def reset(self, name: str, reason: str = "reset") -> list[Step]:
        """Forget a stream's past (model state), keeping its slot; returns the steps of the hops it still held
        (stepped alone, on the state they belong to, as :meth:`leave` does), then those of the events the
        reset closed (``reason``)."""
        check_close_reason(reason)  # before its held hops are stepped: a refused call changes nothing
        engine = self.streams[self._known(name)]
        return engine.feed(np.zeros(0, np.float32)) + engine.reset(reason)

    @one_thread
    def skip(self, name: str, seconds: float) -> None:
        """Move a stream's time on over audio that never came (:meth:`StreamTagger.skip`)."""
        self.streams[self._known(name)].skip(seconds)

    @one_thread
    def feed(self, name: str, samples: AudioLike) -> None:
        """Queue samples for a stream (checked as :meth:`StreamTagger.push` does); :meth:`step` steps them."""
        self.streams[self._known(name)].push(samples)
        self._waiting.setdefault(name)  # a stream already waiting keeps its place

    @one_thread
    def step(self) -> list[tuple[str, Step]]:
        """Step every hop the streams hold; returns ``(name, step)`` pairs, in order within each stream. Steps
        own their rows."""
        return list(named_steps(self.step_blocks()))

    @one_thread
    def step_blocks(
        self, max_hops: int | None = None, max_streams: int | None = None
    ) -> list[tuple[str, StepBlock | Step]]:
        """:meth:`step` with each stream's hops of a round as one :class:`StepBlock` (and the event-only steps
        of resets as they are): what serve and tag read, without a Python object per hop.

        Each stream hands over a block of its ready hops; round ``r`` steps the ``r``-th hop of every
        block that long in one backend call, and each stream's block is completed once it is done
        (events and level meter per block, not per hop). Rounds go on until every ready hop is stepped;
        with ``max_hops``, one round of at most that many hops a stream, so a stream far ahead of the
        others (a client sending faster than real time) cannot make the round long for all of them.

        A list, made whole before it is returned: a caller that reads only part of it loses nothing it has not
        read (a generator stopped early would have dropped hops it had taken), and may join, leave or feed as
        soon as it has it.

        ``max_streams`` also makes it one round, of at most that many streams: those whose audio has waited
        longest (fed first). The scores of a round's streams go out when its model calls are done, so a round of
        hundreds of streams makes every one of them wait for all; rounds of a hundred cost a few percent more a
        hop and hand each stream's scores on sooner. :attr:`left_out` counts the ready streams it left.
        """
        for value, what in ((max_hops, "max_hops"), (max_streams, "max_streams")):
            if value is not None and (not is_whole(value) or value < 1):
                raise ConfigError(f"{what} must be a whole number >= 1 or None ({value!r} given)")
        return list(self._rounds(max_hops, max_streams))

    def _waiting_streams(self) -> Iterator[tuple[str, StreamTagger]]:
        """The streams with fed audio not yet stepped, longest waiting first."""
        for name in list(self._waiting):
            engine = self.streams[name]
            if engine.pending_samples:
                yield name, engine
            else:  # stepped alone since (a reset): its next audio waits from when it comes
                del self._waiting[name]

    def _rounds(self, max_hops: int | None, max_streams: int | None = None) -> Iterator[tuple[str, StepBlock | Step]]:
        self.behind, self.left_out = False, 0
        while True:
            blocks = []
            for name, engine in self._waiting_streams():
                if not engine.ready:
                    continue
                if len(blocks) == max_streams:
                    self.left_out += 1
                    continue
                for step in engine.before_hop():  # a due reset clears the slot before the block
                    yield name, step
                k = engine.block_length() if max_hops is None else min(engine.block_length(), max_hops)
                blocks.append((engine.hop_model.slot, name, engine, engine.take(k)))
                self._waiting.pop(name, None)
                if engine.pending_samples:  # what it still holds waits from now
                    self._waiting[name] = None
                if max_hops is not None and engine.ready:  # capped, or a block cut short by a reset due
                    self.behind = True
            if not blocks:
                return
            blocks.sort(key=lambda b: b[0])  # ascending slots: the pool steps 0..n-1 in place
            nb = len(blocks)
            lengths = np.array([b[3].shape[0] for b in blocks])
            slots = np.array([b[0] for b in blocks], dtype=np.int64)
            # (stream, round, ...): each stream's rows in one piece, which its block keeps (the round's arrays are
            # its own); the backend reads and writes a round's rows across the streams
            audio = np.zeros((nb, int(lengths.max()), self.hop), np.float32)
            for i, b in enumerate(blocks):
                audio[i, : lengths[i]] = b[3]
            out = np.empty((nb, audio.shape[1], len(self.labels)), np.float32)
            together = int(lengths.min())  # the rounds every block takes part in: one call for all of them
            step_rounds = getattr(self.backend, "step_rounds", None)  # a backend of the older protocol has none
            if step_rounds is None or together < 2:
                together = 0
            else:
                rounds = step_rounds(self.pool, slots, audio[:, :together].transpose(1, 0, 2))  # (round, stream, ...)
                out[:, :together] = rounds.transpose(1, 0, 2)
            for r in range(together, audio.shape[1]):
                members = np.flatnonzero(lengths > r)
                if members.size == nb:
                    out[:, r] = self.backend.step(self.pool, slots, audio[:, r])
                else:
                    out[members, r] = self.backend.step(self.pool, slots[members], audio[members, r])
            levels = block_levels(audio, lengths)
            for i, (_, name, engine, _) in enumerate(blocks):
                k = lengths[i]
                yield name, engine.complete_round_block(audio[i, :k], out[i, :k], levels[i])
            if max_hops is not None or max_streams is not None:
                return

    def _known(self, name: str) -> str:
        if name not in self.streams:
            raise ConfigError(f"no stream named '{name}' (joined: {', '.join(self.streams) or 'none'})")
        return name
