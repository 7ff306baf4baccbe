"""``tag --ray``: an archive tagged by a pool of Ray actors, on one machine or a cluster.

Ray is an optional extra (``pip install '.[ray]'``), imported only here. Each actor
loads the model once and keeps one batched pool of streams; a task is a batch of whole files
(never part of one), so a stream's state never crosses machines, and every actor writes its
files' outputs under ``--out`` itself (on a cluster, a path every node shares). The outputs
are exactly those of a local ``tag``: the same engine runs inside each actor.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import logging
import os
import signal
import socket
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from urllib.parse import urlparse

import numpy as np

from .archive import Item, Outcome, done_marker, marked_since, tag_archive
from .errors import BackendUnavailable, ConfigError, StreamtagError
from .events import check_close_reason
from .steps import Step, StepBlock, as_steps, named_steps


class EnginesLost(StreamtagError):
    """serve --ray has no engine left to step its streams (the cluster, or every actor, is gone)."""


def _ray():
    try:
        import ray
    except ImportError:
        raise BackendUnavailable("--ray needs Ray: pip install '.[ray]' (streamtag's folder)") from None
    return ray


def _start_ray(address: str):
    """Ray, connected: ``auto`` (a Ray running on this machine, else a local one) or a cluster address. An
    address that does not answer is refused at once (Ray itself would retry for minutes), and the signal
    handlers Ray puts in place of ours are put back (its SIGTERM handler exits 1 with a crash dump)."""
    ray = _ray()
    if not address:
        raise ConfigError("--ray needs an address: auto, ray://HOST:10001 or HOST:6379")
    if address != "auto":
        _check_speaks_ray(address, f"--ray {address}")
    elif os.environ.get("RAY_ADDRESS", "auto") not in ("auto", "local"):  # auto connects there: checked alike
        _check_speaks_ray(os.environ["RAY_ADDRESS"], f"--ray auto: RAY_ADDRESS={os.environ['RAY_ADDRESS']}")
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        ray.init(
            address=None if address == "auto" else address,
            include_dashboard=False,
            log_to_driver=False,
            logging_level=logging.ERROR,
            ignore_reinit_error=True,
        )
    except (ConnectionError, RuntimeError, ValueError) as exc:
        if "ray[client]" in str(exc):
            raise ConfigError(
                f"--ray {address}: a cluster is reached through Ray Client: pip install 'ray[client]'"
            ) from None
        hint = ""
        if address != "auto":
            host, port = _host_port(address)
            if address.startswith("ray://") and port == 6379:
                hint = f"; 6379 is a cluster's own port, reached as {host}:6379 (ray:// is Ray Client's, 10001)"
            elif not address.startswith("ray://") and port == 10001:
                hint = f"; 10001 is Ray Client's port, reached as ray://{host}:10001"
            elif not os.environ.get("RAY_AUTH_MODE"):  # auto finds a local cluster's token itself
                hint = (
                    "; a cluster started by `ray start` of Ray 2.59 or later asks for a token: set "
                    "RAY_AUTH_MODE=token (the token from ~/.ray/auth_token or RAY_AUTH_TOKEN)"
                )
        raise ConfigError(f"--ray {address}: cannot connect to Ray there ({str(exc).splitlines()[0]}){hint}") from None
    finally:
        for sig, handler in handlers.items():
            if handler is not None:
                signal.signal(sig, handler)
    return ray


CONNECT_TIMEOUT_S = 5.0  # a cluster address must answer within this


def _host_port(address: str) -> tuple[str, int]:
    """``ray://HOST:PORT`` (Ray Client, port 10001 by default) or ``HOST:PORT`` (a cluster's GCS, 6379)."""
    parsed = urlparse(address if "://" in address else f"gcs://{address}")
    if not parsed.hostname or (parsed.scheme not in ("ray", "gcs")):
        raise ConfigError(f"--ray {address}: give auto, ray://HOST:10001 or HOST:6379")
    try:
        port = parsed.port
    except ValueError:  # 99999, or not a number: said as it is, not replaced by the default port
        raise ConfigError(f"--ray {address}: the port must be a number in 1..65535") from None
    return parsed.hostname, port or (10001 if parsed.scheme == "ray" else 6379)


