"""``streamtag live`` and ``streamtag replay``: one pipeline, two sources."""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import re
import signal
import stat
import sys
from collections.abc import Callable

from ..backends import BACKENDS, make_backend, one_thread
from ..engine import MAX_GAIN_DB
from ..errors import ConfigError
from ..events import (
    EventDetector,
    EventParams,
    build_event_settings,
    model_event_table,
    read_event_table,
)
from ..modelfile import load_config, resolve_model_dir
from ..outputs import ClassSelection, EventsJsonl, LiveView, PlainLines, ScoresTsv, UpdatesJsonl
from ..outputs.files import Rotation, check_output_folder, check_output_path
from ..outputs.plots import check_plot_path
from ..outputs.selection import split_class_names
from ..worker import MAX_BUFFER_SECONDS, Worker


def number(low: float, high: float = math.inf, low_ok: bool = False, hint: str = "") -> Callable[[str], float]:
    """argparse ``type=``: a finite float above ``low`` (or equal with ``low_ok``) and at most ``high``.

    Anything else is a usage error (exit 2) that argparse prefixes with the flag, e.g.
    ``argument --rate: must be a finite number > 0 (nan given)``.
    """
    above = f"{'>=' if low_ok else '>'} {low:g}"
    allowed = above if high == math.inf else f"in {'[' if low_ok else '('}{low:g}, {high:g}]"

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            value = math.nan
        if not (math.isfinite(value) and (low <= value if low_ok else low < value) and value <= high):
            raise argparse.ArgumentTypeError(f"must be a finite number {allowed} ({text} given){hint}")
        return value

    return parse


def ray_address(text: str) -> str:
    """argparse ``type=`` for ``--ray``: not empty (``--ray "$ADDR"`` with the variable unset ran locally)."""
    if not text.strip():
        raise argparse.ArgumentTypeError("needs an address: auto, ray://HOST:10001 or HOST:6379")
    return text.strip()


def torch_device(text: str) -> str:
    """argparse ``type=`` for ``--torch-device``: cpu, cuda or cuda:N."""
    if not re.fullmatch(r"cpu|cuda(:\d+)?", text):
        raise argparse.ArgumentTypeError(f"must be cpu, cuda or cuda:N ({text} given)")
    return text


def add_model_options(p: argparse.ArgumentParser, backend: bool = True) -> None:
    p.add_argument(
        "--model",
        metavar="DIR",
        help="model folder (config.json + model.safetensors); default: the bundled model",
    )
    if backend:
        p.add_argument(
            "--backend",
            choices=sorted(BACKENDS),
            default="onnx",
            help="inference runtime: onnx (fast CPU, default) or torch (reference; --torch-device cuda)",
        )
        p.add_argument(
            "--torch-device",
            type=torch_device,
            metavar="DEV",
            help="with --backend torch: cpu (default), cuda or cuda:N",
        )


