"""``streamtag live`` and ``streamtag replay``: one pipeline, two sources."""

from __future__ import annotations

import argparse
import dataclasses
import os
import signal
import sys

from ..backends import BACKENDS, make_backend
from ..errors import ConfigError
from ..events import EventDetector, EventParams, load_event_settings
from ..outputs import ClassSelection, EventsJsonl, LiveView, PlainLines, ScoresTsv, UpdatesJsonl
from ..outputs.files import check_output_path
from ..worker import Worker


def add_model_options(p: argparse.ArgumentParser, backend: bool = True) -> None:
    p.add_argument(
        "--model",
        metavar="DIR",
        help="model folder (config.json + model.safetensors); default: the bundled ESC-50 model",
    )
    if backend:
        p.add_argument(
            "--backend",
            choices=sorted(BACKENDS),
            default="onnx",
            help="inference runtime: onnx (fast CPU, default) or torch (reference; --torch-device cuda)",
        )
        p.add_argument("--torch-device", default="cpu", metavar="DEV", help="torch backend device: cpu or cuda")


def _add_common(p: argparse.ArgumentParser) -> None:
    add_model_options(p)
    out = p.add_argument_group("output")
    out.add_argument(
        "--rate",
        type=float,
        default=10.0,
        metavar="HZ",
        help="updates shown per second (every hop is still computed); default 10",
    )
    out.add_argument("--max-results", type=int, default=3, metavar="K", help="top-k classes shown (default 3)")
    out.add_argument("--score-threshold", type=float, default=0.0, metavar="P", help="hide classes below P")
    out.add_argument("--allow", nargs="+", metavar="CLASS", help="show only these classes")
    out.add_argument("--deny", nargs="+", metavar="CLASS", help="never show these classes")
    out.add_argument("--jsonl", metavar="PATH", help="write one JSON object per update")
    out.add_argument("--all", action="store_true", help="with --jsonl: every class's probability, not the top-k")
    out.add_argument("--events", metavar="PATH", help="write events as JSONL (an open line, then a close line)")
    out.add_argument("--scores", metavar="PATH", help="write every frame's scores as a sed_scores_eval TSV")
    out.add_argument("--plain", action="store_true", help="plain lines even on a terminal")
    out.add_argument("--quiet", action="store_true", help="no per-update console output (summary only)")
    ev = p.add_argument_group("events")
    ev.add_argument(
        "--on-threshold",
        type=float,
        default=None,
        metavar="P",
        help="score that starts an event (default 0.5; off = on - 0.15)",
    )
    ev.add_argument("--event-config", metavar="PATH", help="JSON/TOML with 'default' and per-class event settings")
    st = p.add_argument_group("state")
    st.add_argument("--reset-every", type=float, metavar="S", help="reset model state every S seconds")
    st.add_argument("--reset-on-silence", type=float, metavar="S", help="reset after S seconds below -60 dBFS")
    st.add_argument(
        "--buffer-seconds",
        type=float,
        default=2.0,
        metavar="S",
        help="audio buffered between capture and worker before samples are dropped (default 2)",
    )


def add_parser(subparsers) -> None:
    live = subparsers.add_parser(
        "live",
        help="tag the microphone in real time",
        description="Tag a sound input device in real time. Ctrl-C stops, drains and prints a summary.",
    )
    live.add_argument("--device", metavar="NAME|INDEX", help="input device (see 'streamtag devices'); default: system")
    _add_common(live)
    live.set_defaults(handler=run_live)

    replay = subparsers.add_parser(
        "replay",
        help="replay an audio file as a stream",
        description="Replay an audio file (WAV/FLAC/OGG, any rate or channels) through the same ring buffer and "
        "worker as the microphone, paced in real time or as fast as possible.",
    )
    replay.add_argument("file", help="audio file")
    pace = replay.add_mutually_exclusive_group()
    pace.add_argument(
        "--speed",
        type=float,
        default=1.0,
        metavar="X",
        help="1 = real time (default), 2 = twice as fast, 0 = as fast as possible",
    )
    pace.add_argument("--fast", action="store_true", help="as fast as possible (same as --speed 0)")
    replay.add_argument("--plot", metavar="PNG", help="save log-mel, top-class probabilities and events as a PNG")
    _add_common(replay)
    replay.set_defaults(handler=run_replay)


