"""The serve worker: one thread that owns a :class:`~streamtag.multistream.MultiStreamTagger` and steps every
stream with audio in batched rounds, handing each step to that stream's client, to MQTT and to the metrics.

Commands come through :meth:`ServeWorker.submit` from any thread (the network front, a pulled source, or
:mod:`streamtag.serve.process`'s pipe when the worker runs in a process of its own). It takes decoded audio
from its inbox, steps at most ``max_round_streams`` streams a round (those whose audio has waited longest),
and accounts for every sample (received = processed + dropped + pending). :class:`Pacer` holds a sender back
while the worker is ``max_backlog_s`` behind it, so a fast sender is read no faster than it is tagged.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import queue
import sys
import threading
import time
import traceback
from collections.abc import Callable

import numpy as np

from ..engine import CLIPPED_SHARE
from ..errors import ConfigError, StreamtagError, count
from ..multistream import MultiStreamTagger
from ..steps import Step, StepBlock
from .config import SettingsBook, valid_name
from .protocol import CLOSE_FULL, CLOSE_NAME_TAKEN


@dataclasses.dataclass
class ServeOptions:
    capacity: int = 256  # streams at once
    rate: float = 10.0  # score messages per second per client
    top: int = 3
    max_message_bytes: int = 1 << 20
    # Audio a stream may have queued. A client or pulled source further ahead is not read until the worker
    # catches up (TCP holds it back: nothing lost); a sound card cannot wait, so its excess is dropped.
    max_backlog_s: float = 5.0
    # A round steps at most this many hops of one stream, so one far ahead (a file pushed unpaced) cannot make
    # the round long for every other; it gets the rounds that follow (not with --ray: engines step all they get).
    max_round_hops: int = 25
    # A round steps at most this many streams, those whose audio has waited longest (twice as many when more
    # than two rounds' worth wait: ServeWorker._round_streams); the rest go in the next round, at once. Scores
    # go out when a round's model calls are done, so one round of 500 streams held each stream's for all 500
    # (about 65 ms here). Rounds of 50 cost about 10% more a stream than rounds of 500 (a model call costs
    # ~90 us whatever the batch; benchmarks/serve_worker.py --groups); at 500 streams 50 gave the lowest
    # latency of 20, 32, 50, 100 and 200, and 20 and 32 fell behind for good (benchmarks/serve.py).
    max_round_streams: int = 50
    # Every `message_window` messages must carry this much audio on average: a flood of tiny messages costs
    # the front per message, whatever the audio, and is closed (CLOSE_TOO_MANY_MESSAGES).
    min_message_ms: float = 5.0
    message_window: int = 200
    idle_s: float = 30.0  # a client that sends nothing this long is closed
    stall_s: float = 10.0  # a client that reads nothing this long (one write waits on it) is closed, or cut off
    token: str | None = None
    # Rounds start at most this often under load. A round of one stream costs the model about ten times more per
    # hop than a round of a hundred (one call per hop either way), so a busy worker lets clients' messages gather
    # for up to twice what its last round cost, up to this; a lightly loaded one (short rounds) barely waits.
    round_s: float = 0.02


@dataclasses.dataclass
class StreamAccount:
    """Per stream: every sample received is processed, dropped, or still pending."""

    rate: int
    received: int = 0
    dropped: int = 0
    processed: int = 0  # at the client's rate, counted as the engine takes them
    frames: int = 0
    events: int = 0
    level_dbfs: float = float("-inf")
    top: list = dataclasses.field(default_factory=list)
    recent: list = dataclasses.field(default_factory=list)  # the last few events, for the page
    last_audio: float = dataclasses.field(default_factory=time.monotonic)  # when its audio last came
    warning: str | None = None  # samples replaced or clipped: the input format is likely wrong (said once)
    cut: str | None = None  # bytes short of a frame when the stream ended (the front says how many)
    # (samples processed once a message was taken, when it arrived): how old a hop's audio is when its scores go
    arrivals: collections.deque = dataclasses.field(default_factory=collections.deque)

    def summary(self) -> dict:
        """The counts a client's last message carries (and a ``warning`` about its samples, when there is one)."""
        counts = {
            "received": self.received,
            "processed": self.processed,
            "dropped": self.dropped,
            "frames": self.frames,
            "events": self.events,
        }
        said = "; ".join(w for w in (self.warning, self.cut) if w)
        return {**counts, "warning": said} if said else counts