def _add_common(p: argparse.ArgumentParser) -> None:
    add_model_options(p)
    out = p.add_argument_group("output")
    out.add_argument(
        "--rate",
        type=number(0),
        default=None,  # 10; None tells an option given from one left out (see _check_view_options)
        metavar="HZ",
        help="updates shown per second, at most one per hop (100 for 10 ms hops); every hop is computed; default 10",
    )
    out.add_argument("--max-results", type=int, default=None, metavar="K", help="top-k classes shown (default 3)")
    out.add_argument(
        "--score-threshold",
        type=number(0, 1, low_ok=True),
        default=None,
        metavar="P",
        help="hide classes below P (default 0: show the top K whatever their score)",
    )
    for flag, what in (
        ("--allow", "show and open events for only these classes"),
        ("--deny", "never show these classes or open their events"),
    ):
        out.add_argument(
            flag, action="append", metavar="CLASS[,CLASS]", help=f"{what} (comma-separated, or repeat {flag})"
        )
    out.add_argument("--jsonl", metavar="PATH", help="write one JSON object per update")
    out.add_argument(
        "--all",
        action="store_true",
        help="with --jsonl: every class's probability (those --allow/--deny leave in), not the top-k",
    )
    out.add_argument("--events", metavar="PATH", help="write events as JSONL (an open line, then a close line)")
    out.add_argument("--scores", metavar="PATH", help="write every frame's scores as a sed_scores_eval TSV")
    out.add_argument(
        "--rotate",
        type=_rotation,
        metavar="AGE|SIZE",
        help="start fresh --jsonl/--events/--scores files every AGE (30m, 1h, 1d) or SIZE (100MB); "
        "the old one is kept with its start time in its name, and a file from an earlier run is kept too",
    )
    out.add_argument(
        "--save-clips",
        metavar="DIR",
        help="save the audio of each event as FLAC in DIR, from 2 s before its onset to 1 s after it ends "
        "(30 s at most)",
    )
    out.add_argument("--plain", action="store_true", help="plain lines even on a terminal")
    out.add_argument("--quiet", action="store_true", help="no per-update console output (summary only)")
    ev = p.add_argument_group("events")
    ev.add_argument(
        "--on-threshold",
        type=number(0, 1),
        default=None,
        metavar="P",
        help="score that starts an event, for every class (default: the model's per-class thresholds, its "
        "events.toml, else 0.5; off = on - 0.15)",
    )
    ev.add_argument(
        "--max-event-seconds",
        type=number(0),
        default=None,
        metavar="S",
        help="close an event that has lasted S seconds (reason max_duration) and open a new one if the sound "
        "goes on, so consumers of a never-ending sound are not left waiting (default: no limit)",
    )
    ev.add_argument(
        "--event-config",
        metavar="PATH",
        help="JSON/TOML with 'default' and per-class event settings (default: the model's events.toml)",
    )
    p.add_argument(
        "--gain",
        type=number(-MAX_GAIN_DB, MAX_GAIN_DB, low_ok=True),
        default=0.0,
        metavar="DB",
        help=f"gain in dB applied to the input before the model and the level meter, "
        f"-{MAX_GAIN_DB:g}..{MAX_GAIN_DB:g} (default 0)",
    )
    st = p.add_argument_group("state")
    st.add_argument("--reset-every", type=number(0), metavar="S", help="reset model state every S seconds")
    st.add_argument("--reset-on-silence", type=number(0), metavar="S", help="reset after S seconds below -60 dBFS")
    st.add_argument(
        "--buffer-seconds",
        type=number(0, MAX_BUFFER_SECONDS),
        default=2.0,
        metavar="S",
        help=f"audio buffered between capture and worker before samples are dropped: at least this much (the "
        f"buffer is a power of two samples, so up to twice it; default 2, at most {MAX_BUFFER_SECONDS:g})",
    )


def add_parser(subparsers) -> None:
    live = subparsers.add_parser(
        "live",
        help="tag the microphone in real time",
        description="Tag a sound input device in real time. Ctrl-C stops, drains and prints a summary.",
    )
    live.add_argument("--device", metavar="NAME|INDEX", help="input device (see 'streamtag devices'); default: system")
    live.add_argument(
        "--reconnect",
        action="store_true",
        help="when the device is lost (unplugged, sound server restarted), wait for it and go on "
        "(open events close with reason gap; the gap is counted); default: end with exit 1",
    )
    _add_common(live)
    live.set_defaults(handler=run_live)

    replay = subparsers.add_parser(
        "replay",
        help="replay an audio file as a stream",
        description="Replay an audio file (WAV/FLAC/OGG, any rate or channels) through the same ring buffer and "
        "worker as the microphone, paced in real time or as fast as possible.",
    )
    replay.add_argument(
        "file",
        help="audio file, or - for stdin: a WAV stream (ffmpeg -i URL -f wav - | streamtag replay -) or raw PCM "
        "with --raw-rate and --raw-format",
    )
    raw = replay.add_argument_group("raw PCM on stdin (replay -)")
    raw.add_argument("--raw-rate", type=int, metavar="HZ", help="sample rate of raw PCM on stdin")
    raw.add_argument("--raw-format", choices=["s16le", "s32le", "f32le"], help="sample format of raw PCM on stdin")
    raw.add_argument("--raw-channels", type=int, metavar="N", help="channels of raw PCM (default 1)")
    pace = replay.add_mutually_exclusive_group()
    pace.add_argument(
        "--speed",
        type=number(0, hint="; --fast replays as fast as possible"),
        default=1.0,
        metavar="X",
        help="1 = real time (default), 2 = twice as fast; --fast for as fast as possible",
    )
    pace.add_argument("--fast", action="store_true", help="as fast as possible, dropping nothing")
    replay.add_argument("--plot", metavar="PNG", help="save log-mel, top-class probabilities and events as a PNG")
    _add_common(replay)
    replay.set_defaults(handler=run_replay)


