"""The serve worker in a process of its own, so the network front and the tagging worker each get a core.

In one process the front (asyncio, aiohttp) and the worker thread take turns at Python's lock: at a few
hundred streams each waits for the other and latency grows long before either is short of a core
(``benchmarks/serve.py``). Here the worker, with the model, the metrics and MQTT, runs in a child process
and the front talks to it through two pipes, in batches both ways: down, every command and piece of audio
that arrived since the last send; up, everything a round produced (clients' messages, how far each stream
is stepped, joins and leaves) in one message. :class:`WorkerProcess` is what the front holds; it answers
the calls of :class:`~streamtag.serve.worker.ServeWorker` the front makes, so the front does not know which one
it has.
"""

from __future__ import annotations

import collections
import dataclasses
import gc
import itertools
import multiprocessing
import os
import pickle
import select
import signal
import struct
import sys
import threading
import time
from collections.abc import Callable

import numpy as np

from ..errors import StreamtagError
from .front import settle
from .worker import Metrics, ServeOptions, ServeWorker

START_TIMEOUT_S = 120.0  # loading the model in the child; a slow disk or a cold import cache takes seconds
PIPE_BYTES = 1 << 20  # each way: a round's audio at hundreds of streams fits, so neither side waits on a write
ASK_TIMEOUT_S = 10.0  # /metrics and /v1/state wait this long for a busy worker, then answer 503
OFF_LOOP_WRITE_S = 5.0
_GONE = object()  # the answer to a question the worker will not answer: it has ended
FLUSH_S = 0.003  # within a round, what is ready goes to the front at least this often
_HEADER = struct.Struct("!I")


def _frame(obj) -> bytes:
    """One pickled object, length first: what :class:`_Frames` reads back."""
    data = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
    return _HEADER.pack(len(data)) + data


def _write_frame(fd: int, obj) -> None:
    """:func:`_frame` written whole (blocking): the worker's side."""
    view = memoryview(_frame(obj))
    while view:
        view = view[os.write(fd, view) :]


class _Frames:
    """The objects :func:`_write_frame` wrote, from bytes as they come: the front reads the child's pipe
    without blocking, on its event loop (which makes the descriptor non-blocking), so a message may come
    in parts."""

    def __init__(self) -> None:
        self.buffer = bytearray()

    def feed(self, data: bytes) -> list:
        self.buffer += data
        objects, start = [], 0
        while len(self.buffer) - start >= _HEADER.size:
            (size,) = _HEADER.unpack_from(self.buffer, start)
            if len(self.buffer) - start - _HEADER.size < size:
                break
            start += _HEADER.size
            objects.append(pickle.loads(self.buffer[start : start + size]))
            start += size
        del self.buffer[:start]
        return objects


def _widen(conn) -> None:
    """A larger pipe buffer (Linux); elsewhere the default, and a writer waits sooner."""
    try:
        import fcntl

        fcntl.fcntl(conn.fileno(), fcntl.F_SETPIPE_SZ, PIPE_BYTES)
    except (ImportError, AttributeError, OSError):
        pass


@dataclasses.dataclass
class ServeParts:
    """What a worker is built from; picklable, so a child process builds its own."""

    model: str | None
    capacity: int
    detectors: Callable | None  # one EventDetector per stream (cli.run.detector_factory)
    book: object | None  # config.SettingsBook
    options: ServeOptions
    mqtt: str | None = None  # broker URL
    mqtt_prefix: str = "streamtag"
    discovery_prefix: str = "homeassistant"  # Home Assistant's MQTT discovery prefix (its MQTT integration's option)
    # the link to an MQTT process the front started (outputs.mqtt_process.MqttProcess): the worker's MQTT calls
    # go to it; without one, to a publisher in the worker's own process
    mqtt_link: object | None = None


def build_worker(parts: ServeParts, multi=None, worker_class: type[ServeWorker] = ServeWorker) -> ServeWorker:
    """The worker with its engines (``multi``, else local ones), metrics and MQTT publisher (started)."""
    from ..multistream import MultiStreamTagger
    from ..outputs.mqtt import MqttPublisher

    if multi is None:
        multi = MultiStreamTagger(parts.model, capacity=parts.capacity, events=parts.detectors)
    mqtt = parts.mqtt_link
    if mqtt is None and parts.mqtt:
        mqtt = MqttPublisher(
            parts.mqtt, multi.labels, prefix=parts.mqtt_prefix, discovery_prefix=parts.discovery_prefix
        )
    worker = worker_class(multi, parts.options, mqtt, book=parts.book)
    worker.metrics = Metrics(lambda: worker.accounts, mqtt)
    if mqtt is not None:
        mqtt.on_settings = lambda name, change, reply: worker.submit("settings", name, change, reply)
        mqtt.start()
    return worker


