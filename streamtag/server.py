"""``streamtag serve``: many remote streams through one batched worker; events to clients, MQTT and a web page.

Two halves. An asyncio front (aiohttp) speaks to the network: WebSocket streams in, JSON back,
``/metrics``, ``/healthz`` and the live page. One worker (a thread here, or in a process of its own:
:mod:`streamtag.serve_process`) owns a :class:`~streamtag.multistream.MultiStreamTagger`: it takes
decoded audio from an inbox, steps the streams that have hops in one batched call a round (at most
``max_round_streams`` of them, those whose audio has waited longest), and hands each step to that
stream's client, to MQTT and to the metrics. The network never waits on the
model and the model never waits on the network: a client (or pulled source) sending faster than
real time is not read while ``max_backlog_s`` of its audio waits (:class:`Pacer`; a sound card,
which cannot wait, has the excess dropped and counted), a round steps at most ``max_round_hops``
of one stream, and every sample is accounted for (received = processed + dropped + pending).

WebSocket protocol, ``ws://HOST:PORT/v1/streams/<name>``: an optional first text message
``{"sample_rate": 16000, "format": "s16le" | "s32le" | "f32le", "channels": 1}`` (the defaults), then binary
PCM of any size; ``{"type": "eof"}`` ends the stream. The server sends ``{"type": "scores", "t",
"top": [[label, p], ...]}`` ``rate`` times a second, ``{"type": "open" | "close", "label", "onset",
"offset", ...}`` for events, and a last ``{"type": "summary", ...}`` before it closes.

Per-stream settings (labels, event thresholds; :mod:`streamtag.serve_config`) are changed on the
worker thread like everything else: ``GET``/``PUT /v1/streams/<name>/settings`` and MQTT
``<prefix>/<name>/set`` submit a command and wait for its answer.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import hmac
import ipaddress
import json
import os
import queue
import signal
import sys
import threading
import time
import traceback
from collections.abc import Awaitable, Callable
from pathlib import Path
from urllib.parse import unquote, urlparse

import numpy as np

from .errors import ConfigError, StreamtagError, count
from .multistream import MultiStreamTagger
from .outputs.mqtt import USERINFO
from .serve_config import SettingsBook, parse_change, valid_name
from .sources.file import AUDIO_SUFFIXES
from .sources.pipe import RAW_FORMATS, PcmDecoder, PcmFormat
from .steps import Step, StepBlock

PAGE = Path(__file__).parent / "assets" / "serve_page.html"

# close codes (4000-4999 are the application's)
CLOSE_BAD_REQUEST, CLOSE_NAME_TAKEN, CLOSE_FULL, CLOSE_IDLE, CLOSE_UNAUTHORISED = 4400, 4409, 4429, 4408, 4401
CLOSE_TOO_MANY_MESSAGES = 4420
LOOPBACK_ONLY = "without --token: requests to 127.0.0.1 or localhost, from no page or a local one (proxies: --token)"
HEALTH_TIMEOUT_S = 2.0  # /healthz: the worker must answer within this


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
    token: str | None = None
    # Rounds start at most this often under load. A round of one stream costs the model about ten times more per
    # hop than a round of a hundred (one call per hop either way), so a busy worker lets clients' messages gather
    # for up to twice what its last round cost, up to this; a lightly loaded one (short rounds) barely waits.
    round_s: float = 0.02


CLIPPED_SHARE = 0.01  # more of a stream's samples than this beyond full scale: its format is likely not what it said


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
        return counts if self.warning is None else {**counts, "warning": self.warning}


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
        """:meth:`answer` for the front's handlers; a :class:`~streamtag.serve_process.WorkerProcess` asks its
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
        """The front's event loop, once it runs (a :class:`~streamtag.serve_process.WorkerProcess` talks
        through it); this thread posts to each client's own queue and needs nothing."""

    def source_restarted(self, name: str, gap_seconds: float) -> None:
        """A pulled source or sound card of the server's own was started again (counted in /metrics)."""
        if self.metrics is not None:
            self.metrics.source_restarted(name, gap_seconds)

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
                known = name in self.accounts or name in self.book.config.streams or name in self.book.changes
                if not known and len(self.book.changes) >= self.options.capacity:  # names never seen, without end
                    raise ConfigError(
                        f"settings are kept for at most {self.options.capacity} streams not in the config file; "
                        f"'{name}' is not connected: set it once it is, or name it in the config file"
                    )
                self.book.change(name, change)
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
            else:  # back: its time moves on over the gap, so what it hears now keeps its place on the clock
                self.multi.skip(name, time.monotonic() - self.accounts[name].last_audio)
            if self.mqtt is not None:
                self.mqtt.stream_available(name, up)
        elif kind in ("eof", "gone"):  # the first word on a stream's end stands
            name = command[1]
            reason = self._ending.get(name) or ("stream_end" if kind == "eof" else "interrupted")
            if name in self.accounts and self._held_hops(name):
                self._ending[name] = reason
            else:
                self._ending.pop(name, None)
                self._leave(name, reason)

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
        if mqtt is not None:  # what the broker got, and what did not fit paho's queue while it was away
            published = Gauge("streamtag_mqtt_published", "MQTT messages handed to the client", registry=self.registry)
            published.set_function(lambda: mqtt.published)
            dropped = Gauge("streamtag_mqtt_dropped", "MQTT messages dropped (queue full)", registry=self.registry)
            dropped.set_function(lambda: mqtt.dropped)

    def stepped(self, hops: int, seconds: float) -> None:
        self.hops.inc(hops)
        self.step_seconds.observe(seconds)

    def latency(self, seconds: float) -> None:
        self.latency_seconds.observe(seconds)

    def event(self, label: str) -> None:
        self.events.labels(label).inc()

    def source_restarted(self, stream: str, gap_seconds: float) -> None:
        """A pulled source or sound card of the server's own was started again after ``gap_seconds`` without
        audio."""
        self.restarts.labels(stream).inc()
        self.gap_seconds.labels(stream).inc(max(gap_seconds, 0.0))

    def left(self, account: StreamAccount) -> None:
        self.received.inc(account.received)
        self.dropped.inc(account.dropped)

    def text(self) -> bytes:
        from prometheus_client import generate_latest

        return generate_latest(self.registry)