class ServeWorker(threading.Thread):
    """The one batched worker. Commands come through :meth:`submit` from any thread."""

    def __init__(
        self, multi: MultiStreamTagger, options: ServeOptions, mqtt=None, metrics=None, book: SettingsBook | None = None
    ) -> None:
        super().__init__(name="streamtag-serve-worker", daemon=True)
        self.multi, self.options, self.mqtt, self.metrics = multi, options, mqtt, metrics
        self.book = book  # per-stream settings (serve --config, run-time changes); None: the pool's for all
        self.enabled: dict[str, np.ndarray] = {}  # per stream: the classes its settings let through
        self._leaving: dict[str, object] = {}  # a leaving stream's engine: its last hops still report its level
        # streams whose client has ended (eof, or gone) with hops not yet stepped, and why: they leave once a
        # round has stepped those with everyone else's (a leave steps what is left alone, which hundreds of
        # clients ending at once made a quarter of a second of the worker's time)
        self._ending: dict[str, str] = {}
        self.inbox: queue.SimpleQueue = queue.SimpleQueue()
        self.accounts: dict[str, StreamAccount] = {}
        self.listeners: dict[str, Callable[[dict], None]] = {}
        self._every = max(1, round(1.0 / (options.rate * multi.frame_seconds)))
        # MQTT levels about twice a second whatever --rate is: a whole number of updates near 0.5 s
        self._level_every = self._every * max(1, round(0.5 / multi.frame_seconds / self._every))
        self._stopping = threading.Event()
        self.failure: str | None = None  # why the worker stopped on its own, if it did
        self.lock = threading.Lock()  # guards accounts for readers on other threads (metrics, page)

    @property
    def frame_seconds(self) -> float:
        return self.multi.frame_seconds

    @property
    def model_rate(self) -> int:
        """The model's sample rate: a sound card is opened at it."""
        return self.multi.backend.config.features.sample_rate

    def connected(self) -> set[str]:
        """The streams the worker holds (clients, pulled sources, sound cards); from any thread."""
        with self.lock:
            return set(self.accounts)

    def snapshot(self) -> dict:
        """What the live page shows of every stream; from any thread."""
        now = time.monotonic()
        with self.lock:
            return {
                name: {
                    "level_dbfs": max(a.level_dbfs, -120.0),
                    "top": a.top,
                    "recent": a.recent,
                    "frames": a.frames,
                    "silent_s": round(now - a.last_audio, 1),  # seconds without audio: the page greys it out
                    "samples": {"received": a.received, "processed": a.processed, "dropped": a.dropped},
                    **({} if a.warning is None else {"warning": a.warning}),
                }
                for name, a in self.accounts.items()
            }

    async def ask(self, what: str, timeout: float = 10.0):
        """:meth:`answer` for the front's handlers; a :class:`~streamtag.serve.process.WorkerProcess` asks its
        process, and raises StreamtagError when no answer comes within ``timeout``."""
        return self.answer(what)

    def answer(self, what: str):
        """``"state"`` (:meth:`snapshot`), ``"metrics"`` (the Prometheus text) or ``"ping"`` (``True``)."""
        if what == "state":
            return self.snapshot()
        if what == "metrics":
            return self.metrics.text() if self.metrics is not None else b""
        return True

    def attach(self, loop: asyncio.AbstractEventLoop) -> None:
        """The front's event loop, once it runs (a :class:`~streamtag.serve.process.WorkerProcess` talks
        through it); this thread posts to each client's own queue and needs nothing."""

    def source_restarted(self, name: str, gap_seconds: float, restarted: bool = True) -> None:
        """A pulled source or sound card of the server's own was started again (counted in /metrics), or, with
        ``restarted`` False, gave audio again: the rest of its time without audio is counted."""
        if self.metrics is not None:
            self.metrics.source_restarted(name, gap_seconds, restarted)

    def submit(self, *command) -> None:
        if command[0] == "audio":  # stamped on arrival: the latency metric counts the wait for the worker too
            command = (*command, time.perf_counter())
        self.inbox.put(command)

    def stop(self) -> None:
        self._stopping.set()
        self.inbox.put(("wake",))

    def run(self) -> None:
        try:
            self._rounds()
        except Exception as exc:  # the engines failed (a Ray cluster gone): say so; the front stops the server
            self.failure = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
            print(f"streamtag serve: error: the tagging worker stopped ({self.failure})", file=sys.stderr, flush=True)
            if not isinstance(exc, StreamtagError) and not type(exc).__module__.startswith("ray"):
                traceback.print_exc()  # a bug: where it is, for the report

    def _rounds(self) -> None:
        started, cost = 0.0, 0.0  # when the last round began, and what it took
        behind = False  # the last round left ready hops (a stream far ahead): the next round is due, not idle
        left_out = 0  # ready streams the last round had no room for: the next round is due now
        gather = max(1, self.options.max_round_streams // 2)

        def until_next_round() -> float:  # a busy worker lets messages gather up to twice its last round's cost,
            if left_out or self.multi.waiting >= gather:  # or until half a round's streams wait
                return 0.0
            return started + min(self.options.round_s, 2.0 * cost) - time.perf_counter()

        while True:
            # Idle, wait for audio; behind, the next round starts when a busy worker's would, so a stream far
            # ahead has at most about half the worker's time.
            command = self.next_command(until_next_round() if behind or left_out else 0.05)
            while command is not None:  # take commands until the next round is due
                try:
                    self._handle(command)
                except StreamtagError as exc:  # one stream's problem (a join refused): that client is told
                    self._refuse(command, str(exc))
                command = self.next_command(until_next_round())
            t0 = started = time.perf_counter()
            hops = 0
            stepped = self.multi.step_blocks(max_hops=self.options.max_round_hops, max_streams=self._round_streams())
            for name, item in stepped:
                hops += _hops(item)
                self._deliver(name, item)
            for name in [n for n in self._ending if not self._held_hops(n)]:
                self._leave(name, self._ending.pop(name))
            behind, left_out = self.multi.behind, self.multi.left_out
            cost = time.perf_counter() - t0
            if hops and self.metrics is not None:
                self.metrics.stepped(hops, cost)
            if self._stopping.is_set():
                with self.lock:
                    accounts = dict(self.accounts)
                for name in accounts:
                    self._leave(name, self._ending.pop(name, "interrupted"))
                _say_stop_summary(accounts)
                self._flush_mqtt()
                self.round_done()
                return
            self._flush_mqtt()
            self.round_done()

    def _round_streams(self) -> int:
        """How many streams the next round takes: ``max_round_streams``, or twice that when more than two rounds'
        worth wait. A worker behind (a burst of joins, the machine busy with something else) then pays a model
        call's fixed cost once for twice the streams and catches up sooner: at 600 streams on a 2-core machine,
        more than it carries, the median latency was 17-56 ms with the doubling and 22-516 ms without it
        (benchmarks/serve.py; README, "How many streams")."""
        streams = self.options.max_round_streams
        return 2 * streams if self.multi.waiting > 2 * streams else streams

    def _flush_mqtt(self) -> None:
        """What the round had for MQTT goes out (to the MQTT process, in one message)."""
        if self.mqtt is not None:
            self.mqtt.flush()

    def next_command(self, timeout: float):
        """The next command, waiting at most ``timeout`` seconds for one (none: ``None``)."""
        try:
            return self.inbox.get(timeout=timeout) if timeout > 0 else self.inbox.get_nowait()
        except queue.Empty:
            return None

    def round_done(self) -> None:
        """Called after every round (and the commands before it): the place for a subclass to hand what the
        round produced on in one go."""

    def _refuse(self, command, reason: str) -> None:
        if command[0] == "settings":
            command[3]({"error": reason})
        elif command[0] == "join":
            listener = command[3]
            code = CLOSE_NAME_TAKEN if command[1] in self.accounts else CLOSE_FULL
            listener({"type": "error", "message": reason, "code": code})
            listener(None)

    # -- commands ------------------------------------------------------------------------------------------
    def _handle(self, command) -> None:
        kind = command[0]
        if kind == "join":
            _, name, rate, listener = command
            self.multi.join(name, sample_rate=rate, events=self.book.detector(name) if self.book else None)
            with self.lock:
                self.accounts[name] = StreamAccount(rate)
            self.listeners[name] = listener
            self.enabled[name] = self._enabled(name)
            if self.mqtt is not None:
                self.mqtt.stream_joined(name, self.enabled[name])
                if self.book is not None:
                    self.mqtt.settings(name, self.book.settings(name).as_dict())
        elif kind == "settings":  # ("settings", name, change or None to read, reply)
            _, name, change, reply = command
            if self.book is None:
                raise ConfigError("this server has no per-stream settings")
            if not valid_name(name):
                raise ConfigError("stream names are 1-64 of A-Z a-z 0-9 _ -")
            if change is not None:
                self.book.change(name, change)
                self._keep_settings_of(name)
                engine = self.multi.streams.get(name)
                if engine is not None:  # a running stream: events of changed labels close (reason settings)
                    for step in engine.set_events(self.book.detector(name)):
                        self._deliver(name, step)
                    self.enabled[name] = self._enabled(name)
                    if self.mqtt is not None:
                        self.mqtt.labels_changed(name, self.enabled[name])
                if self.mqtt is not None:
                    self.mqtt.settings(name, self.book.settings(name).as_dict())
            reply({"stream": name, "settings": self.book.settings(name).as_dict()})
        elif kind == "audio":
            _, name, samples, arrived = command
            account = self.accounts.get(name)
            if account is None:
                return
            account.received += samples.size
            account.last_audio = time.monotonic()
            room = int(self.options.max_backlog_s * account.rate) - self._backlog(name)
            if samples.size > room:  # a client far ahead of real time: keep the stream bounded
                keep = max(room, 0)
                account.dropped += samples.size - keep
                samples = samples[:keep]
            if samples.size:
                self.multi.feed(name, samples)
                account.processed += samples.size
                if account.warning is None:
                    self._check_samples(name, account)
                if self.metrics is not None:
                    account.arrivals.append((account.processed, arrived))
        elif kind == "source":  # a pulled source or sound card of the server's own went away, or is back
            _, name, up = command
            if name not in self.accounts:
                return
            if not up:  # its open events close (reason gap) and its state is cleared, as live --reconnect does
                hops = 0
                for step in self.multi.reset(name, "gap"):  # the hops before the gap first
                    hops += _hops(step)
                    self._deliver(name, step)
                if hops and self.metrics is not None:
                    self.metrics.hops.inc(hops)
                with self.lock:  # what the page and /v1/state show: not the last scores, as if still heard
                    account = self.accounts[name]
                    account.top, account.level_dbfs = [], float("-inf")
            else:  # back: its time moves on over the gap, so what it hears now keeps its place on the clock
                self.multi.skip(name, time.monotonic() - self.accounts[name].last_audio)
            if self.mqtt is not None:
                self.mqtt.stream_available(name, up)
        elif kind in ("eof", "gone"):  # the first word on a stream's end stands
            name = command[1]
            if len(command) > 2 and name in self.accounts:  # a part-frame at the end, said in the summary
                self.accounts[name].cut = command[2]
            reason = self._ending.get(name) or ("stream_end" if kind == "eof" else "interrupted")
            if name in self.accounts and self._held_hops(name):
                self._ending[name] = reason
            else:
                self._ending.pop(name, None)
                self._leave(name, reason)

    def _keep_settings_of(self, name: str) -> None:
        """Run-time settings belong to a name, so a client that reconnects keeps them; those of names neither
        connected nor in the config file are kept for the ``capacity`` most recently changed or left, the oldest
        forgotten (every name that ever connected was kept, and 256 names never seen filled the book for good)."""
        changes = self.book.changes
        if name in changes:
            changes[name] = changes.pop(name)  # the most recent, last
        away = [n for n in changes if n not in self.accounts and n not in self.book.config.streams]
        for old in away[: max(0, len(away) - self.options.capacity)]:
            del changes[old]
            if self.mqtt is not None:  # its retained settings no longer hold
                self.mqtt.settings_forgotten(old)

    def stepped_samples(self, name: str) -> int:
        """Samples of a stream (at its own rate) whose hops are stepped; 0 before its join is taken. Read from the
        front's thread to pace a sender: an int read, no lock."""
        account = self.accounts.get(name)
        return 0 if account is None else round(account.frames * self.multi.frame_seconds * account.rate)

    def _enabled(self, name: str) -> np.ndarray | None:
        """The classes a stream's settings let through; ``None`` when that is all of them."""
        if self.book is None:
            return None
        enabled = np.asarray(self.book.settings(name).enabled(self.multi.labels), dtype=bool)
        return None if enabled.all() else enabled

    def _held_hops(self, name: str) -> int:
        """Whole hops of a stream not yet stepped; 0 on a Ray engine's stream, which steps what it holds as it
        leaves."""
        return getattr(self.multi.streams.get(name), "ready", 0)

    def _backlog(self, name: str) -> int:
        engine = self.multi.streams[name]
        return int(engine.pending_samples * self.accounts[name].rate / engine.model_rate)

    def _check_samples(self, name: str, account: StreamAccount) -> None:
        """Samples replaced (NaN, Inf) or clipped (beyond full scale) say that the client's format is likely not
        what it sends (s16le sent as f32le): said once in the log, and in the stream's state and summary, where
        it had been tagged as noise without a word."""
        stats = self.multi.streams[name].stats  # (a stream on a Ray engine counts none here: serve --ray)
        # a few samples just over full scale are a float source's overshoot, not another format
        if getattr(stats, "nonfinite", 0) or getattr(stats, "clipped", 0) > CLIPPED_SHARE * account.processed:
            account.warning = stats.problems()
            print(f"streamtag serve: warning: stream '{name}': {account.warning}", file=sys.stderr, flush=True)

    def _leave(self, name: str, reason: str) -> None:
        if name not in self.accounts:
            return
        engine = self._leaving[name] = self.multi.streams.get(name)
        try:
            hops = 0
            for step in self.multi.leave(name, reason):  # the hops it still held are stepped here
                hops += _hops(step)
                self._deliver(name, step)
        finally:
            self._leaving.pop(name, None)
        if hops and self.metrics is not None:
            self.metrics.hops.inc(hops)
        with self.lock:
            account = self.accounts.pop(name)
        if account.warning is not None:
            account.warning = engine.stats.problems()  # the counts at the end
        listener = self.listeners.pop(name)
        self.enabled.pop(name, None)
        if self.book is not None and name in self.book.changes:
            self._keep_settings_of(name)  # kept for its return, among the most recent
        listener({"type": "summary", "reason": reason, **account.summary()})
        listener(None)  # the connection may close now
        if self.mqtt is not None:
            self.mqtt.stream_left(name)
        if self.metrics is not None:
            self.metrics.left(account)

    # -- steps out -----------------------------------------------------------------------------------------
    def _deliver(self, name: str, item: Step | StepBlock) -> None:
        """A step or a block of one stream out to its client, MQTT and the metrics: a scores message every
        ``_every`` hops, every event."""
        account, listener = self.accounts[name], self.listeners[name]
        if isinstance(item, StepBlock):
            before, every = account.frames, self._every
            account.frames += len(item)
            due = range((-(before + 1)) % every, len(item), every)  # rows whose hop count is a multiple of every
            for i in sorted(set(due).union(item.events)) if item.events else due:
                if (before + i + 1) % every == 0:
                    self._scores(name, account, listener, before + i + 1, item.t(i), item.probs[i])
                self._events(name, account, listener, item.events.get(i, ()))
            return
        if item.has_scores:
            account.frames += 1
            if account.frames % self._every == 0:
                self._scores(name, account, listener, account.frames, item.t, item.probs)
        self._events(name, account, listener, item.events)

    def _scores(self, name: str, account: StreamAccount, listener, frames: int, t: float, probs: np.ndarray) -> None:
        enabled = self.enabled[name]
        if enabled is None:  # every class: the common case, without a masked copy
            order = np.argsort(-probs)[: self.options.top]
        else:
            order = np.argsort(-np.where(enabled, probs, -1.0))[: self.options.top]
            order = order[enabled[order]]
        labels = self.multi.labels
        top = [[labels[i], round(p, 4)] for i, p in zip(order.tolist(), probs[order].tolist())]
        engine = self.multi.streams.get(name) or self._leaving.get(name)
        level = engine.stats.recent_dbfs if engine is not None else account.level_dbfs
        with self.lock:
            account.top, account.level_dbfs = top, level
        listener({"type": "scores", "t": round(t, 3), "top": top, "level_dbfs": round(max(level, -120), 1)})
        if self.metrics is not None:
            self._latency(account, frames)
        if self.mqtt is not None and frames % self._level_every == 0:
            self.mqtt.level(name, level)

    def _latency(self, account: StreamAccount, frames: int) -> None:
        """Time from the arrival of the message that held the last sample of hop ``frames`` to now, when
        its scores are handed to the network front: the latency of issue 14's benchmark, measured where
        no client's own scheduling is in it."""
        last_sample = round(frames * self.multi.frame_seconds * account.rate)
        arrivals = account.arrivals
        while arrivals and arrivals[0][0] < last_sample:  # messages wholly before this hop
            arrivals.popleft()
        if arrivals:
            self.metrics.latency(time.perf_counter() - arrivals[0][1])

    def _events(self, name: str, account: StreamAccount, listener, events) -> None:
        for event in events:
            listener(event.as_dict())
            if event.kind == "open":
                account.events += 1
            with self.lock:
                account.recent = _recent(account.recent, event.as_dict())
            if self.mqtt is not None:
                self.mqtt.event(name, event)
            if self.metrics is not None and event.kind == "open":
                self.metrics.event(event.label)


class Metrics:
    """Prometheus metrics (``/metrics``): streams, hops, samples, events by label, step latency."""

    def __init__(self, worker_accounts: Callable[[], dict], mqtt=None) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = CollectorRegistry()
        self.hops = Counter("streamtag_hops", "hops stepped, all streams", registry=self.registry)
        self.events = Counter("streamtag_events", "events opened", ["label"], registry=self.registry)
        self.step_seconds = Histogram(
            "streamtag_round_seconds",
            "time of one round of batched steps",
            buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1),
            registry=self.registry,
        )
        self.latency_seconds = Histogram(
            "streamtag_latency_seconds",
            "a hop's last sample received -> its scores handed to the network front",
            buckets=(0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0),
            registry=self.registry,
        )
        self.received = Counter(
            "streamtag_samples_received", "samples received, streams that left", registry=self.registry
        )
        self.processed = Counter(
            "streamtag_samples_processed", "samples processed, streams that left", registry=self.registry
        )
        self.dropped = Counter(
            "streamtag_samples_dropped", "samples dropped, streams that left", registry=self.registry
        )
        self.restarts = Counter(
            "streamtag_source_restarts",
            "pulled sources and sound cards started again",
            ["stream"],
            registry=self.registry,
        )
        self.gap_seconds = Counter(
            "streamtag_source_gap_seconds",
            "time pulled sources and sound cards gave no audio",
            ["stream"],
            registry=self.registry,
        )
        streams = Gauge("streamtag_streams", "streams connected", registry=self.registry)
        streams.set_function(lambda: len(worker_accounts()))
        live_dropped = Gauge(
            "streamtag_samples_dropped_open", "samples dropped, streams still open", registry=self.registry
        )
        live_dropped.set_function(lambda: sum(a.dropped for a in list(worker_accounts().values())))
        live_received = Gauge(
            "streamtag_samples_received_open", "samples received, streams still open", registry=self.registry
        )
        live_received.set_function(lambda: sum(a.received for a in list(worker_accounts().values())))
        live_processed = Gauge(  # received = processed + dropped, and the audio still waiting for its hop
            "streamtag_samples_processed_open", "samples processed, streams still open", registry=self.registry
        )
        live_processed.set_function(lambda: sum(a.processed for a in list(worker_accounts().values())))
        if mqtt is not None:  # what the broker got, and what did not fit paho's queue while it was away
            published = Gauge("streamtag_mqtt_published", "MQTT messages handed to the client", registry=self.registry)
            published.set_function(lambda: mqtt.published)
            dropped = Gauge(
                "streamtag_mqtt_dropped",
                "MQTT messages dropped (states and levels while the broker is away, or the queue full)",
                registry=self.registry,
            )
            dropped.set_function(lambda: mqtt.dropped)

    def stepped(self, hops: int, seconds: float) -> None:
        self.hops.inc(hops)
        self.step_seconds.observe(seconds)

    def latency(self, seconds: float) -> None:
        self.latency_seconds.observe(seconds)

    def event(self, label: str) -> None:
        self.events.labels(label).inc()

    def source_restarted(self, stream: str, gap_seconds: float, restarted: bool = True) -> None:
        """A pulled source or sound card of the server's own was started again after ``gap_seconds`` without
        audio (or, not ``restarted``, gave audio again ``gap_seconds`` after its last start)."""
        if restarted:
            self.restarts.labels(stream).inc()
        self.gap_seconds.labels(stream).inc(max(gap_seconds, 0.0))

    def left(self, account: StreamAccount) -> None:
        self.received.inc(account.received)
        self.processed.inc(account.processed)
        self.dropped.inc(account.dropped)

    def text(self) -> bytes:
        from prometheus_client import generate_latest

        return generate_latest(self.registry)