OUTPUT_FLAGS = ("--jsonl", "--events", "--scores", "--plot")


def _rotation(text: str) -> Rotation:
    try:
        return Rotation.parse(text)
    except ConfigError as exc:  # argparse shows an ArgumentTypeError's own words
        raise argparse.ArgumentTypeError(str(exc).removeprefix(f"--rotate {text!r}: ")) from None


def _check_output_paths(args) -> None:
    """Every output writable, and none the same file as another output or as the file replayed."""
    taken = {os.path.realpath(args.file): "the file replayed"} if getattr(args, "file", None) else {}
    for flag in OUTPUT_FLAGS:
        path = getattr(args, flag[2:], None)
        if not path:
            continue
        if path == "-":
            if flag == "--plot":
                raise ConfigError("--plot - : a picture cannot go to standard output; give a .png path")
            if "-" in taken:
                raise ConfigError(f"{flag} - : standard output is already {taken['-']}; give one of them a file")
            taken["-"] = flag
            continue
        if getattr(args, "file", None) == "-" and _is_stdin(path):  # replay - < FILE: opening it would truncate it
            raise ConfigError(f"{flag} {path} is also the file read on stdin: give the output another file")
        real = os.path.realpath(path)
        if real in taken and not (os.path.exists(real) and not os.path.isfile(real)):  # /dev/null may repeat
            raise ConfigError(f"{flag} {path} is also {taken[real]}: give each output a file of its own")
        if flag == "--plot":
            check_plot_path(path)
        else:
            check_output_path(path, flag)
        taken[real] = flag
    clips = getattr(args, "save_clips", None)
    if clips:  # a folder that exists already, checked with the files: before any of them is opened (truncated)
        if os.path.exists(clips) and not os.path.isdir(clips):
            raise ConfigError(f"--save-clips {clips} is a file; give a folder")
        if not os.path.isdir(clips):
            raise ConfigError(f"--save-clips {clips}: no such folder; create it first")
        check_output_folder(clips, "--save-clips")


def _is_stdin(path: str) -> bool:
    """Whether ``path`` is the regular file standard input reads (a pipe or a terminal is no file to lose)."""
    try:
        st, given = os.fstat(0), os.stat(path)
    except OSError:
        return False
    return stat.S_ISREG(st.st_mode) and (st.st_dev, st.st_ino) == (given.st_dev, given.st_ino)


def check_args(args) -> tuple[EventParams | None, dict[str, EventParams]]:
    """What can be checked before a model loads: option pairs, output paths, the event settings file.

    Returns the event settings (default, per class).
    """
    if args.all and not args.jsonl:
        raise ConfigError("--all selects what --jsonl writes: add --jsonl PATH, or drop --all")
    _check_view_options(args)
    if args.rotate and not any(p and p != "-" for p in (args.jsonl, args.events, args.scores)):
        raise ConfigError("--rotate applies to --jsonl, --events and --scores files: give one, or drop --rotate")
    if args.torch_device is not None and args.backend != "torch":
        raise ConfigError(f"--torch-device {args.torch_device} needs --backend torch ({args.backend} runs on the CPU)")
    _check_output_paths(args)
    return event_settings(args.model, args.event_config, args.on_threshold, args.max_event_seconds)


