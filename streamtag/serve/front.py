"""The network front of ``serve``: an aiohttp application on one asyncio loop. WebSocket streams in (their
format and close codes: :mod:`.protocol`), JSON back, settings over HTTP, ``/metrics``, ``/healthz`` and the
live page. It never steps a model: audio goes to the worker through a :class:`~.worker.Pacer`, and what the
worker hands back is posted into each connection's outbox (:class:`_LoopPost`, many messages per wakeup).
"""

from __future__ import annotations

import asyncio
import collections
import hmac
import ipaddress
import json
import sys
import threading
import traceback
from collections.abc import Awaitable
from pathlib import Path
from urllib.parse import urlparse

from ..errors import ConfigError, StreamtagError
from ..sources.base import downmix
from ..sources.pipe import PcmDecoder, PcmFormat
from .config import parse_change, valid_name
from .protocol import (
    CLOSE_BAD_REQUEST,
    CLOSE_FULL,
    CLOSE_IDLE,
    CLOSE_NAME_TAKEN,
    CLOSE_STALLED,
    CLOSE_TOO_MANY_MESSAGES,
    CLOSE_UNAUTHORISED,
    parse_hello,
)
from .worker import Pacer, ServeOptions, ServeWorker, StreamAccount

PAGE = Path(__file__).parent.parent / "assets" / "serve_page.html"

LOOPBACK_ONLY = "without --token: requests to 127.0.0.1 or localhost, from no page or a local one (proxies: --token)"
HEALTH_TIMEOUT_S = 2.0  # /healthz: the worker must answer within this
STOP_CLOSE_S = 5.0  # at a stop, a client that has not taken its close frame by then is cut


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


def _cut_later_if_stuck(transport: asyncio.Transport | None, after_s: float) -> None:
    """A closed connection whose transport still holds bytes waits for a flush that a client that reads nothing
    never allows: cut it if they are still there ``after_s`` from now."""
    if transport is not None and transport.get_write_buffer_size():
        asyncio.get_running_loop().call_later(after_s, _cut_if_stuck, transport)


def _cut_if_stuck(transport: asyncio.Transport) -> None:
    if transport.get_write_buffer_size():  # still unwritten: the client reads nothing
        transport.abort()


def settle(future: asyncio.Future, value) -> None:
    """Answer a request's future, unless it was answered (or given up on) already."""
    if not future.done():
        future.set_result(value)


def _is_loopback(netloc: str) -> bool:
    """Whether ``host[:port]`` (``[v6]:port`` too) names this machine's loopback: localhost, 127.0.0.0/8, ::1."""
    host = (urlparse(f"//{netloc}").hostname or "").lower()
    try:
        return host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _stream_socket(web):
    """aiohttp's WebSocket response, except that a closed one stays closed: aiohttp 3.14 arms the heartbeat again
    when a client's close frame (or any late data) comes after the close, and its timer held the whole connection
    (request, transport, buffers: about 12 KB) for 30 s more; at a few hundred joins a second that was 100 MB."""

    class StreamSocket(web.WebSocketResponse):
        def _reset_heartbeat(self) -> None:
            if not self.closed:
                super()._reset_heartbeat()

    return StreamSocket


