"""``streamtag serve``: remote streams over WebSocket, events to clients, MQTT/Home Assistant and a web page."""

from __future__ import annotations

import gc
import ipaddress
import os
import shutil
import signal
import sys
from pathlib import Path

from ..errors import ConfigError
from ..serve.config import valid_name
from .run import ray_address


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "serve",
        help="tag many remote streams: WebSocket in; events to clients, MQTT and Home Assistant; a live page",
        description="Serve many streams through one batched worker. Clients stream PCM over WebSocket to "
        "ws://HOST:PORT/v1/streams/NAME and get scores and events back; --mqtt also publishes events, per-label "
        "ON/OFF states and Home Assistant discovery. /metrics (Prometheus), /healthz and a live page at /. "
        "Binds 127.0.0.1 by default; any other address needs --token. Ctrl-C or SIGTERM closes every open "
        "event (published), sets states OFF and availability offline, and exits.",
    )
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8750, help="port (default 8750; 0 picks a free one)")
    p.add_argument("--token", help="required from clients (?token= or Authorization: Bearer); needed off loopback")
    p.add_argument(
        "--mqtt",
        metavar="URL",
        help="publish events and states to this broker: mqtt://[USER[:PASSWORD]@]HOST[:PORT], mqtts:// for TLS; "
        "the password may come from $STREAMTAG_MQTT_PASSWORD instead (the command line is visible to local users)",
    )
    p.add_argument("--mqtt-prefix", help="with --mqtt: the topic prefix (default streamtag)")
    p.add_argument(
        "--discovery-prefix",
        help="with --mqtt: Home Assistant's discovery prefix, as set in its MQTT integration (default homeassistant)",
    )
    p.add_argument("--model", metavar="DIR", help="model folder (default: the bundled model)")
    p.add_argument("--max-streams", type=int, default=256, help="streams at once (default 256)")
    p.add_argument("--rate", type=float, default=10.0, help="score messages per second to each client (default 10)")
    p.add_argument("--idle-seconds", type=float, default=30.0, help="close a client silent this long (default 30)")
    p.add_argument(
        "--stall-seconds",
        type=float,
        default=10.0,
        help="cut off a client that reads nothing the server sends for this long (default 10)",
    )
    p.add_argument(
        "--config",
        metavar="FILE",
        help="serve.toml: per-stream labels (allow/deny) and event settings, and streams to pull (url = ... "
        "through ffmpeg, device = ... a sound card by name); a commented example is streamtag/assets/examples/"
        "serve.toml. Settings change at run time too: PUT /v1/streams/NAME/settings or MQTT PREFIX/NAME/set",
    )
    p.add_argument(
        "--event-config",
        metavar="FILE",
        help="event thresholds per class (TOML or JSON; default: the model's events.toml)",
    )
    p.add_argument(
        "--on-threshold",
        type=float,
        help="score that starts an event, for every class (default: the model's per-class thresholds)",
    )
    p.add_argument(
        "--pull",
        action="append",
        default=[],
        metavar="NAME=URL",
        help="also tag a source ffmpeg reads (rtsp://camera/stream, an HTTP stream, a file) as stream NAME; "
        "restarted with backoff when it drops (repeat for several)",
    )
    p.add_argument(
        "--ray",
        metavar="ADDRESS",
        type=ray_address,
        help="run the streams' engines on Ray (the ray extra, pip install '.[ray]'): auto (a Ray running here, else a "
        "local one) or a cluster address; each stream goes to one engine by a hash of its name",
    )
    p.add_argument("--engines", type=int, default=None, help="with --ray: engine actors (default 2)")
    p.add_argument(
        "--one-process",
        action="store_true",
        help="run the tagging worker as a thread of the server's process, not a process of its own: less memory "
        "(one model loaded, not two interpreters), but the network and the model then share one core's worth of "
        "Python, which limits it to about half the streams",
    )
    p.add_argument("--port-file", metavar="PATH", help="write the bound port here once listening (for scripts)")
    p.set_defaults(handler=run)