VIEW_DEFAULTS = {"rate": 10.0, "max_results": 3, "score_threshold": 0.0}


def _check_view_options(args) -> None:
    """Refuse an option that shapes what nothing shows (the console view is off with --quiet and when a file goes
    to standard output; --jsonl --all writes every class), then put in the defaults of those left out."""
    to_stdout = next((f"--{n} -" for n in ("jsonl", "events", "scores") if getattr(args, n) == "-"), None)
    view = not args.quiet and not to_stdout
    top_k = view or (args.jsonl and not args.all)
    shaped = {"--plain": view, "--max-results": top_k, "--score-threshold": top_k, "--rate": view or args.jsonl}
    given = {
        "--plain": args.plain or None,
        "--max-results": args.max_results,
        "--score-threshold": args.score_threshold,
        "--rate": args.rate,
    }
    for flag, value in given.items():
        if value is not None and not shaped[flag]:
            off = "--quiet turns the console view off" if args.quiet else f"{to_stdout} takes standard output"
            why = off + ("" if args.jsonl or flag == "--plain" else " and there is no --jsonl")
            if args.jsonl and args.all and flag != "--plain":
                why += ", and --jsonl --all writes every class"
            raise ConfigError(f"{flag} shapes what is shown, but {why}: drop {flag}")
    for name, default in VIEW_DEFAULTS.items():
        if getattr(args, name) is None:
            setattr(args, name, default)


def event_settings(
    model, event_config=None, on_threshold: float | None = None, max_event_seconds: float | None = None
) -> tuple[EventParams | None, dict[str, EventParams]]:
    """The model folder's own ``events.toml``, then ``--event-config``, then the flags, each overriding the
    one before key by key (``--on-threshold`` moves every class; off follows unless a file set it)."""
    tables = event_tables(model, event_config, on_threshold, max_event_seconds)
    try:
        return build_event_settings(*tables)
    except ConfigError as exc:  # name the flag or file the bad value came from
        if on_threshold is not None and "on_threshold" in str(exc):
            which = f"--on-threshold {on_threshold:g}"
        elif max_event_seconds is not None and "max_duration_s" in str(exc):
            which = f"--max-event-seconds {max_event_seconds:g}"
        else:
            which = "--event-config" if event_config else "the model's events.toml"
        raise ConfigError(f"{which}: {exc}") from None


def event_tables(
    model, event_config=None, on_threshold: float | None = None, max_event_seconds: float | None = None
) -> list[dict]:
    """The layers :func:`event_settings` merges, for callers that add their own on top (serve's streams)."""
    tables = [model_event_table(resolve_model_dir(model))]
    if event_config:
        try:
            tables.append(read_event_table(event_config))
        except ConfigError as exc:
            raise ConfigError(f"--event-config: {exc}") from None
    flags: dict = {}
    if on_threshold is not None:
        flags["on_threshold"] = on_threshold
    if max_event_seconds is not None:
        flags["max_duration_s"] = max_event_seconds
    # a flag moves every class, also those a file gave their own value (the bundled model's calibrated thresholds):
    # a later table's default does (build_event_settings)
    return [*tables, {"default": flags}]


def detector_factory(model, event_config=None, on_threshold: float | None = None) -> Callable[[], EventDetector]:
    """One event detector per stream (tag, serve), at the settings :func:`event_settings` gives; picklable,
    so worker processes and Ray actors build their own. A bad class name or threshold fails here."""
    cfg = load_config(resolve_model_dir(model))
    settings = event_settings(model, event_config, on_threshold)
    try:
        return EventDetector(cfg.labels, cfg.features.frame_seconds, *settings).fresh
    except ConfigError as exc:
        raise ConfigError(f"{settings_source(model, event_config)}: {exc}") from None


def settings_source(model, event_config=None) -> str:
    """Where event settings came from, for an error about them: --event-config, or the model folder's own file
    (a model copied with another model's events.toml names classes it does not have)."""
    return "--event-config" if event_config else str(resolve_model_dir(model) / "events.toml")