def build_app(worker: ServeWorker, options: ServeOptions, sources: frozenset[str] = frozenset()):
    """The aiohttp application: the stream endpoint, /metrics, /healthz and the live page. ``sources``: the
    names of this server's pulled streams and sound cards, which no client may take (held from the start, so
    one that joins late, or a restart, never finds its name in a client's hands)."""
    from aiohttp import WSMsgType, web

    stream_socket = _stream_socket(web)

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
        ws = stream_socket(max_msg_size=options.max_message_bytes + 1, heartbeat=20)  # aiohttp: >= refused
        await ws.prepare(request)
        sockets[ws] = request
        try:
            return await handle(ws, request)
        finally:
            sockets.pop(ws, None)

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
        if name in held or name in claimed:
            await ws.close(code=CLOSE_NAME_TAKEN, message=f"stream '{name}' is already connected".encode())
            return ws
        if len(claimed | held | sources) >= options.capacity:  # a union: a joined client is in two of them
            await ws.close(code=CLOSE_FULL, message=f"server full ({options.capacity} streams)".encode())
            return ws
        # the name is this connection's until it has ended: the worker may not have said it joined (a process's
        # word comes after its round), and another client let in meanwhile had its audio added to this stream
        claimed.add(name)
        try:
            return await serve_stream(ws, request, name)
        finally:
            claimed.discard(name)

    async def serve_stream(ws, request, name: str):
        """One client's stream, from its first message to its close; its name is claimed throughout."""
        nonlocal post
        if post is None:
            post = _LoopPost(asyncio.get_running_loop())
        outbox: asyncio.Queue = asyncio.Queue()

        refused: list[dict] = []  # the worker refused the join (server full): the client is told and closed

        def listener(message) -> None:  # called on the worker thread
            if message is not None and message.get("type") == "error":
                refused.append(message)
            post(outbox, message)

        writing_since: list[float] = []  # when the write going on began: a client that does not read stops it

        def not_reading() -> bool:
            return bool(writing_since) and loop.time() - writing_since[0] > options.stall_s

        async def sender():
            broken = False  # the connection broke under a write (the client killed, its network gone)
            while True:
                message = await outbox.get()
                if message is None:
                    return
                if broken or ws.closed:  # drained unsent to the end: the stream's audio is still tagged and paced
                    continue
                writing_since.append(loop.time())
                try:
                    await ws.send_str(json.dumps(message))
                    if message.get("type") == "error" and "code" in message:  # a refused join: closed at once
                        await ws.close(code=message["code"], message=message["message"].encode()[:120])
                except ConnectionError:  # ws.closed is not yet set while the transport closes
                    broken = True
                finally:
                    writing_since.clear()  # a broken write is no client that does not read

        loop = asyncio.get_running_loop()
        transport = request.transport  # taken now: aiohttp lets go of it once it has closed the connection
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
                if not_reading():  # its messages would pile up here without end
                    reason, code = (
                        f"not reading: nothing sent could be written for {options.stall_s:g} s",
                        CLOSE_STALLED,
                    )
                    break
                if msg.type == WSMsgType.TEXT:
                    try:
                        body = json.loads(msg.data)
                    except ValueError:
                        body = None
                    if isinstance(body, dict) and body.get("type") == "eof":
                        break
                    if joined or hello_seen:
                        once = 'after audio only {"type": "eof"} may come' if joined else "settings come once"
                        reason, code = f"{once} (the format message comes first, once)", CLOSE_BAD_REQUEST
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
                    samples = downmix(decode(msg.data))
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
        if joined and not refused:
            cut = decode.ended_short("the stream", "check format and channels")  # said in its summary
            worker.submit("eof" if reason is None else "gone", name, cut)
            while not send_task.done():  # the summary, then the end; nothing more if the worker has stopped
                alive = worker.is_alive()  # seen before the wait: a dead worker's last messages arrive within it
                await asyncio.wait({send_task}, timeout=0.5)
                if not alive and not send_task.done():
                    send_task.cancel()
                    reason, code = "the server is stopping", 1011
                    break
                if not_reading():  # the summary cannot be written: the client is cut off, its stream has ended
                    send_task.cancel()
                    reason, code = reason or "not reading", CLOSE_STALLED
                    break
        else:
            if reason is None and not ws.closed:  # eof before any audio: the summary a client waits for, all 0
                await outbox.put({"type": "summary", "reason": "stream_end", **StreamAccount(fmt.rate).summary()})
            await outbox.put(None)
            await send_task
        if code == CLOSE_STALLED and transport is not None:
            transport.abort()  # its close frame could not be written either: the connection is cut
        elif not ws.closed:
            await close_or_cut(ws, request, code, reason or "done")
        else:  # closed by aiohttp itself (a missed heartbeat), maybe with bytes it cannot write
            _cut_later_if_stuck(transport, options.stall_s)
        return ws

    async def close_or_cut(ws, request, code: int, reason: str, wait_s: float | None = None) -> None:
        """Close ``ws`` with ``code`` and ``reason``. A client that does not read cannot take the close frame
        either: waiting on it held a server's stop for ever, and closing its transport waits to flush what it
        holds, so a connection with unwritten bytes ``stall_s`` later is cut."""
        transport = request.transport  # taken first: aiohttp lets go of it as it closes
        try:
            await asyncio.wait_for(ws.close(code=code, message=reason.encode()[:120]), wait_s or options.stall_s)
        except asyncio.TimeoutError:  # the close frame was not taken in all that time
            if transport is not None:
                transport.abort()
            return
        except ConnectionError:
            pass
        except asyncio.CancelledError:  # the connection was lost under the close (aiohttp cancels its wait)
            task = asyncio.current_task()
            if task is not None and getattr(task, "cancelling", lambda: 0)():  # this task's own cancel: passed on
                raise
        _cut_later_if_stuck(transport, options.stall_s)

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
        worker.submit("settings", name, change, lambda m: loop.call_soon_threadsafe(settle, answer, m))
        try:
            message = await asyncio.wait_for(answer, timeout=10)
        except asyncio.TimeoutError:
            return web.json_response({"error": "the tagging worker did not answer in 10 s"}, status=503)
        return web.json_response(message, status=400 if "error" in message else 200)

    async def close_all(app) -> None:  # on shutdown: every client is told at once; one that does not read is cut
        wait_s = min(options.stall_s, STOP_CLOSE_S)  # a stop waits on no client for long
        await asyncio.gather(
            *(close_or_cut(ws, request, 1001, "server stopping", wait_s) for ws, request in sockets.items())
        )

    post: _LoopPost | None = None  # made on the first connection, in the running loop
    claimed: set[str] = set()  # streams whose client is connected (the worker's accounts add pulled sources)
    sockets: dict = {}  # every open WebSocket -> its request (its transport, to cut it)
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