def _check(args) -> None:
    if not 0 <= args.port <= 65535:
        raise ConfigError(f"--port must be in 0..65535 ({args.port} given)")
    if not 1 <= args.max_streams <= 100_000:
        raise ConfigError(f"--max-streams must be in 1..100000 ({args.max_streams} given)")
    if not 0 < args.rate <= 100:
        raise ConfigError(f"--rate must be in (0, 100] updates per second ({args.rate} given)")
    if not 1 <= args.idle_seconds <= 86400:
        raise ConfigError(f"--idle-seconds must be in 1..86400 ({args.idle_seconds} given)")
    if not 0.5 <= args.stall_seconds <= 3600:
        raise ConfigError(f"--stall-seconds must be in 0.5..3600 ({args.stall_seconds} given)")
    try:
        loopback = args.host == "localhost" or ipaddress.ip_address(args.host).is_loopback
    except ValueError:
        loopback = False
    for item in args.pull:
        name, _, url = item.partition("=")
        if not url or not valid_name(name):
            raise ConfigError(f"--pull {item!r}: give NAME=URL, NAME 1-64 of A-Z a-z 0-9 _ -")
    if len({item.partition("=")[0] for item in args.pull}) < len(args.pull):
        raise ConfigError("--pull: two sources have the same NAME")
    if args.one_process and args.ray:  # with --ray the worker is a thread of this process already
        raise ConfigError("--one-process is what --ray does already (its engines are Ray's): give one of them")
    if args.engines is not None and not args.ray:
        raise ConfigError("--engines sets the Ray engine actors: give it with --ray auto (or a cluster address)")
    args.engines = 2 if args.engines is None else args.engines
    if not 1 <= args.engines <= 1024:
        raise ConfigError(f"--engines must be in 1..1024 ({args.engines} given)")
    if args.port_file:
        from ..outputs.files import check_output_path

        check_output_path(args.port_file, "--port-file")  # a folder that is missing or takes no file: before work
    if args.token is not None and (not args.token.strip() or args.token.strip() != args.token):
        what = "is empty" if not args.token.strip() else "begins or ends with whitespace"
        raise ConfigError(  # no client could send it (a Bearer header is stripped): refused, not a server nobody uses
            f'--token {what}: give a secret of visible characters (an unset variable in --token "$TOKEN" '
            "gives an empty one)"
        )
    if not loopback and not args.token:
        raise ConfigError(f"--host {args.host} is reachable from other machines: add --token SECRET (clients send it)")
    for flag, value, default in (
        ("--mqtt-prefix", args.mqtt_prefix, "streamtag"),
        ("--discovery-prefix", args.discovery_prefix, "homeassistant"),
    ):
        if value is not None and not args.mqtt:
            raise ConfigError(f"{flag} names MQTT topics: give it with --mqtt mqtt://HOST[:PORT]")
        if value is None:
            setattr(args, flag[2:].replace("-", "_"), default)
        elif args.mqtt:
            from ..outputs.mqtt import check_prefix

            check_prefix(value, flag)


def _sources(args, config) -> list:
    """The config file's pulled streams and sound cards, then --pull's; names must differ."""
    from ..serve.config import PulledSource
    from ..serve.pulled import local_path

    sources = list(config.sources)
    where = {s.name: f"--config {config.path}: [streams.{s.name}] url" for s in sources}  # for an error about one
    for item in args.pull:
        name, url = item.split("=", 1)
        sources.append(PulledSource(name, url=url))
        where.setdefault(name, f"--pull {name}")
    names = [s.name for s in sources]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise ConfigError(f"stream '{twice[0]}' is pulled twice (--config and --pull): give each source its own name")
    if any(s.url for s in sources) and not shutil.which("ffmpeg"):
        raise ConfigError("pulled streams (url = ... or --pull) need ffmpeg on the PATH (apt-get install ffmpeg)")
    for source in sources:  # a file that is not there, or not audio, fails now, not as a silent retry loop later
        path = local_path(source.url) if source.url else None
        if path is None:
            continue
        if not os.path.exists(path) or os.path.isdir(path):
            what = f"{path!r} is a folder, not a file" if os.path.isdir(path) else f"no such file {path!r}"
            raise ConfigError(f"{where[source.name]}: {what} (give a file, or a URL such as rtsp://...)")
        if not os.path.isfile(path):  # a named pipe or a device: reading a probe from it would take its audio
            continue
        problem = _not_audio(path)
        if problem:
            raise ConfigError(f"{where[source.name]}: ffmpeg finds no audio to read in {path!r} ({problem})")
    return sources