def close_worker(worker: ServeWorker) -> None:
    """After the worker thread ended: availability offline, MQTT flushed, remote engines let go."""
    if worker.mqtt is not None:
        worker.mqtt.close()
    close = getattr(worker.multi, "close", None)
    if close is not None:
        close()


# -- the child ------------------------------------------------------------------------------------------------
class _ChildWorker(ServeWorker):
    """The worker of the child process. It reads the front's batches itself, between rounds (no reader thread:
    a hand-over between two threads waits for Python's lock), and sends what a round produced in one message
    at its end. Commands from its own threads (MQTT's settings) come through the inbox as before."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.commands = None  # the front's batches come in here (a pipe's read end, in _frame's frames)
        self.results = None  # and what the rounds produce goes out through this one
        self._frames = _Frames()
        self._commands: collections.deque = collections.deque()  # the rest of the last batch from the front
        self._out: list = []  # ("msg", client id, message), ("reply", id, value), ("joined" | "left", name), ...
        self._stepped: set[str] = set()
        self._sent_at = 0.0

    def next_command(self, timeout: float):
        if self._commands:
            return self._commands.popleft()
        own = super().next_command(0)
        if own is not None:
            return own
        # MQTT's settings wait in the inbox for at most this wait (50 ms idle, a round's time when busy)
        fd = self.commands.fileno()
        try:
            wait = max(timeout, 0.0)
            for _ in range(16):  # all that is there already, so the round that follows has it
                if not select.select([fd], [], [], wait)[0]:
                    break
                data = os.read(fd, PIPE_BYTES)
                if not data:
                    raise EOFError
                for batch in self._frames.feed(data):
                    self._take(batch)
                wait = 0.0
        except (EOFError, OSError):  # the front is gone: nobody to tag for
            self.stop()
            return None
        return self._commands.popleft() if self._commands else None

    def _take(self, batch: list) -> None:
        for command in batch:
            kind = command[0]
            if kind == "join":
                _, name, rate, client = command
                self._commands.append(("join", name, rate, self._to_front("msg", client)))
            elif kind == "settings":
                _, name, change, request = command
                self._commands.append(("settings", name, change, self._to_front("reply", request)))
            elif kind == "audio":  # float32 bytes, stamped on arrival by the front
                _, name, data, arrived = command
                self._commands.append(("audio", name, np.frombuffer(data, np.float32), arrived))
            else:  # eof, gone, and ask, restarted, stop: in their order with the rest (a state asked for after a
                self._commands.append(command)  # join shows the stream)

    def _to_front(self, kind: str, key: int) -> Callable:
        """A client's listener (``msg``, by client id) or a question's reply (``reply``, by request id)."""
        return lambda value: self._out.append((kind, key, value))

    def send(self, batch: list) -> None:
        try:
            _write_frame(self.results.fileno(), batch)
        except OSError:  # the front is gone
            self.stop()

    def _handle(self, command) -> None:
        kind = command[0]
        if kind == "ask":
            _, request, what = command
            self._out.append(("reply", request, self.answer(what)))
        elif kind == "restarted":
            self.source_restarted(*command[1:])
        elif kind == "stop":
            self.stop()
        else:
            super()._handle(command)
            if kind == "join":  # taken (a refused join raised above)
                self._out.append(("joined", command[1]))

    def _leave(self, name: str, reason: str) -> None:
        held = name in self.accounts
        super()._leave(name, reason)
        if held:
            self._out.append(("left", name))
            self._stepped.discard(name)

    def _deliver(self, name, item) -> None:
        self._stepped.add(name)
        super()._deliver(name, item)
        if time.perf_counter() - self._sent_at > FLUSH_S:  # a long round: the streams stepped so far go now
            self._send_out()

    def round_done(self) -> None:
        self._send_out()

    def _send_out(self) -> None:
        """What is ready for the front, in one message: the clients' messages, replies, joins and leaves, and how
        far each stream stepped since the last one."""
        self._sent_at = time.perf_counter()
        if self._stepped:
            self._out.append(("stepped", {name: self.stepped_samples(name) for name in self._stepped}))
            self._stepped.clear()
        if self._out:
            batch, self._out = self._out, []
            self.send(batch)


def _child_main(commands, results, parts: ServeParts) -> None:
    # Ctrl-C and systemd's SIGTERM reach the whole process group: the front decides, and sends "stop"
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    try:
        worker = build_worker(parts, worker_class=_ChildWorker)
    except StreamtagError as exc:
        _write_frame(results.fileno(), [("error", str(exc))])
        return
    except Exception as exc:  # a bug: the traceback goes to stderr, the front says it in one line
        _write_frame(results.fileno(), [("error", f"the tagging worker did not start: {exc!r}")])
        raise
    worker.commands, worker.results = commands, results
    gc.freeze()  # what startup made lives as long as the process: full collections need not walk it again
    worker.send([("ready", worker.frame_seconds, worker.model_rate)])
    worker.start()
    worker.join()
    close_worker(worker)
    worker.send([("exit", worker.failure)])


# -- the front's side -----------------------------------------------------------------------------------------
class WorkerProcess:
    """The front's handle on a worker in a child process: :meth:`submit`, :meth:`stepped_samples`,
    :meth:`connected`, :meth:`ask`, :meth:`stop`, :meth:`join` as :class:`~streamtag.serve.worker.ServeWorker`.
    The pipe is read and written on the front's event loop (:meth:`attach`): what the loop's callbacks
    submit in one pass goes down in one message."""

    def __init__(self, parts: ServeParts) -> None:
        self.options = parts.options
        context = multiprocessing.get_context("spawn")  # not fork: the front may already run threads
        child_commands, self._commands = context.Pipe(duplex=False)  # two pipes: (reader, writer) each
        self._results, child_results = context.Pipe(duplex=False)
        for conn in (self._commands, self._results):
            _widen(conn)
        os.set_blocking(self._commands.fileno(), False)  # the front's loop writes it: see _write_out
        self.process = context.Process(
            target=_child_main, args=(child_commands, child_results, parts), name="streamtag-serve-worker", daemon=True
        )
        self.process.start()
        child_commands.close()
        child_results.close()
        self._frames = _Frames()
        self.failure: str | None = None
        self.frame_seconds, self.model_rate = self._wait_ready()
        self._ids = itertools.count()
        self._listeners: dict[int, Callable] = {}  # client id -> the listener its join came with
        self._replies: dict[int, Callable] = {}
        self._held: set[str] = set()  # streams the worker holds, as it last said
        self._stepped: dict[str, int] = {}
        self._lock = threading.Lock()  # the pending commands, submitted from the loop and from sound cards
        self._pending: list = []
        self._loop, self._loop_thread = None, None
        self._ended = threading.Event()  # the child said its last word, or is gone
        self._exited = False  # it said its last word
        # framed commands the pipe has not taken yet, a frame each: one bytearray grown at the end and cut at the
        # front copied all of it at every append, megabytes a time once the worker fell behind
        self._out: collections.deque[memoryview] = collections.deque()
        self._writing = False  # the loop is waiting for the pipe to take them

    def _wait_ready(self) -> tuple[float, int]:
        deadline = time.monotonic() + START_TIMEOUT_S
        fd, batches = self._results.fileno(), []
        while not batches:
            if not select.select([fd], [], [], max(deadline - time.monotonic(), 0.0))[0]:
                self.process.kill()
                raise StreamtagError(f"the tagging worker did not start in {START_TIMEOUT_S:g} s")
            data = os.read(fd, 1 << 16)
            if not data:
                self.process.join(5)
                raise StreamtagError(f"the tagging worker ended as it started (exit code {self.process.exitcode})")
            batches = self._frames.feed(data)
        (first,) = batches[0]
        if first[0] == "error":
            self.process.join(5)
            raise StreamtagError(first[1])
        return first[1], first[2]

    # -- as ServeWorker ------------------------------------------------------------------------------------
    def start(self) -> None:
        pass  # the child runs since __init__; the pipe is served once the loop is attached

    def attach(self, loop) -> None:
        self._loop, self._loop_thread = loop, threading.get_ident()  # called on the loop's thread
        loop.add_reader(self._results.fileno(), self._readable)

    def submit(self, *command) -> None:
        kind = command[0]
        if kind == "audio":  # stamped on arrival, as ServeWorker does: the latency metric counts the hand-over
            # as bytes: pickling a numpy array costs 10 us, its bytes 0.1 (thousands of pieces a second)
            command = ("audio", command[1], command[2].astype(np.float32, copy=False).tobytes(), time.perf_counter())
        elif kind == "join":
            _, name, rate, listener = command
            client = next(self._ids)
            self._listeners[client] = listener
            command = ("join", name, rate, client)
        elif kind == "settings":
            _, name, change, reply = command
            request = next(self._ids)
            self._replies[request] = lambda value: reply(
                {"error": "the tagging worker stopped"} if value is _GONE else value
            )
            command = ("settings", name, change, request)
        with self._lock:
            self._pending.append(command)
            first = len(self._pending) == 1
        if not first:
            return  # a flush is scheduled
        loop = self._loop
        if loop is None or loop.is_closed():  # before the loop runs, or after: at once
            self._flush()
        elif threading.get_ident() == self._loop_thread:
            loop.call_soon(self._flush)  # after the callbacks of this pass: their commands go too
        else:
            loop.call_soon_threadsafe(self._flush)

    async def ask(self, what: str, timeout: float = ASK_TIMEOUT_S):
        import asyncio

        if not self.is_alive():
            raise StreamtagError("the tagging worker stopped")
        loop = asyncio.get_running_loop()
        answer = loop.create_future()
        request = next(self._ids)
        self._replies[request] = lambda value: settle(answer, value)
        self.submit("ask", request, what)
        try:
            value = await asyncio.wait_for(answer, timeout=timeout)
        except asyncio.TimeoutError:
            raise StreamtagError(f"the tagging worker did not answer in {timeout:g} s") from None
        finally:
            self._replies.pop(request, None)
        if value is _GONE:
            raise StreamtagError("the tagging worker stopped")
        return value

    def source_restarted(self, name: str, gap_seconds: float, restarted: bool = True) -> None:
        self.submit("restarted", name, gap_seconds, restarted)

    def stepped_samples(self, name: str) -> int:
        return self._stepped.get(name, 0)

    def connected(self) -> set[str]:
        return set(self._held)

    def is_alive(self) -> bool:
        return not self._ended.is_set() and self.process.is_alive()

    def stop(self) -> None:
        self.submit("stop")
        loop = self._loop
        if loop is None or loop.is_closed() or not loop.is_running():  # a flush scheduled there would never run
            self._flush()

    def join(self, timeout: float | None = None) -> None:
        """Until the child has said its last word (the loop reads it) or, with no loop running, has ended."""
        loop = self._loop
        if loop is not None and loop.is_running():
            self._ended.wait(timeout)
        self.process.join(timeout=timeout)
        if self.process.is_alive():
            self.process.kill()

    # -- the pipe --------------------------------------------------------------------------------------------
    def _flush(self) -> None:
        with self._lock:
            batch, self._pending = self._pending, []
        if not batch or self._ended.is_set():
            return
        self._out.append(memoryview(_frame(batch)))
        self._write_out()

    def _write_out(self) -> None:
        """What the pipe takes now. On the loop, never more: the rest waits for the pipe to be writable, since the
        child may itself be waiting to write to us (a round's results) and reads only between rounds. With no
        loop (before it runs, after it ended) a few seconds' wait for a stuck child at most."""
        fd, loop = self._commands.fileno(), self._loop
        on_loop = loop is not None and loop.is_running() and threading.get_ident() == self._loop_thread
        deadline = time.monotonic() + (0.0 if on_loop else OFF_LOOP_WRITE_S)
        try:
            while self._out:
                try:
                    head = self._out[0]
                    taken = os.write(fd, head)
                    if taken == len(head):
                        self._out.popleft()
                    else:
                        self._out[0] = head[taken:]
                except BlockingIOError:
                    if on_loop:
                        if not self._writing:
                            loop.add_writer(fd, self._write_out)
                            self._writing = True
                        return
                    if not select.select([], [fd], [], max(deadline - time.monotonic(), 0.0))[1]:
                        return  # the child takes nothing: join() ends it
        except OSError:  # the child is gone; the reader sees it too
            self._out.clear()
        if self._writing and not loop.is_closed():
            loop.remove_writer(fd)
        self._writing = False

    def _readable(self) -> None:
        try:
            data = os.read(self._results.fileno(), PIPE_BYTES)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        for batch in self._frames.feed(data):
            for item in batch:
                self._take(item)
        if not data:  # the child is gone
            self._loop.remove_reader(self._results.fileno())
            if not self._exited:  # it ended without its last word: killed, or out of memory
                self.process.join(1)
                self.failure = f"the tagging worker process ended (exit code {self.process.exitcode})"
                print(f"streamtag serve: error: {self.failure}", file=sys.stderr, flush=True)
            self._ended.set()
            for listener in self._listeners.values():  # no more messages: every client may close
                listener(None)
            self._listeners.clear()
            for reply in list(self._replies.values()):  # nor answers
                reply(_GONE)
            self._replies.clear()

    def _take(self, item) -> None:
        kind = item[0]
        if kind == "msg":
            _, client, message = item
            listener = self._listeners.get(client)
            if listener is not None:
                listener(message)
                if message is None:
                    del self._listeners[client]
        elif kind == "stepped":
            self._stepped.update(item[1])
        elif kind == "joined":
            self._held.add(item[1])
        elif kind == "left":
            self._held.discard(item[1])
            self._stepped.pop(item[1], None)
        elif kind == "reply":
            reply = self._replies.pop(item[1], None)
            if reply is not None:
                reply(item[2])
        elif kind == "exit":
            self.failure, self._exited = item[1], True
