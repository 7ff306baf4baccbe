"""The serve worker's MQTT publisher in a process of its own, so publishing never holds up tagging.

A stream's join publishes 117 retained messages (a discovery config and an ``OFF`` state per label, the
level sensor's config, its availability and settings): about 1.7 ms of Python in paho's ``publish``, and paho's network
thread then takes Python's lock to write them. In the worker's process, 500 clients joining in the same
second held every stream's scores for over a second (``benchmarks/serve.py --mqtt``). Here the worker's
calls are kept as they come and sent after each round in one message down a pipe; a child process runs the real
:class:`~streamtag.outputs.mqtt.MqttPublisher` and makes them in order. Settings changes that arrive over
MQTT come back up the same pipe to the worker, and its reply goes down again.
"""

from __future__ import annotations

import collections
import contextlib
import itertools
import multiprocessing
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

from ..errors import BackendUnavailable
from ..events import Event

NICE = 10  # the child's priority below the server's: on a busy machine MQTT waits, not the scores
CLOSE_TIMEOUT_S = 10.0  # the child says offline and flushes (2 s at most), then disconnects
CONNECT_WAIT_S = 5.0  # calls wait this long at most for the first connection to the broker


class MqttProcess:
    """The child process that publishes; the server's front starts it and waits for it at the end. The worker,
    in this process or a child of its own, holds :attr:`link` (a worker process cannot start one: it is a
    daemon, and a daemon's children would outlive their parent)."""

    def __init__(
        self, url: str, labels: Sequence[str], prefix: str = "streamtag", discovery_prefix: str = "homeassistant"
    ) -> None:
        try:
            import paho.mqtt.client  # noqa: F401  (said here, in one line, rather than in the child)
        except ImportError:
            raise BackendUnavailable("--mqtt needs paho-mqtt: pip install '.[serve]' (streamtag's folder)") from None
        context = multiprocessing.get_context("spawn")  # no copy of this process's threads
        ours, child_end = context.Pipe()
        counts = context.Array("q", 2)  # published, dropped: written by the child
        self.process = context.Process(
            target=_child_main,
            args=(child_end, counts, url, list(labels), prefix, discovery_prefix),
            name="streamtag-mqtt",
            daemon=True,
        )
        self.link = MqttLink(ours, counts)

    def start(self) -> None:
        self.process.start()

    def close(self) -> None:
        """After the worker has ended (it sent its last calls and a close): wait for the child to say offline,
        flush and disconnect; a worker that died without its close gets one from here."""
        if self.process.pid is None:  # never started (the server failed first)
            return
        self.link.close()
        self.process.join(CLOSE_TIMEOUT_S)
        if self.process.is_alive():
            self.process.kill()
            self.process.join(1)