def _mono(frames: np.ndarray) -> np.ndarray:
    return frames[:, 0] if frames.shape[1] == 1 else frames.mean(axis=1, dtype=np.float32)


def _whole(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)  # JSON true is no channel count


def parse_hello(text: str) -> PcmFormat:
    """The optional first text message -> the stream's PCM format; ConfigError says what is wrong."""
    try:
        hello = json.loads(text)
    except ValueError:
        raise ConfigError(
            'the first text message must be JSON, e.g. {"sample_rate": 16000, "format": "s16le"}'
        ) from None
    if not isinstance(hello, dict):
        raise ConfigError("the first text message must be a JSON object")
    if "type" in hello and not set(hello) & {"sample_rate", "format", "channels"}:  # a format message may be typed
        raise ConfigError(
            f"no message has type {hello['type']!r}: the first message gives the format without a type, e.g. "
            '{"sample_rate": 16000, "format": "s16le"}, and {"type": "eof"} ends the stream'
        )
    unknown = set(hello) - {"sample_rate", "format", "channels", "type"}
    if unknown:
        raise ConfigError(f"unknown keys {sorted(unknown)} (sample_rate, format, channels)")
    rate, fmt, channels = hello.get("sample_rate", 16000), hello.get("format", "s16le"), hello.get("channels", 1)
    if not _whole(rate) or not 8000 <= rate <= 192000:
        raise ConfigError(f"sample_rate must be a whole number in 8000..192000 ({rate!r} given)")
    if fmt not in RAW_FORMATS:
        raise ConfigError(f"format must be one of {', '.join(RAW_FORMATS)} ({fmt!r} given)")
    if not _whole(channels) or not 1 <= channels <= 8:
        raise ConfigError(f"channels must be 1..8 ({channels!r} given)")
    return PcmFormat.raw(rate, fmt, channels)


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
        f"dropped {totals[2]}; {totals[3]} events"
    )
    for name, received, processed, dropped, events in rows[:STOP_SUMMARY_STREAMS]:
        say(f"  {name}: received {received}, processed {processed}, dropped {dropped}; {events} events")
    if len(rows) > STOP_SUMMARY_STREAMS:
        say(f"  ... and {len(rows) - STOP_SUMMARY_STREAMS} more (each one's figures: /v1/state while it runs)")


