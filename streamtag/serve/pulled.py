"""Pulled streams for ``serve``: a URL or file decoded by an ``ffmpeg`` child, or a local sound card captured by
a child of our own, each kept going (restarted with backoff when it ends, fails or stalls) and handed to the
worker as one stream that stays joined. Everything here runs on the front's event loop."""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import os
import signal
import sys
from collections.abc import Callable
from urllib.parse import unquote, urlparse

from ..errors import ConfigError
from ..outputs.mqtt import USERINFO
from ..sources.base import downmix
from ..sources.file import AUDIO_SUFFIXES
from ..sources.pipe import PcmDecoder, PcmFormat
from .worker import Pacer, ServeWorker


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
                now = loop.time()
                if down:  # the rest of the gap: from the last try's start (counted then) until audio came
                    down = False
                    worker.submit("source", name, True)
                    worker.source_restarted(name, now - max(last_audio, counted), restarted=False)
                    counted = now
                got_audio, last_audio = True, now
                if failing:
                    failing = False
                    print(f"streamtag serve: {name}: audio again", file=sys.stderr, flush=True)
                samples = downmix(decode(data))
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