class MqttLink:
    """What the worker holds in place of an :class:`~streamtag.outputs.mqtt.MqttPublisher`: the same calls, kept
    as they come and sent by :meth:`flush` (the worker calls it after every round) in one message to the
    :class:`MqttProcess`. ``published`` and ``dropped`` are the child's counts as of its last batch. Picklable
    when a worker process is started, so the worker's child gets it."""

    def __init__(self, conn, counts) -> None:
        self._conn, self._counts = conn, counts
        self._setup()

    def _setup(self) -> None:
        self._calls: list[tuple] = []
        self._lock = threading.Lock()  # the calls: the worker thread keeps them, settings replies come from it too
        self._gone = False
        # flushed batches, for the sender thread: a child busy with a burst of joins stops reading for a while, the
        # pipe fills, and a send from the worker's thread would wait for it (seconds, with hundreds of joins)
        self._outbox: collections.deque = collections.deque()
        self._ready = threading.Condition(self._lock)
        self._sender: threading.Thread | None = None
        # (stream, change, reply) -> applies a settings change; set by serve to hand it to its worker
        self.on_settings: Callable[[str, Any, Callable[[dict], None]], None] | None = None

    def __getstate__(self) -> dict:
        return {"conn": self._conn, "counts": self._counts}

    def __setstate__(self, state: dict) -> None:
        self._conn, self._counts = state["conn"], state["counts"]
        self._setup()

    def start(self) -> None:
        """Start sending, and reading the settings changes that come over MQTT (where the worker runs)."""
        threading.Thread(target=self._read, name="streamtag-mqtt-reader", daemon=True).start()
        self._sender = threading.Thread(target=self._send, name="streamtag-mqtt-sender", daemon=True)
        self._sender.start()

    # -- the publisher's calls ------------------------------------------------------------------------------
    def stream_joined(self, stream: str, enabled: Sequence[bool] | None = None) -> None:
        self._keep("stream_joined", stream, enabled)

    def labels_changed(self, stream: str, enabled: Sequence[bool] | None) -> None:
        self._keep("labels_changed", stream, enabled)

    def stream_available(self, stream: str, up: bool) -> None:
        self._keep("stream_available", stream, up)

    def stream_left(self, stream: str) -> None:
        self._keep("stream_left", stream)

    def settings(self, stream: str, settings: dict) -> None:
        self._keep("settings", stream, settings)

    def settings_forgotten(self, stream: str) -> None:
        self._keep("settings_forgotten", stream)

    def event(self, stream: str, event: Event) -> None:
        self._keep("event", stream, event)

    def level(self, stream: str, dbfs: float) -> None:
        self._keep("level", stream, dbfs)

    @property
    def published(self) -> int:
        return self._counts[0]

    @property
    def dropped(self) -> int:
        return self._counts[1]

    # -- the pipe -------------------------------------------------------------------------------------------
    def _keep(self, *call) -> None:
        with self._lock:
            self._calls.append(call)

    def flush(self) -> None:
        """Hand the calls kept since the last flush to the sender, as one message; never waits for the child."""
        with self._lock:
            calls, self._calls = self._calls, []
            if calls and not self._gone:
                self._outbox.append(calls)
                self._ready.notify()
            if self._sender is None:  # not started (the front's own link, at the end): sent from here
                self._drain()

    def close(self) -> None:
        """Send what is kept and a close: the child says offline, flushes and disconnects. Waits until the
        sender has handed everything to the pipe."""
        self._keep("close")
        self.flush()
        sender = self._sender
        if sender is not None:
            with self._lock:
                self._outbox.append(None)  # the sender's last
                self._ready.notify()
            sender.join(CLOSE_TIMEOUT_S)

    def _send(self) -> None:
        with self._lock:
            while True:
                while not self._outbox:
                    self._ready.wait()
                if self._outbox[0] is None:
                    return
                self._drain()

    def _drain(self) -> None:
        """Send the batches waiting (called holding the lock; the pipe's write is made without it)."""
        while self._outbox and self._outbox[0] is not None:
            calls = self._outbox.popleft()
            if self._gone:
                continue
            self._lock.release()
            try:
                self._conn.send(calls)
            except OSError:  # the child is gone (or has closed): tagging goes on without MQTT
                if not self._gone and calls[-1] != ("close",):
                    print(
                        "streamtag serve: the MQTT process ended; tagging goes on without MQTT (restart the "
                        "server to publish again)",
                        file=sys.stderr,
                        flush=True,
                    )
                self._gone = True
            finally:
                self._lock.acquire()

    def _read(self) -> None:
        """The child's messages: settings changes that came over MQTT, each answered through the pipe."""
        while True:
            try:
                kind, stream, change, request = self._conn.recv()
            except (EOFError, OSError):
                return
            if kind == "settings" and self.on_settings is not None:
                self.on_settings(stream, change, lambda reply, request=request: self._keep("reply", request, reply))


def _child_main(conn, counts, url: str, labels: list[str], prefix: str, discovery_prefix: str) -> None:
    from .mqtt import MqttPublisher

    # Ctrl-C and SIGTERM reach the whole process group: the server decides, and its close comes down the pipe
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    with contextlib.suppress(OSError, AttributeError):  # a burst of joins' discovery waits for the cores, not tagging
        os.nice(NICE)
    publisher = MqttPublisher(url, labels, prefix=prefix, discovery_prefix=discovery_prefix)
    replies: dict[int, Callable[[dict], None]] = {}
    ids = itertools.count()
    sending = threading.Lock()  # paho's thread asks (settings), this one never sends

    def on_settings(stream: str, change: Any, reply: Callable[[dict], None]) -> None:  # on paho's thread
        request = next(ids)
        replies[request] = reply
        with sending:
            conn.send(("settings", stream, change, request))

    publisher.on_settings = on_settings
    publisher.start()
    # the server's first streams join as it starts (pulled sources at once): their discovery and states wait
    # for the broker's first answer rather than being dropped as sent to no connection
    deadline = time.monotonic() + CONNECT_WAIT_S
    while not publisher.client.is_connected() and not publisher._said_down and time.monotonic() < deadline:
        time.sleep(0.01)
    try:
        while True:
            try:
                calls = conn.recv()
            except (EOFError, OSError):  # the server is gone without a close: the last will says offline
                return
            for name, *args in calls:
                if name == "close":
                    publisher.close()
                    return
                if name == "reply":
                    reply = replies.pop(args[0], None)
                    if reply is not None:
                        reply(args[1])
                else:
                    getattr(publisher, name)(*args)
            counts[0], counts[1] = publisher.published, publisher.dropped
    finally:
        counts[0], counts[1] = publisher.published, publisher.dropped