STOP_SUMMARY_STREAMS = 20  # streams listed one by one in the stop summary


def _hops(item: StepBlock | Step) -> int:
    """The hops a delivered item holds (a reset's event-only step holds none)."""
    return len(item) if isinstance(item, StepBlock) else int(item.has_scores)


async def pull(name: str, url: str, worker: ServeWorker, stop: asyncio.Event) -> None:
    """A pulled source: ``ffmpeg`` decodes ``url`` (RTSP, HTTP, a file: anything it reads) to mono PCM at the
    model rate, tagged as the stream ``name`` and kept going by :func:`_child_source`. A local file that ends
    is read again at once (it stands for a live source: a loop, said once on stderr, not a failure)."""
    import shutil

    ffmpeg = shutil.which("ffmpeg")
    if ffmpeg is None:
        raise ConfigError("--pull needs ffmpeg on the PATH (apt-get install ffmpeg)")
    rate = worker.model_rate
    realtime = ["-re"] if _is_file(url) else []
    decode = [ffmpeg, "-nostdin", "-v", "error", *realtime, "-i", url, "-f", "s16le", "-ac", "1", "-ar", str(rate), "-"]
    child = ChildSource(decode, PcmFormat.raw(rate, "s16le"), "source", "ffmpeg: ", url, local_path(url) is not None)
    await _child_source(name, child, worker, stop)


async def capture(name: str, device: str, worker: ServeWorker, stop: asyncio.Event) -> None:
    """A local sound card, by name (as ``live --device``), tagged as the stream ``name``. It is captured by
    :mod:`streamtag.sources.device_pipe` in a process of its own: PortAudio finds a card again only by
    restarting, which would cut off every other card of the server's process. That program ends when the
    card is missing, lost or silent for 2 s, and is started again as ffmpeg is for a pulled source."""
    rate = worker.model_rate
    program = [sys.executable, "-m", "streamtag.sources.device_pipe", device, str(rate)]
    await _child_source(name, ChildSource(program, PcmFormat.raw(rate, "f32le"), "sound card"), worker, stop)


@dataclasses.dataclass(frozen=True)
class ChildSource:
    """A program that writes a stream's audio to stdout, as :func:`_child_source` runs it."""

    command: list[str]
    pcm: PcmFormat  # what the program is told to write
    what: str  # "source", "sound card": for what is said on stderr
    says: str = ""  # put before each line of its stderr
    secret: str | None = None  # a URL that may hold a password: never repeated from its stderr
    loops: bool = False  # a local file: read again at once when it ends