# An HTTP/2 client preface and an empty SETTINGS frame: a gRPC server (Ray's GCS and its client server are
# gRPC) answers with a SETTINGS frame of its own; an HTTP/1 server, a database or anything else does not.
_HTTP2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + bytes([0, 0, 0, 4, 0, 0, 0, 0, 0])
_SETTINGS_FRAME = 4


def _check_speaks_ray(address: str, where: str) -> None:
    """Refuse at once an address where nothing answers, or where what answers is not Ray's gRPC: ray.init would
    retry for minutes, printing its own logs, and Ctrl-C would not stop it meanwhile."""
    host, port = _host_port(address)
    try:
        conn = socket.create_connection((host, port), timeout=CONNECT_TIMEOUT_S)
    except OSError as exc:
        raise ConfigError(f"{where}: nothing answers at {host}:{port} ({exc.strerror or exc})") from None
    with conn:
        if os.environ.get("RAY_USE_TLS", "0").lower() in ("1", "true"):  # gRPC inside TLS: no plain handshake
            return
        try:
            conn.sendall(_HTTP2_PREFACE)
            head = conn.recv(9)
        except OSError:  # reset, or silent for CONNECT_TIMEOUT_S
            head = b""
    if len(head) < 4 or head[3] != _SETTINGS_FRAME:
        raise ConfigError(
            f"{where}: what answers at {host}:{port} is not Ray (give the head node's GCS port, 6379 by default, "
            "or ray://HOST:10001 for Ray Client)"
        )


class _Tagger:
    """The actor: one loaded model and one pool of streams, reused for every batch it is given."""

    def __init__(self, kwargs: dict) -> None:
        from .backends import one_thread
        from .multistream import MultiStreamTagger

        self.kwargs = kwargs
        backend = kwargs["backend"]
        self.multi = MultiStreamTagger(
            kwargs["model"], backend, capacity=kwargs["width"], events=kwargs["detector"] or True, **one_thread(backend)
        )

    def run(self, batch: list[Item]) -> list[Outcome]:
        return tag_archive(batch, multi=self.multi, **self.kwargs)


class ClusterLost(StreamtagError):
    """The Ray cluster went away mid-run (its head stopped, the network lost): the files finished so far are
    kept, the rest are not finished; a rerun tags them."""

    exit_code = 1