def _not_audio(path: str) -> str | None:
    """Why ffmpeg cannot decode audio from a local file (its last error line), or ``None``: a tenth of a second
    decoded, which takes a few tens of ms."""
    import subprocess

    command = [shutil.which("ffmpeg"), "-nostdin", "-v", "error", "-i", path, "-vn", "-t", "0.1"]
    command += ["-ac", "1", "-ar", "16000", "-f", "s16le", "-"]
    try:
        done = subprocess.run(command, capture_output=True, timeout=30)
    except subprocess.TimeoutExpired:
        return None  # a slow disk: the source says more when it runs
    stderr = done.stderr.decode(errors="replace")
    if "does not contain any stream" in stderr:
        return "it has no audio track"
    if done.returncode == 0:
        return None if done.stdout else "the file holds 0 samples"
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    return lines[-1].replace(path, "<file>") if lines else f"ffmpeg exit code {done.returncode}"


def run(args) -> int:  # the network stack is imported here, not at the top: every other command starts without it
    from ..modelfile import load_config, resolve_model_dir
    from ..outputs.mqtt import check_labels, parse_broker
    from ..serve.config import ServeConfig, SettingsBook, read_serve_config
    from ..serve.process import ServeParts
    from ..serve.worker import ServeOptions
    from .run import detector_factory, event_tables

    _check(args)
    cfg = load_config(resolve_model_dir(args.model))
    config = read_serve_config(args.config, cfg.labels) if args.config else ServeConfig()
    sources = _sources(args, config)
    if len(sources) > args.max_streams:  # each takes a slot for good: the extra ones would never be tagged
        raise ConfigError(
            f"{len(sources)} pulled streams and sound cards, more than --max-streams {args.max_streams}: "
            f"raise --max-streams to at least {len(sources)}"
        )

    if args.mqtt:
        parse_broker(args.mqtt)
        check_labels(cfg.labels, f"model {args.model}" if args.model else "the bundled model")
    import aiohttp  # noqa: F401  (missing: one line naming the extra)
    import prometheus_client  # noqa: F401

    detectors = detector_factory(args.model, args.event_config, args.on_threshold)  # checks --event-config
    base = event_tables(args.model, args.event_config, args.on_threshold)
    book = SettingsBook(cfg.labels, cfg.features.frame_seconds, base, config)
    options = ServeOptions(
        capacity=args.max_streams,
        rate=args.rate,
        idle_s=args.idle_seconds,
        stall_s=args.stall_seconds,
        token=args.token,
    )
    parts = ServeParts(
        args.model, args.max_streams, detectors, book, options, args.mqtt, args.mqtt_prefix, args.discovery_prefix
    )
    _check_can_listen(args.host, args.port)  # before MQTT: a second server must not say the first one is offline
    mqtt_child = None
    if args.mqtt:  # publishing in a process of its own: a burst of joins (117 messages each) never holds up tagging
        from ..outputs.mqtt_process import MqttProcess

        mqtt_child = MqttProcess(args.mqtt, cfg.labels, args.mqtt_prefix, args.discovery_prefix)
        parts.mqtt_link = mqtt_child.link
    try:
        return _start_and_serve(args, parts, options, sources, mqtt_child)
    finally:
        if mqtt_child is not None:  # offline said and flushed once the worker's last calls are made
            mqtt_child.close()