RECENT_EVENTS = 8  # ended events the page lists per stream (besides those still open)


def _recent(recent: list[dict], row: dict) -> list[dict]:
    """The page's event list with ``row``: a close replaces its open, and an event still open is never pushed
    out by newer short ones (a long rain under many barks)."""
    if row["type"] == "close":
        recent = [
            r for r in recent if not (r["type"] == "open" and (r["label"], r["onset"]) == (row["label"], row["onset"]))
        ]
    recent = [*recent, row]
    ended = sum(r["type"] != "open" for r in recent)
    drop = max(0, ended - RECENT_EVENTS)  # the oldest ended ones go
    kept = []
    for r in recent:
        if r["type"] != "open" and drop:
            drop -= 1
            continue
        kept.append(r)
    return kept


def _say_stop_summary(accounts: dict[str, StreamAccount]) -> None:
    """At a stop, what every stream still connected got, on stderr (the journal of a service): the WebSocket
    clients had their summaries, the server's own sources and the operator had none."""
    if not accounts:
        return
    rows = [(name, a.received, a.processed, a.dropped, a.events) for name, a in sorted(accounts.items())]
    totals = [sum(row[i] for row in rows) for i in range(1, 5)]
    say = lambda text: print(f"streamtag serve: {text}", file=sys.stderr, flush=True)  # noqa: E731
    say(
        f"{count(len(rows), 'stream')} at the stop: samples received {totals[0]}, processed {totals[1]}, "
        f"dropped {totals[2]}; {count(totals[3], 'event')}"
    )
    for name, received, processed, dropped, events in rows[:STOP_SUMMARY_STREAMS]:
        say(f"  {name}: received {received}, processed {processed}, dropped {dropped}; {count(events, 'event')}")
    if len(rows) > STOP_SUMMARY_STREAMS:
        say(f"  ... and {len(rows) - STOP_SUMMARY_STREAMS} more (each one's figures: /v1/state while it runs)")