def tag_on_ray(
    items: Sequence[Item],
    address: str,
    actors: int | None = None,
    progress: Callable[[Outcome], None] | None = None,
    **kwargs,
) -> list[Outcome]:
    """:func:`~streamtag.archive.tag_archive` over Ray actors. ``address``: ``auto`` (a Ray already running
    on this machine, else a local one started for the run) or a cluster address (``ray://host:10001``).
    ``actors``: how many (default: one per CPU Ray offers)."""
    if any(item.opener is not None for item in items):
        raise ConfigError("--ray tags files: stdin (-) is tagged locally, without --ray")
    # an actor's working folder is the cluster's, not this one: relative paths sent there found no files, and
    # a relative --out put every output under the cluster's folder while the run said "tagged"
    given = {str(item.path.absolute()): str(item.path) for item in items}
    items = [dataclasses.replace(item, path=item.path.absolute()) for item in items]
    kwargs["out"] = Path(kwargs["out"]).absolute()
    if kwargs.get("model") not in (None, "default"):
        kwargs["model"] = os.path.abspath(kwargs["model"])
    ray = _start_ray(address)
    try:
        n = actors or max(1, int(ray.available_resources().get("CPU", 1)))
        cpus = max(1, int(ray.cluster_resources().get("CPU", 1)))
        if n > cpus:  # an actor takes a CPU: those beyond the cluster's never start, and their batches never end
            print(
                f"streamtag tag: note: --jobs {n} is more than the {cpus} CPU(s) the Ray cluster has; using {cpus}",
                file=sys.stderr,
            )
            n = cpus
        size = max(1, min(kwargs["width"], -(-len(items) // n)))  # every actor gets work, a batch fills a pool
        batches = collections.deque(list(items[i : i + size]) for i in range(0, len(items), size))
        remote = ray.remote(num_cpus=1)(_Tagger)
        idle = [remote.remote(kwargs) for _ in range(min(n, len(batches)) or 1)]
        running: dict = {}  # task -> (actor, batch, tries)
        outcomes: list[Outcome] = []
        begun = time.time()
        link_lost = (ConnectionError, ray.exceptions.RaySystemError)  # waiting or getting: the cluster is gone

        def give(actor, batch, tries: int = 0) -> None:
            running[actor.run.remote(batch)] = (actor, batch, tries)

        while batches or running:
            try:
                while idle and batches:
                    give(idle.pop(), batches.popleft())
                (task,), _ = ray.wait(list(running), num_returns=1)
            except link_lost as exc:  # Ray Client's link, or the GCS, gone
                raise ClusterLost(f"the Ray cluster was lost ({_first_line(exc)})") from None
            actor, batch, tries = running.pop(task)
            try:
                done = ray.get(task)
            except ray.exceptions.RayActorError as exc:  # the actor died (out of memory, killed): its batch goes
                if tries == 0:  # once more to a new actor (the files it finished are skipped by their markers)
                    give(remote.remote(kwargs), batch, tries + 1)
                    continue
                done = _failed(batch, f"the Ray actor tagging it died twice ({_first_line(exc)})")
                actor = remote.remote(kwargs) if batches else None  # a new one only for work still to give
            except link_lost as exc:
                raise ClusterLost(f"the Ray cluster was lost ({_first_line(exc)})") from None
            except ray.exceptions.RayError as exc:  # the task failed (a disk full): its files fail, the rest go on
                done = _failed(batch, f"the Ray task tagging it failed ({_first_line(exc)})")
            if actor is not None:
                idle.append(actor)
            for outcome in done:
                if tries and outcome.skipped:  # finished in this run by the actor that died: tagged, not skipped
                    marker = done_marker(Path(kwargs["out"]), Item(Path(outcome.path), outcome.name))
                    outcome.skipped = not marked_since(marker, begun)
                outcome.path = given.get(outcome.path, outcome.path)  # in the summary as given, as a local run
                outcomes.append(outcome)
                if progress is not None:
                    progress(outcome)
        return outcomes
    finally:
        ray.shutdown()


def _failed(batch: Sequence[Item], why: str) -> list[Outcome]:
    return [Outcome(item.name, str(item.path), error=why, worker_lost=True) for item in batch]


def _first_line(exc: BaseException) -> str:
    lines = [line for line in str(exc).splitlines() if line.strip()]
    return f"{type(exc).__name__}: {lines[0] if lines else ''}"[:300]


# -- serve --ray: the streams' engines on Ray actors ------------------------------------------------------------

SEND_SECONDS = 0.1  # audio goes to an engine in chunks of at least this much (never one hop per call)
SNAPSHOT_SECONDS = 2.0  # an engine sends each stream's state back this often (stream time)
VIRTUAL_NODES = 64  # points per engine on the hash ring: streams spread evenly, and few move when one is lost


class _EngineActor:
    """A Ray actor: one :class:`~streamtag.multistream.MultiStreamTagger` for its share of the streams.

    :meth:`run` takes the commands gathered since the last call, in order, steps every hop they completed
    and returns compact blocks ``(name, first frame, probs (k, classes), {row: events})`` (``k`` 0 for the
    events a leave or a settings change closed), each stream's level, and a snapshot of each stream that has
    gone :data:`SNAPSHOT_SECONDS` without one."""

    def __init__(self, model, capacity: int) -> None:
        from .multistream import MultiStreamTagger

        self.multi = MultiStreamTagger(model, capacity=capacity)
        self.every = round(SNAPSHOT_SECONDS / self.multi.frame_seconds)
        self.snapped: dict[str, int] = {}

    def run(self, commands: list) -> tuple[list, dict[str, float], dict[str, dict]]:
        out = []
        levels: dict[str, float] = {}
        for command in commands:
            kind, name = command[0], command[1]
            if kind == "join":
                self.multi.join(name, sample_rate=command[2], events=command[3])
                if command[4] is not None:
                    self.multi.restore(name, command[4])
                self.snapped[name] = self.multi.streams[name].frames
            elif kind == "audio":
                self.multi.feed(name, command[2])
            elif kind == "events":  # the audio before it is stepped first, however the commands were grouped
                out += list(self.multi.step_blocks())
                out += [(name, s) for s in self.multi.streams[name].set_events(command[2])]
            elif kind == "reset":  # as events: the audio before it is stepped first
                out += list(self.multi.step_blocks())
                out += [(name, s) for s in self.multi.streams[name].reset(command[2])]
            elif kind == "skip":  # the same: the time moves on after the audio before it
                out += list(self.multi.step_blocks())
                self.multi.skip(name, command[2])
            elif kind == "leave":  # its level too: a stream that joins, sends and leaves within one call has one
                engine = self.multi.streams[name]
                out += [(name, s) for s in self.multi.leave(name, command[2])]
                levels[name] = engine.stats.recent_dbfs
                del self.snapped[name]
        out += list(self.multi.step_blocks())
        snapshots = {}
        for name, engine in self.multi.streams.items():
            levels[name] = engine.stats.recent_dbfs
            if engine.frames - self.snapped[name] >= self.every:
                snapshots[name] = self.multi.snapshot(name)
                self.snapped[name] = engine.frames
        return [_compact(name, item) for name, item in out], levels, snapshots


def _compact(name: str, item: StepBlock | Step) -> tuple[str, int, np.ndarray, dict[int, list]]:
    """What travels back from an engine: a block as it is; a step as a block of its one row, or of none for
    the events a leave or a settings change closed."""
    if isinstance(item, StepBlock):
        return name, item.first_frame, item.probs, item.events
    rows = item.probs[None] if item.has_scores else np.zeros((0, len(item.labels)), np.float32)
    return name, item.frame_index, rows, ({0: item.events} if item.events else {})


class _Stats:
    recent_dbfs = float("-inf")


class _RemoteStream:
    """The front's view of one stream on an engine: what :class:`~streamtag.serve.worker.ServeWorker` asks of an
    engine, and what it takes to move the stream: its last snapshot and every command sent since."""

    def __init__(self, pool: RayEnginePool, name: str, rate: int, model_rate: int, events) -> None:
        self.pool, self.name = pool, name
        self.rate, self.model_rate = rate, model_rate
        self.events = events  # the detector it joined with
        self.stats = _Stats()
        self.buffered: list[np.ndarray] = []
        self.buffered_samples = 0
        self.in_flight = 0  # samples sent whose steps have not come back
        self.snapshot: dict | None = None
        self.log: list[tuple[int, tuple]] = []  # (call, command) sent since the snapshot
        self.last_frame = -1  # the last hop handed out: a replay after a move repeats none
        self.seen: collections.deque = collections.deque(maxlen=64)  # events handed out lately

    @property
    def pending_samples(self) -> int:
        return int((self.buffered_samples + self.in_flight) * self.model_rate / self.rate)

    def set_events(self, events) -> list:
        """New event settings, after the audio already given; the events they close come back through the
        pool's next steps."""
        self.pool._flush(self)
        self.pool._send(self.name, ("events", self.name, events))
        return []

    def reset(self, reason: str = "reset") -> list:
        """Forget the past after the audio already given (a pulled source's gap); the events it closes come back
        through the pool's next steps."""
        self.pool._flush(self)
        self.pool._send(self.name, ("reset", self.name, reason))
        return []


class RayEnginePool:
    """``serve --ray``: the streams spread over ``engines`` Ray actors by a consistent hash of their names,
    each actor a batched pool; the same calls as :class:`~streamtag.multistream.MultiStreamTagger`, so the
    serve worker drives either. Audio moves in chunks of :data:`SEND_SECONDS` or more.

    An engine that dies is dropped from the ring and each of its streams moves to the engine the ring now
    names: it joins with its last snapshot (at most :data:`SNAPSHOT_SECONDS` old) and every command sent
    since is sent again, so it goes on exactly where it was (a resampled stream restarts its resampler's
    filter: soxr's state does not travel); the hops and events already handed out are not handed out
    twice. Nothing is lost but time (:attr:`moved` counts the moves)."""

    def __init__(self, model, address: str, engines: int, capacity: int) -> None:
        from .modelfile import load_config, resolve_model_dir

        ray = self._ray = _start_ray(address)
        self.config = cfg = load_config(resolve_model_dir(model))
        self.labels, self.frame_seconds = cfg.labels, cfg.features.frame_seconds
        self.model_rate = cfg.features.sample_rate
        self.backend = self  # capture() reads backend.config
        remote = ray.remote(num_cpus=1, max_restarts=0)(_EngineActor)
        self.actors = {i: remote.remote(model, capacity) for i in range(engines)}
        self.ring = sorted((_hash(f"engine-{i}-{v}"), i) for i in range(engines) for v in range(VIRTUAL_NODES))
        self.streams: dict[str, _RemoteStream] = {}
        self.placement: dict[str, int] = {}
        self.queued: dict[int, list] = {i: [] for i in self.actors}  # commands not yet sent, per engine
        self.calls: list[tuple[object, int, int, dict[str, int]]] = []  # (ref, id, engine, samples per stream)
        self.ready: list[tuple[str, StepBlock | Step]] = []  # blocks and steps back, not handed out yet
        self.moved = 0
        self.behind = False  # as MultiStreamTagger's: an engine always steps all it holds
        self.left_out = 0
        self.waiting = 0  # for ServeWorker's wait before a round: the engines do not wait for it
        self._ids = 0

    # -- what ServeWorker calls -----------------------------------------------------------------------------
    def engine_of(self, name: str) -> int:
        """The engine a stream belongs to: the first point on the ring at or after its name's hash."""
        point = _hash(name)
        return next((engine for p, engine in self.ring if p >= point), self.ring[0][1])

    def join(self, name: str, sample_rate: int | None = None, events=None) -> _RemoteStream:
        if name in self.streams:
            raise ConfigError(f"stream '{name}' has already joined")
        stream = _RemoteStream(self, name, int(sample_rate or self.model_rate), self.model_rate, events)
        self.streams[name] = stream
        self.placement[name] = engine = self.engine_of(name)
        self.queued[engine].append(("join", name, stream.rate, events, None))
        return stream

    def feed(self, name: str, samples: np.ndarray) -> None:
        stream = self.streams[name]
        stream.buffered.append(np.asarray(samples, dtype=np.float32))
        stream.buffered_samples += len(samples)
        if stream.buffered_samples >= SEND_SECONDS * stream.rate:
            self._flush(stream)

    def step(self) -> list[tuple[str, Step]]:
        return list(named_steps(self.step_blocks()))

    def step_blocks(
        self, max_hops: int | None = None, max_streams: int | None = None
    ) -> list[tuple[str, StepBlock | Step]]:
        """What the engines have stepped since the last call, as blocks (and event-only steps). ``max_hops`` and
        ``max_streams`` are for a pool in this process: each engine steps what it was sent, in its own process."""
        busy = {c[2] for c in self.calls}
        for engine, commands in list(self.queued.items()):
            if commands and engine not in busy:  # one call in flight per engine keeps each one's order
                self._call(engine)
        if self.calls:
            done, _ = self._ray.wait([c[0] for c in self.calls], num_returns=len(self.calls), timeout=0.02)
            for call in [c for c in self.calls if c[0] in done]:
                self._collect(call)
        ready, self.ready = self.ready, []
        return ready

    def reset(self, name: str, reason: str = "reset") -> list[Step]:
        """As :meth:`MultiStreamTagger.reset`: the engine steps what it was sent first; the steps come back
        through the next :meth:`step_blocks`."""
        check_close_reason(reason)  # here, not in an actor mid-command
        return self.streams[name].reset(reason)

    def skip(self, name: str, seconds: float) -> None:
        """As :meth:`MultiStreamTagger.skip`, after the audio already given."""
        self._flush(self.streams[name])
        self._send(name, ("skip", name, seconds))

    def leave(self, name: str, reason: str = "stream_end") -> list[Step]:
        """Send what the stream still holds and its leave, and wait for its engine to answer (following the
        stream if that engine dies meanwhile); returns the stream's last steps."""
        check_close_reason(reason)  # here, not in an actor mid-command
        self._flush(self.streams[name])
        self._send(name, ("leave", name, reason))
        while True:
            engine = self.placement[name]
            calls = [c for c in self.calls if c[2] == engine]
            if calls:
                for call in calls:
                    self._collect(call)
            elif self.queued.get(engine):
                self._call(engine)
            else:
                break
        mine = as_steps(s for n, s in self.ready if n == name)
        self.ready = [(n, s) for n, s in self.ready if n != name]
        del self.streams[name], self.placement[name]
        return mine

    def close(self) -> None:
        self._ray.shutdown()

    # -- internals --------------------------------------------------------------------------------------------
    def _flush(self, stream: _RemoteStream) -> None:
        if stream.buffered_samples:
            samples = np.concatenate(stream.buffered)
            stream.buffered, stream.buffered_samples = [], 0
            self._send(stream.name, ("audio", stream.name, samples))

    def _send(self, name: str, command) -> None:
        self.queued[self.placement[name]].append(command)

    def _call(self, engine: int) -> None:
        commands, self.queued[engine] = self.queued[engine], []
        self._ids += 1
        sent: dict[str, int] = {}
        for c in commands:
            stream = self.streams.get(c[1])
            if stream is None:
                continue
            if c[0] != "join":
                stream.log.append((self._ids, c))
            if c[0] == "audio":
                sent[c[1]] = sent.get(c[1], 0) + len(c[2])
                stream.in_flight += len(c[2])
        self.calls.append((self.actors[engine].run.remote(commands), self._ids, engine, sent))

    def _collect(self, call) -> None:
        ref, call_id, engine, sent = call
        self.calls.remove(call)
        for name, n in sent.items():
            if name in self.streams:
                self.streams[name].in_flight -= n
        try:
            steps, levels, snapshots = self._ray.get(ref)
        except self._ray.exceptions.RayActorError:
            self._engine_lost(engine)
            return
        for name, snapshot in snapshots.items():  # it holds everything up to this call: the log restarts here
            stream = self.streams.get(name)
            if stream is not None:
                stream.snapshot = snapshot
                stream.log = [(i, c) for i, c in stream.log if i > call_id]
        for name, level in levels.items():
            if name in self.streams:
                self.streams[name].stats.recent_dbfs = level
        fs = self.frame_seconds
        for name, first, probs, events in steps:
            stream = self.streams.get(name)
            if stream is not None:
                if len(probs):
                    skip = max(0, stream.last_frame + 1 - first)  # rows handed out before the stream moved
                    if skip >= len(probs):
                        continue
                    first, probs = first + skip, probs[skip:]
                    events = {i - skip: e for i, e in events.items() if i >= skip}
                    stream.last_frame = first + len(probs) - 1
                fresh = {}
                for i, row in sorted(events.items()):
                    keys = [(e.kind, e.label, e.onset, e.reason) for e in row]
                    row = [e for e, k in zip(row, keys) if k not in stream.seen]
                    stream.seen.extend(keys)
                    if row:
                        fresh[i] = row
                events = fresh
                if not (len(probs) or events):
                    continue
            if len(probs):
                self.ready.append((name, StepBlock(first, probs, events, self.labels, fs)))
            else:
                empty = np.zeros(0, np.float32)
                self.ready.append((name, Step(first, (first + 1) * fs, empty, events.get(0, []), self.labels, fs)))

    def _engine_lost(self, engine: int) -> None:
        """Drop a dead engine from the ring; each of its streams joins the engine the ring names now, with its
        last snapshot, and everything sent since goes again, then what was still waiting to be sent."""
        self.actors.pop(engine, None)
        self.ring = [(p, e) for p, e in self.ring if e != engine]
        if not self.ring:
            raise EnginesLost("every Ray engine of serve --ray is gone")
        for call in [c for c in self.calls if c[2] == engine]:
            self.calls.remove(call)
            for name, n in call[3].items():
                if name in self.streams:
                    self.streams[name].in_flight -= n
        waiting = self.queued.pop(engine, [])
        moving = [n for n in self.streams if self.placement.get(n) == engine]
        print(
            f"streamtag serve: a Ray engine is gone; {len(moving)} stream(s) move to the {len(set(self.actors))} left",
            file=sys.stderr,
            flush=True,
        )
        for name, stream in self.streams.items():
            if self.placement.get(name) != engine:
                continue
            self.placement[name] = target = self.engine_of(name)
            replay = [c for _, c in stream.log] + [c for c in waiting if c[1] == name and c[0] != "join"]
            stream.log = []
            self.queued[target] += [("join", name, stream.rate, stream.events, stream.snapshot), *replay]
            self.moved += 1


def _hash(text: str) -> int:
    """A hash that is the same in every process (Python's own is salted per process)."""
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "big")