async def _child_source(name: str, child: ChildSource, worker: ServeWorker, stop: asyncio.Event) -> None:
    """Run ``child`` and hand what it writes to the worker as the stream ``name``, joined from the start. When
    it ends or fails (a camera drops, a card is unplugged) or gives nothing for ``PULL_STALL_S`` (a camera
    that hangs), it is started again with backoff (1 s doubling to 30 s); the stream stays joined, the first
    failure of a run of them is said on stderr, and the restarts and the time without audio are counted in
    ``/metrics``. While it gives no audio the stream is unavailable: its open events close (reason ``gap``),
    its state is cleared and MQTT says it is ``offline``, until audio comes again."""
    loop = asyncio.get_running_loop()
    refused: list[str] = []

    def listener(message) -> None:  # no client: steps go to MQTT and the page; a refused join ends the task
        if message is not None and message.get("type") == "error":
            refused.append(message["message"])

    rate = child.pcm.rate
    worker.submit("join", name, rate, listener)
    pacer = Pacer(worker, name, rate, lambda: not (stop.is_set() or refused))
    read_size = int(0.2 * rate) * child.pcm.width * child.pcm.channels  # 200 ms at most a read
    die_with_parent = _death_signal()
    delay = 1.0
    last_audio = counted = loop.time()  # counted: the gap metric holds the time without audio up to here
    failing = False  # a failure is said once, until audio comes again (no line per retry)
    down = False  # the stream is said to be unavailable (a failed try, until audio comes again)
    looped = False
    while not stop.is_set():
        if refused:
            say = f"streamtag serve: {name}: {refused[0]}; this {child.what} is not tagged"
            print(say, file=sys.stderr, flush=True)
            return
        proc = await asyncio.create_subprocess_exec(
            *child.command,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            preexec_fn=die_with_parent,
        )
        decode = PcmDecoder(child.pcm)  # a part-frame is its own
        errors: collections.deque = collections.deque(maxlen=2)  # the child's last words, drained as they come
        drain = asyncio.create_task(_lines(proc.stderr, errors, child.says, child.secret))
        got_audio, why, ended = False, None, False
        try:
            stalled = 0.0
            while not (stop.is_set() or refused):
                try:  # in slices, so a stop or a stalled source (a camera that hangs, not drops) is seen
                    data = await asyncio.wait_for(proc.stdout.read(read_size), timeout=PULL_POLL_S)
                except asyncio.TimeoutError:
                    stalled += PULL_POLL_S
                    if stalled >= PULL_STALL_S:
                        why = f"no audio for {PULL_STALL_S:g} s"
                        break
                    continue
                if not data:
                    ended = True
                    break
                stalled = 0.0
                got_audio, last_audio = True, loop.time()
                if down:
                    down = False
                    worker.submit("source", name, True)
                if failing:
                    failing = False
                    print(f"streamtag serve: {name}: audio again", file=sys.stderr, flush=True)
                samples = _mono(decode(data))
                if samples.size:
                    await pacer.submit(samples)
        finally:
            if proc.returncode is None:
                proc.kill()
            await proc.wait()
            await drain
        if stop.is_set() or refused:
            continue
        if child.loops and ended and got_audio and proc.returncode == 0:  # a file read to its end: again, at once
            if not looped:
                looped = True
                print(
                    f"streamtag serve: {name}: the file ended; playing it again (a pulled file loops)", file=sys.stderr
                )
            continue
        if not down:
            down = True
            worker.submit("source", name, False)
        delay = 1.0 if got_audio else min(2 * delay, 30.0)
        why = why or (errors[-1] if errors else None)
        if why and not failing:  # a URL is not printed: it may hold a camera's password
            failing = True
            print(f"streamtag serve: {name}: {why}; trying again (1 s doubling to 30 s)", file=sys.stderr, flush=True)
        await _sleep_unless(stop, delay)
        if not stop.is_set():  # the gap: the time without audio since it was last counted, failed tries included
            now = loop.time()
            worker.source_restarted(name, now - max(last_audio, counted))
            counted = now
    # the server is stopping: worker.stop() ends the stream (events closed as interrupted, in the stop summary)


def _death_signal() -> Callable[[], None] | None:
    """What a pulled source's ffmpeg runs between fork and exec (Linux): it is killed with the server, even by
    SIGKILL, rather than left reading a camera for ever. Looked up here, in the server, so the child (forked from
    a process with threads) runs no import, only the call; a server gone before the call is seen by its parent
    changing. ``None`` where prctl is not there."""
    try:
        import ctypes

        prctl = ctypes.CDLL(None).prctl
    except (OSError, AttributeError):
        return None
    parent = os.getpid()

    def die_with_parent() -> None:
        prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        if os.getppid() != parent:
            os._exit(1)

    return die_with_parent