STOP_SUMMARY_STREAMS = 20  # streams listed one by one in the stop summary


def _hops(item: StepBlock | Step) -> int:
    """The hops a delivered item holds (a reset's event-only step holds none)."""
    return len(item) if isinstance(item, StepBlock) else int(item.has_scores)


class Pacer:
    """Hands a stream's audio to the worker, holding the sender back while the worker is ``max_backlog_s``
    behind it: a client pushing a file unpaced, or ffmpeg reading one, is then read no faster than it is
    tagged (TCP or the pipe holds the rest back) instead of having its excess dropped. Audio goes in pieces of
    at most a second, so one large message waits its turn as many small ones would."""

    POLL_S = 0.01

    def __init__(self, worker: ServeWorker, name: str, rate: int, go_on: Callable[[], bool]) -> None:
        self.worker, self.name, self.go_on = worker, name, go_on
        hop = worker.frame_seconds * rate  # the limit holds a few hops at least, or the sender never moves
        self.limit = max(int(worker.options.max_backlog_s * rate), int(8 * hop) + 1)
        self.piece = min(rate, self.limit)
        self.submitted = 0

    async def submit(self, samples: np.ndarray) -> None:
        for i in range(0, samples.size, self.piece):
            piece = samples[i : i + self.piece]
            while (
                self.submitted + piece.size - self.worker.stepped_samples(self.name) > self.limit
                and self.go_on()
                and self.worker.is_alive()
            ):
                await asyncio.sleep(self.POLL_S)
            self.worker.submit("audio", self.name, piece)
            self.submitted += piece.size