def _selection(args, labels) -> ClassSelection:
    allow, deny = split_class_names(args.allow, labels, "--allow"), split_class_names(args.deny, labels, "--deny")
    return ClassSelection(labels, args.max_results, args.score_threshold, allow, deny)


def _detector(settings, backend, selection: ClassSelection, source: str) -> EventDetector:
    """The stream's detector; a class that ``--allow``/``--deny`` hides opens no events either (as in serve)."""
    default, per_class = settings
    try:
        return EventDetector(
            backend.labels, backend.config.features.frame_seconds, default, per_class, enabled=selection.enabled
        )
    except ConfigError as exc:
        raise ConfigError(f"{source}: {exc}") from None


@dataclasses.dataclass
class StreamPlan:
    """What a run's options make of the model, checked before a device is opened or a file written."""

    selection: ClassSelection  # what is shown, and the classes that may open events
    detector: EventDetector
    every: int  # hops per printed update (--rate)


def plan_stream(args, backend, event_settings) -> StreamPlan:
    frame_s = backend.config.features.frame_seconds
    if args.rate * frame_s > 1 + 1e-9:
        raise ConfigError(
            f"--rate must be at most {1 / frame_s:g} for this model (one update per {frame_s * 1000:g} ms hop; "
            f"{args.rate:g} given)"
        )
    selection = _selection(args, backend.labels)
    source = settings_source(getattr(backend, "folder", None), getattr(args, "event_config", None))
    detector = _detector(event_settings, backend, selection, source)
    return StreamPlan(selection, detector, max(1, round(1.0 / (args.rate * frame_s))))


def _outputs(args, backend, plan: StreamPlan, worker_status, extra=(), source: str | None = None) -> list:
    labels = backend.labels
    selection, every = plan.selection, plan.every
    outputs = list(extra)
    if args.jsonl:
        outputs.append(UpdatesJsonl(args.jsonl, selection, every, args.all, source=source, rotation=args.rotate))
    if args.events:
        outputs.append(EventsJsonl(args.events, source=source, rotation=args.rotate))
    if args.scores:
        outputs.append(ScoresTsv(args.scores, labels, rotation=args.rotate))
    if args.save_clips:
        from ..outputs.clips import ClipSaver

        outputs.append(ClipSaver(args.save_clips, backend.config.features.sample_rate, gain_db=args.gain))
    writes_stdout = "-" in (args.jsonl, args.events, args.scores)
    if not args.quiet and not writes_stdout:  # standard output carries that file alone
        if sys.stdout.isatty() and not args.plain:
            outputs.append(LiveView(selection, every, worker_status))
        else:
            outputs.append(PlainLines(selection, every))
    return outputs


def _open_backend(args):
    # one stream, one hop at a time: one torch thread (this process is ours; a library caller chooses its own)
    options = {"device": args.torch_device or "cpu"} if args.backend == "torch" else {}
    return make_backend(args.backend, args.model, **options, **one_thread(args.backend))


def run_stream(args, source, backend, plan: StreamPlan, extra_outputs=()) -> int:
    """Run one worker to the end (file end, Ctrl-C, SIGTERM or a lost device); print the summary. The outputs
    are opened once the source is: a device that cannot be opened leaves an earlier run's files as they were."""
    holder: dict = {}

    def status() -> tuple[int, float, float, float]:
        w = holder["worker"]
        return w.ring.dropped, w.timer.percentile_ms(99), w.frame_seconds * 1000, w.level_dbfs

    name = getattr(source, "path", None) or getattr(source, "device_name", None) or source.description
    worker = holder["worker"] = Worker(
        source,
        backend,
        (),
        plan.detector,
        args.reset_every,
        args.reset_on_silence,
        args.buffer_seconds,
        args.gain,
        reconnect=getattr(args, "reconnect", False),
    )
    got = {"signal": None}

    def on_signal(signum, frame):
        if got["signal"] == signal.SIGINT and signum == signal.SIGINT:
            os._exit(130)  # second Ctrl-C: leave now
        got["signal"] = signum
        worker.request_stop()

    old = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        worker.start(lambda: _outputs(args, backend, plan, status, extra_outputs, source=str(name)))
        while worker.is_alive():
            worker.join(0.1)
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)
    summary = worker.summary()
    for line in summary.lines():
        print(line, file=sys.stderr)
    if summary.error:
        print(f"streamtag {args.command}: error: {summary.error}", file=sys.stderr)
        return 1
    if worker.stdout_closed:  # | head had what it wanted: no flush error at exit either
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return 130 if got["signal"] == signal.SIGINT else 0  # a reader that left: quietly 0