def _detector(args, backend) -> EventDetector:
    default, per_class = (None, {}) if not args.event_config else load_event_settings(args.event_config)
    if args.on_threshold is not None:  # adjusts the config's default; off follows unless the config set it
        default = dataclasses.replace(default or EventParams(), on_threshold=args.on_threshold)
    return EventDetector(backend.labels, backend.config.features.frame_seconds, default, per_class)


def _outputs(args, backend, worker_status, extra=()) -> list:
    selection = ClassSelection(backend.labels, args.max_results, args.score_threshold, args.allow, args.deny)
    if args.rate <= 0:
        raise ConfigError(f"--rate must be > 0 ({args.rate} given)")
    every = max(1, round(1.0 / (args.rate * backend.config.features.frame_seconds)))
    for path in (args.jsonl, args.events, args.scores):  # every path checked before any file is opened
        if path:
            check_output_path(path)
    outputs = list(extra)
    if args.jsonl:
        outputs.append(UpdatesJsonl(args.jsonl, selection, every, args.all))
    if args.events:
        outputs.append(EventsJsonl(args.events))
    if args.scores:
        outputs.append(ScoresTsv(args.scores))
    if not args.quiet:
        if sys.stdout.isatty() and not args.plain:
            outputs.append(LiveView(selection, every, worker_status))
        else:
            outputs.append(PlainLines(selection, every))
    return outputs


def _open_backend(args):
    options = {"device": args.torch_device} if args.backend == "torch" else {}
    return make_backend(args.backend, args.model, **options)


def run_stream(args, source, backend, extra_outputs=()) -> int:
    """Run one worker to the end (file end, Ctrl-C, SIGTERM or a lost device); print the summary."""
    holder: dict = {}

    def status() -> tuple[int, float, float]:
        w = holder["worker"]
        return w.ring.dropped, w.timer.percentile_ms(99), w.frame_seconds * 1000

    outputs = _outputs(args, backend, status, extra_outputs)
    worker = holder["worker"] = Worker(
        source, backend, outputs, _detector(args, backend), args.reset_every, args.reset_on_silence, args.buffer_seconds
    )
    got = {"signal": None}

    def on_signal(signum, frame):
        if got["signal"] == signal.SIGINT and signum == signal.SIGINT:
            os._exit(130)  # second Ctrl-C: leave now
        got["signal"] = signum
        worker.request_stop()

    old = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        worker.start()
        while worker.is_alive():
            worker.join(0.1)
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)
    summary = worker.summary()
    for line in summary.lines():
        print(line, file=sys.stderr)
    if summary.error:
        print(f"streamtag: error: {summary.error}", file=sys.stderr)
        return 1
    return 130 if got["signal"] == signal.SIGINT else 0


def run_replay(args) -> int:
    from ..sources import WavReplaySource

    backend = _open_backend(args)
    feats = backend.config.features
    speed = 0.0 if args.fast else args.speed
    source = WavReplaySource(
        args.file, feats.sample_rate, block_size=feats.hop_length, speed=speed, min_samples=feats.hop_length
    )
    extra = []
    if args.plot:
        from ..outputs.plots import RecordingPlot

        extra.append(RecordingPlot(args.plot, args.file, feats, title=os.path.basename(args.file)))
    code = run_stream(args, source, backend, extra)
    if source.status.nonfinite_samples:
        print(
            f"streamtag: warning: {source.status.nonfinite_samples} NaN/Inf samples in {args.file} were replaced by 0",
            file=sys.stderr,
        )
    return code


def run_live(args) -> int:
    from ..sources.device import MicrophoneSource

    backend = _open_backend(args)
    feats = backend.config.features
    source = MicrophoneSource(feats.sample_rate, args.device, block_size=feats.hop_length)
    print(f"listening on {source.description}; Ctrl-C stops", file=sys.stderr)
    return run_stream(args, source, backend)