async def _lines(stream: asyncio.StreamReader, keep: collections.deque, says: str, secret: str | None) -> None:
    """Read a child's stderr to the end (a full pipe would stop it), keeping its last lines, with ``secret``
    (a source's URL) and any user:password@ in them hidden (ffmpeg names the URL in its errors)."""
    async for line in stream:
        text = line.decode(errors="replace").strip()
        text = USERINFO.sub(r"\1***@", text.replace(secret, "<url>") if secret else text)
        if text:
            keep.append(f"{says}{text}")


AUDIO_FILE_SUFFIXES = (*AUDIO_SUFFIXES, ".m4a", ".aac", ".wma", ".webm", ".mka")  # and what only ffmpeg reads


def local_path(url: str) -> str | None:
    """The file a pulled source names, for a plain path or a file: URL; ``None`` for anything else ffmpeg reads
    (a network URL, pipe:, concat:, ...), which only ffmpeg can judge."""
    parsed = urlparse(url)
    if parsed.scheme == "file":
        return unquote(parsed.path)
    return url if not parsed.scheme or len(parsed.scheme) == 1 else None  # one letter: a Windows drive


def _is_file(url: str) -> bool:
    """Whether a pulled source is a recording (read at its own pace, -re, as the live source it stands for)
    rather than a live stream, which comes at its own pace and must be read as fast as it comes, or it
    falls behind for good after any hiccup: a local file, or a URL naming an audio file
    (http://host/clip.flac). A live stream whose URL ends so (an Icecast mount such as /radio.mp3) is
    paced too: it keeps up, but does not catch up after a stall."""
    if local_path(url) is not None:
        return True
    parsed = urlparse(url)
    return parsed.scheme in ("http", "https", "ftp") and parsed.path.lower().endswith(AUDIO_FILE_SUFFIXES)


PULL_POLL_S = 0.5  # a pulled source's read waits this long at a time, then looks at the stop flag
PULL_STALL_S = 10.0  # a pulled source that gives no audio this long (a hung camera) is started again


async def _sleep_unless(stop: asyncio.Event, seconds: float) -> None:
    try:
        await asyncio.wait_for(stop.wait(), timeout=seconds)
    except asyncio.TimeoutError:
        pass