def raw_pcm(args, from_stdin: bool):
    """``--raw-rate``/``--raw-format``/``--raw-channels`` checked (replay and tag): the format of raw PCM on
    stdin, or ``None`` for a WAV stream (which says its own)."""
    from ..sources.pipe import PcmFormat

    if (args.raw_rate is None) != (args.raw_format is None):
        raise ConfigError("raw PCM needs both --raw-rate and --raw-format (e.g. --raw-rate 16000 --raw-format s16le)")
    if args.raw_channels is not None and args.raw_format is None:
        raise ConfigError(
            "--raw-channels describes raw PCM: give it with --raw-rate and --raw-format (a WAV says its own)"
        )
    if args.raw_format is None:
        return None
    if not from_stdin:
        raise ConfigError("--raw-rate and --raw-format describe stdin: give - as the input to read it")
    return PcmFormat.raw(args.raw_rate, args.raw_format, 1 if args.raw_channels is None else args.raw_channels)


def run_replay(args) -> int:
    from ..sources import WavReplaySource

    from_stdin = args.file == "-"
    fmt = raw_pcm(args, from_stdin)
    settings = check_args(args)
    backend = _open_backend(args)
    plan = plan_stream(args, backend, settings)
    feats = backend.config.features
    speed = 0.0 if args.fast else args.speed
    if from_stdin:
        from ..sources.pipe import PipeSource, stdin_stream
        from . import interrupt_on_signals

        interrupt_on_signals()  # a stop while the WAV header is awaited: an interrupt, not a death by SIGTERM
        source = PipeSource(stdin_stream(), feats.sample_rate, fmt, block_size=feats.hop_length, speed=speed)
    else:
        source = WavReplaySource(
            args.file, feats.sample_rate, block_size=feats.hop_length, speed=speed, min_samples=feats.hop_length
        )
    extra = []
    if args.plot:
        from ..outputs.plots import RecordingPlot

        extra.append(RecordingPlot(args.plot, feats, title="stdin" if from_stdin else os.path.basename(args.file)))
    code = run_stream(args, source, backend, plan, extra)
    if getattr(source, "warning", None):
        print(f"streamtag {args.command}: warning: {source.warning}", file=sys.stderr)
    rate = source.fmt.rate if from_stdin else source.file_rate
    if rate < feats.sample_rate:  # telephone audio: weak labels, and nothing said why
        print(
            f"streamtag {args.command}: note: the input is {rate} Hz: nothing above {rate / 2000:g} kHz reaches the "
            f"model, which hears up to {feats.sample_rate / 2000:g} kHz; sounds that live higher (birds, alarms, "
            "glass) score lower",
            file=sys.stderr,
        )
    return code


def run_live(args) -> int:
    from ..sources.device import MicrophoneSource

    settings = check_args(args)
    backend = _open_backend(args)
    feats = backend.config.features
    plan = plan_stream(args, backend, settings)
    source = MicrophoneSource(feats.sample_rate, args.device, block_size=feats.hop_length)
    print(f"listening on {source.description}; Ctrl-C stops", file=sys.stderr)
    code = run_stream(args, source, backend, plan)
    if source.abandoned:  # a frozen sound server: PortAudio's clean-up at exit would wait for it for ever
        print("streamtag: the sound device did not stop (is the sound server hung?); leaving it", file=sys.stderr)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code