def _start_and_serve(args, parts, options, sources, mqtt_child) -> int:
    from ..serve.process import WorkerProcess, build_worker, close_worker
    from ..serve.worker import ServeWorker

    if mqtt_child is not None:
        mqtt_child.start()
    if args.ray:  # the engines run elsewhere already: the worker stays a thread of this process
        from ..distributed import RayEnginePool

        multi = RayEnginePool(args.model, args.ray, args.engines, capacity=args.max_streams)
        worker = build_worker(parts, multi)
    elif args.one_process:
        worker = build_worker(parts)
    else:
        worker = WorkerProcess(parts)
    worker.start()
    try:
        return _run(_serve(args, worker, options, sources))
    finally:
        worker.stop()
        worker.join(timeout=10)
        if isinstance(worker, ServeWorker):
            close_worker(worker)


def _run(main):
    """The front's event loop: uvloop's when it is installed (the serve extra brings it on Linux and macOS).
    Measured with benchmarks/serve.py at 200 streams, it takes about a fifth less of the front thread's CPU
    than asyncio's, and that thread shares the GIL with the tagging worker."""
    import asyncio

    try:
        import uvloop
    except ImportError:
        return asyncio.run(main)
    return uvloop.run(main)


async def _serve(args, worker, options, sources) -> int:
    import asyncio

    from aiohttp import web

    from ..serve.front import build_app

    worker.attach(asyncio.get_running_loop())
    gc.freeze()  # the imports and the model live as long as the process: a full collection need not walk them
    app = build_app(worker, options, frozenset(s.name for s in sources))
    runner = web.AppRunner(app, handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, args.host, args.port)
    try:
        await site.start()
    except OSError as exc:
        await runner.cleanup()
        raise _cannot_listen(args.host, args.port, exc) from None
    port = site._server.sockets[0].getsockname()[1]
    netloc = _netloc(args.host, port)
    print(
        f"streamtag serve: listening on http://{netloc}/ (streams: ws://{netloc}/v1/streams/NAME)",
        file=sys.stderr,
        flush=True,
    )
    if args.port_file:
        try:
            Path(args.port_file).write_text(f"{port}\n")
        except OSError as exc:
            await runner.cleanup()
            raise ConfigError(f"--port-file {args.port_file}: cannot write it ({exc.strerror or exc})") from None
    stop = asyncio.Event()
    got = {}
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, lambda s=sig: (got.setdefault("signal", s), stop.set()))
    from ..serve.pulled import capture, pull

    pulls = [
        asyncio.create_task(pull(s.name, s.url, worker, stop) if s.url else capture(s.name, s.device, worker, stop))
        for s in sources
    ]

    async def watch_worker() -> None:
        while not stop.is_set():
            if not worker.is_alive():
                got["failed"] = True
                stop.set()
            await asyncio.sleep(0.5)

    watcher = asyncio.create_task(watch_worker())
    await stop.wait()
    await watcher
    for task in pulls:
        await task
    print("streamtag serve: stopping: closing open events and streams", file=sys.stderr, flush=True)
    worker.stop()  # every stream leaves: open events close (reason interrupted), published
    await asyncio.get_running_loop().run_in_executor(None, worker.join, 10)
    await runner.cleanup()
    if got.get("failed"):
        return 1
    return 130 if got.get("signal") == signal.SIGINT else 0


def _check_can_listen(host: str, port: int) -> None:
    """Refuse a port taken (another server running) before anything is started or published: a second server
    that connected to MQTT first said the running one's streams were offline, and left them so."""
    import socket

    if port == 0:  # any free port: taken when listening
        return
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        with socket.socket(family, kind, proto) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the server's own socket is made
            probe.bind(address)
    except OSError as exc:
        raise _cannot_listen(host, port, exc) from None


def _cannot_listen(host: str, port: int, exc: OSError) -> ConfigError:
    return ConfigError(f"cannot listen on {_netloc(host, port)} ({exc.strerror or exc})")


def _netloc(host: str, port: int) -> str:
    """``host:port`` as a URL has it: an IPv6 address in brackets (``[::1]:8750``)."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