class _LoopPost:
    """Messages from the worker thread into the event loop's queues, many per wakeup: waking the loop costs a
    system call, and at hundreds of streams the worker hands over thousands of messages a second."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop, self.loop_thread = loop, threading.get_ident()  # made on the loop's thread
        self.items: collections.deque = collections.deque()
        self.lock = threading.Lock()
        self.armed = False  # a drain is scheduled and has not started

    def __call__(self, outbox: asyncio.Queue, message) -> None:
        if threading.get_ident() == self.loop_thread:  # a worker process's messages are read on the loop
            outbox.put_nowait(message)
            return
        self.items.append((outbox, message))
        with self.lock:
            if self.armed:
                return
            self.armed = True
        self.loop.call_soon_threadsafe(self._drain)

    def _drain(self) -> None:
        with self.lock:
            self.armed = False  # anything added from here on schedules the next drain
        while self.items:
            outbox, message = self.items.popleft()
            outbox.put_nowait(message)


class _IdleWatch:
    """Ends a connection's wait for its next message once it has waited ``idle_s``: the wait's task is cancelled.

    One timer per connection, looked at once per ``idle_s`` and moved on if a message came meanwhile, where
    ``asyncio.wait_for`` around every receive made a task and a timer per message (an eighth of the network
    front's time at hundreds of streams). Only a wait for the client counts: time spent handing audio to a
    busy worker does not."""

    def __init__(self, idle_s: float) -> None:
        self.loop, self.task, self.idle_s = asyncio.get_running_loop(), asyncio.current_task(), idle_s
        self.since: float | None = None  # when the wait now going on began; None between waits
        self.fired = False
        self.timer = self.loop.call_later(idle_s, self._check)

    async def receive(self, message: Awaitable):
        """``await message`` (the client's next one) under the watch; ``None`` once the client has been idle
        ``idle_s``. A cancellation that is not the watch's own (a server shutdown) goes on up."""
        self.since = self.loop.time()
        try:
            return await message
        except asyncio.CancelledError:
            if not self.interrupted():
                raise
            return None
        finally:
            self.since = None

    def _check(self) -> None:
        now = self.loop.time()
        if self.since is not None and now - self.since >= self.idle_s:
            self.fired = True
            self.task.cancel()
            return
        self.timer = self.loop.call_at((now if self.since is None else self.since) + self.idle_s, self._check)

    def interrupted(self) -> bool:
        """Whether a cancellation was this watch's alone (then taken back, so the task goes on to close cleanly).
        One that came with another (the server shutting down in the same pass) is the other's: passed on."""
        if not self.fired:
            return False
        uncancel = getattr(self.task, "uncancel", None)  # Python 3.11+; 3.10 cannot tell two cancels apart
        return uncancel is None or uncancel() == 0

    def close(self) -> None:
        self.timer.cancel()


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


def _settle(future: asyncio.Future, value) -> None:
    if not future.done():
        future.set_result(value)


def _is_loopback(netloc: str) -> bool:
    """Whether ``host[:port]`` (``[v6]:port`` too) names this machine's loopback: localhost, 127.0.0.0/8, ::1."""
    host = (urlparse(f"//{netloc}").hostname or "").lower()
    try:
        return host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def build_app(worker: ServeWorker, options: ServeOptions, sources: frozenset[str] = frozenset()):
    """The aiohttp application: the stream endpoint, /metrics, /healthz and the live page. ``sources``: the
    names of this server's pulled streams and sound cards, which no client may take (held from the start, so
    one that joins late, or a restart, never finds its name in a client's hands)."""
    from aiohttp import WSMsgType, web

    def refusal(request) -> str | None:
        """Why a request may not use the server, or ``None``. With a token: the token. Without one the server is
        on loopback, where any web page the user opens could still reach it (a cross-site WebSocket, or a
        hostile name resolving to 127.0.0.1): only requests addressed to a loopback name, from no page or a
        loopback page, are taken."""
        if options.token is not None:
            scheme, _, credential = request.headers.get("Authorization", "").partition(" ")
            given = request.query.get("token") or (credential.strip() if scheme.lower() == "bearer" else "")
            if not given:
                return "a token is needed: ?token=... or Authorization: Bearer ..."
            if not hmac.compare_digest(given.encode(), options.token.encode()):
                return "wrong token"
            return None
        origin = request.headers.get("Origin")
        if not _is_loopback(request.host) or (origin is not None and not _is_loopback(urlparse(origin).netloc)):
            return LOOPBACK_ONLY
        return None

    def denied(request):
        """The 401/403 answer to a refused HTTP request, or ``None``."""
        reason = refusal(request)
        if reason is None:
            return None
        return web.Response(status=401 if options.token is not None else 403, text=f"{reason}\n")

    async def stream(request):
        ws = web.WebSocketResponse(max_msg_size=options.max_message_bytes + 1, heartbeat=20)  # aiohttp: >= refused
        await ws.prepare(request)
        sockets.add(ws)
        try:
            return await handle(ws, request)
        finally:
            sockets.discard(ws)

    async def handle(ws, request):
        name = request.match_info["name"]
        reason = refusal(request)
        if reason is not None:
            await ws.close(code=CLOSE_UNAUTHORISED, message=reason.encode()[:120])  # a reason: 123 bytes at most
            return ws
        if not valid_name(name):
            await ws.close(code=CLOSE_BAD_REQUEST, message=b"stream names are 1-64 of A-Z a-z 0-9 _ -")
            return ws
        held = worker.connected()
        if name in sources:
            await ws.close(code=CLOSE_NAME_TAKEN, message=f"stream '{name}' is a source of this server".encode())
            return ws
        if name in held or name in joining:
            await ws.close(code=CLOSE_NAME_TAKEN, message=f"stream '{name}' is already connected".encode())
            return ws
        if len(joining | held | sources) >= options.capacity:  # a union: a joined client is in two of them
            await ws.close(code=CLOSE_FULL, message=f"server full ({options.capacity} streams)".encode())
            return ws
        nonlocal post
        if post is None:
            post = _LoopPost(asyncio.get_running_loop())
        outbox: asyncio.Queue = asyncio.Queue()

        refused: list[dict] = []  # the worker refused the join (server full): the client is told and closed

        def listener(message) -> None:  # called on the worker thread
            if message is not None and message.get("type") == "error":
                refused.append(message)
            post(outbox, message)

        async def sender():
            broken = False  # the connection broke under a write (the client killed, its network gone)
            while True:
                message = await outbox.get()
                if message is None:
                    return
                if broken or ws.closed:  # drained unsent to the end: the stream's audio is still tagged and paced
                    continue
                try:
                    await ws.send_str(json.dumps(message))
                    if message.get("type") == "error" and "code" in message:  # a refused join: closed at once
                        await ws.close(code=message["code"], message=message["message"].encode()[:120])
                except ConnectionError:  # ws.closed is not yet set while the transport closes
                    broken = True

        joining.add(name)
        fmt, joined = PcmFormat.raw(16000, "s16le"), False
        send_task = asyncio.create_task(sender())
        reason, code = None, 1000
        pacer: Pacer | None = None
        hello_seen = False
        window_messages, window_samples = 0, 0  # audio messages, and their samples, since the last check
        # a watch of our own: aiohttp's receive(timeout) starts again at every ping, so a client sending only pings
        # would never be idle
        idle = _IdleWatch(options.idle_s)
        try:
            while True:
                msg = await idle.receive(ws.receive())
                if msg is None:
                    reason, code = f"idle for {options.idle_s:g} s", CLOSE_IDLE
                    break
                if refused:
                    reason, code = refused[0]["message"], refused[0]["code"]
                    break
                if msg.type == WSMsgType.TEXT:
                    try:
                        body = json.loads(msg.data)
                    except ValueError:
                        body = None
                    if isinstance(body, dict) and body.get("type") == "eof":
                        break
                    if joined or hello_seen:
                        reason, code = "settings come once, before any audio", CLOSE_BAD_REQUEST
                        break
                    hello_seen = True
                    try:
                        fmt = parse_hello(msg.data)
                    except ConfigError as exc:
                        reason, code = str(exc), CLOSE_BAD_REQUEST
                        break
                elif msg.type == WSMsgType.BINARY:
                    if not joined:
                        worker.submit("join", name, fmt.rate, listener)
                        joined, decode = True, PcmDecoder(fmt)
                        pacer = Pacer(worker, name, fmt.rate, lambda: not send_task.done())
                    samples = _mono(decode(msg.data))
                    if samples.size:  # tagged and counted even when this message is the one that closes it
                        await pacer.submit(samples)
                    window_messages, window_samples = window_messages + 1, window_samples + samples.size
                    if window_messages == options.message_window:  # audio messages only, each counted in
                        if window_samples < window_messages * options.min_message_ms / 1000 * fmt.rate:
                            carried_ms = window_samples / fmt.rate * 1000
                            reason = (
                                f"{window_messages} messages carried {carried_ms:.0f} ms of audio: "
                                f"send at least {options.min_message_ms:g} ms of audio a message"
                            )
                            code = CLOSE_TOO_MANY_MESSAGES
                            break
                        window_messages, window_samples = 0, 0
                else:  # closed, closing or an error (a message over the size limit closes with 1009)
                    reason = "gone"
                    break
        except Exception:  # a fault of ours: this stream ends with 1011, the stream leaves the worker, others go on
            print(f"streamtag serve: {name}: internal error; the stream is closed", file=sys.stderr, flush=True)
            traceback.print_exc()  # a bug: where it is, for the report
            reason, code = "internal error: see the server log", 1011
        finally:
            idle.close()
            joining.discard(name)
        if joined and not refused:
            worker.submit("eof" if reason is None else "gone", name)
            while not send_task.done():  # the summary, then the end; nothing more if the worker has stopped
                alive = worker.is_alive()  # seen before the wait: a dead worker's last messages arrive within it
                await asyncio.wait({send_task}, timeout=0.5)
                if not alive and not send_task.done():
                    send_task.cancel()
                    reason, code = "the server is stopping", 1011
                    break
        else:
            if reason is None and not ws.closed:  # eof before any audio: the summary a client waits for, all 0
                await outbox.put({"type": "summary", "reason": "stream_end", **StreamAccount(fmt.rate).summary()})
            await outbox.put(None)
            await send_task
        if not ws.closed:
            await ws.close(code=code, message=(reason or "done").encode()[:120])
        return ws

    async def healthz(request):
        if not worker.is_alive():
            return web.Response(text="worker stopped\n", status=503)
        try:  # alive is not enough: a worker process that is stuck does not answer
            await worker.ask("ping", timeout=HEALTH_TIMEOUT_S)
        except StreamtagError as exc:
            return web.Response(text=f"{exc}\n", status=503)
        return web.Response(text="ok\n")

    async def prometheus(request):
        if (answer := denied(request)) is not None:
            return answer
        try:
            body = await worker.ask("metrics")
        except StreamtagError as exc:  # a worker process that does not answer: say so, do not hang the scraper
            return web.Response(status=503, text=f"{exc}\n")
        return web.Response(body=body, content_type="text/plain", charset="utf-8")

    async def page(request):
        if (answer := denied(request)) is not None:
            return answer
        return web.Response(text=PAGE.read_text(), content_type="text/html")

    async def state(request):
        if (answer := denied(request)) is not None:
            return answer
        try:
            return web.json_response(await worker.ask("state"))
        except StreamtagError as exc:
            return web.json_response({"error": str(exc)}, status=503)

    async def settings(request):
        """GET: a stream's settings in force; PUT a JSON change (allow, deny, events), applied from the next hop."""
        if (answer := denied(request)) is not None:
            return answer
        name = request.match_info["name"]
        if not valid_name(name):
            return web.json_response({"error": "stream names are 1-64 of A-Z a-z 0-9 _ -"}, status=400)
        change = None
        if request.method == "PUT":
            try:
                change = parse_change(await request.read())
            except ConfigError as exc:
                return web.json_response({"error": str(exc)}, status=400)
        loop = asyncio.get_running_loop()
        answer = loop.create_future()
        worker.submit("settings", name, change, lambda m: loop.call_soon_threadsafe(_settle, answer, m))
        try:
            message = await asyncio.wait_for(answer, timeout=10)
        except asyncio.TimeoutError:
            return web.json_response({"error": "the tagging worker did not answer in 10 s"}, status=503)
        return web.json_response(message, status=400 if "error" in message else 200)

    async def close_all(app) -> None:  # on shutdown: every client is told, none waited for
        for ws in list(sockets):
            await ws.close(code=1001, message=b"server stopping")

    post: _LoopPost | None = None  # made on the first connection, in the running loop
    joining: set[str] = set()  # streams whose client is connected (the worker's accounts add pulled sources)
    sockets: set = set()
    app = web.Application()
    app.on_shutdown.append(close_all)
    app.router.add_get("/v1/streams/{name}", stream)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/v1/state", state)
    app.router.add_get("/v1/streams/{name}/settings", settings)
    app.router.add_put("/v1/streams/{name}/settings", settings)
    app.router.add_get("/metrics", prometheus)
    app.router.add_get("/", page)
    return app
