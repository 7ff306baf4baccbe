"""``streamtag eval MODEL DATASET``: accuracy, mAP and time to detect through the streaming path."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np

from ..engine import MAX_GAIN_DB
from ..errors import ConfigError, DatasetError, count, some
from .run import BACKENDS


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "eval",
        help="evaluate a model on labelled audio through the streaming path",
        description="Feed every clip of DATASET to the streaming engine (its hops on the chunk step, equal to hop "
        "by hop within 1e-5) and report clip accuracy (last "
        "frame and mean over frames, argmax among the dataset's classes), macro mAP, per-class AP and F1 at "
        "the event thresholds, a confusion matrix, a time-to-detect curve and a level sweep, beside an "
        "offline logistic-regression baseline. Optionally: false alarms per hour on audio without these "
        "classes, and agreement with a teacher on unlabelled audio.",
    )
    p.add_argument("model", help="model folder, or 'default' for the bundled model")
    p.add_argument("dataset", help="ESC-50 folder, folder per class, or CSV manifest")
    p.add_argument("--backend", choices=sorted(BACKENDS), default="onnx", help="inference backend (default onnx)")
    p.add_argument(
        "--report", metavar="DIR", default="eval_report", help="where report.json/.md go (default eval_report)"
    )
    p.add_argument("--plot", action="store_true", help="also save confusion.png and time_to_detect.png")
    p.add_argument(
        "--limit", type=int, metavar="N", help="evaluate only N clips, taken from each class in turn (a quick look)"
    )
    p.add_argument(
        "--baseline-folds",
        type=int,
        metavar="K",
        help="the baseline is scored by K-fold source-grouped CV on the same clips (default 5, or none without "
        "torch, which it needs; 0: none)",
    )
    p.add_argument(
        "--levels",
        default="0,-10,-20,-30,-40",
        metavar="DB,...",
        help=f"input gains of the level sweep in dB, -{MAX_GAIN_DB:g}..0 ('' for none; default 0,-10,-20,-30,-40); "
        "--levels=-10,-20 also works where a shell or script splits words",
    )
    p.add_argument(
        "--false-alarm-audio",
        action="append",
        default=[],
        metavar="PATH",
        help="audio holding none of the model's classes except --expected (folder or CSV with path): events per hour",
    )
    p.add_argument(
        "--expected",
        metavar="A,B",
        help="classes that may be present in --false-alarm-audio, not counted (default: speech and music, those "
        "of them the model has)",
    )
    p.add_argument(
        "--event-stream",
        type=int,
        default=0,
        metavar="N",
        help="also play one clip of each of N classes one after another over a quiet noise floor and check "
        "that each is found as an event with the right label and onset (default 0: off)",
    )
    p.add_argument("--teacher", metavar="ONNX", help="AudioSet tagger to compare with on --agreement-audio")
    p.add_argument(
        "--agreement-audio",
        action="append",
        default=[],
        metavar="PATH",
        help="unlabelled audio for it (folder or CSV; repeatable): a per-group table when it spans several groups "
        "(a CSV's group column, else one group per PATH)",
    )
    p.add_argument("--label-map", metavar="TSV", help="label map for the teacher (default: the packaged one)")
    p.set_defaults(handler=run)


def _levels(text: str) -> list[float]:
    try:
        levels = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ConfigError(f"--levels {text!r}: expected comma-separated gains in dB, e.g. 0,-20,-40") from None
    bad = [x for x in levels if not -MAX_GAIN_DB <= x <= 0]
    if bad:  # a gain above 0 dB clips the audio: the sweep would measure the clipping; the engine's gain stops at -60
        raise ConfigError(
            f"--levels: {bad[0]:g} dB is outside -{MAX_GAIN_DB:g}..0 (the sweep plays the clips quieter, never louder)"
        )
    return levels


def run(args) -> int:
    from ..backends import make_backend
    from ..events import model_detector
    from ..modelfile import cache_dir, resolve_model_dir, writable_cache
    from ..outputs.files import check_output_folder
    from ..training.datasets import load_dataset, read_unlabelled
    from ..training.evaluate import (
        clip_rows,
        dataset_targets,
        detected,
        event_stream,
        f1_scores,
        false_alarms,
        grouped_baseline,
        metrics,
        stream_scores,
        teacher_agreement,
        write_report,
    )
    from ..training.teacher import Teacher, read_label_map
    from . import interrupt_on_signals

    levels = _levels(args.levels)
    asked = args.baseline_folds is not None
    args.baseline_folds = 5 if args.baseline_folds is None else args.baseline_folds
    if args.baseline_folds == 1 or args.baseline_folds < 0:
        raise ConfigError(f"--baseline-folds must be 0 (no baseline) or >= 2 ({args.baseline_folds} given)")
    check_output_folder(args.report, "--report")  # before the clips are scored, not after
    interrupt_on_signals()
    if args.limit is not None and args.limit < 1:
        raise ConfigError(f"--limit must be >= 1 ({args.limit} given)")
    if args.event_stream < 0:
        raise ConfigError(f"--event-stream must be >= 0 ({args.event_stream} given)")
    if args.agreement_audio and not args.teacher:
        raise ConfigError("--agreement-audio needs --teacher (the scores to agree with)")
    if args.teacher and not args.agreement_audio:
        raise ConfigError("--teacher is compared with on --agreement-audio: give that too, or drop --teacher")
    if args.expected is not None and not args.false_alarm_audio:
        raise ConfigError("--expected names the classes --false-alarm-audio may hold: give that too, or drop it")
    # the audio and the teacher of the last parts, read before the clips are scored (a typo must not cost that)
    unlabelled = {}
    for flag, paths in (("--false-alarm-audio", args.false_alarm_audio), ("--agreement-audio", args.agreement_audio)):
        for path in paths or []:
            try:
                unlabelled[path] = read_unlabelled(path)
            except DatasetError as exc:  # which option it was, of the several that read audio
                raise DatasetError(f"{flag}: {exc}") from None
    teacher = Teacher(args.teacher, cache=writable_cache(cache_dir() / "teacher")) if args.agreement_audio else None
    if args.plot:
        import matplotlib  # noqa: F401  (missing: one line naming the extra before the clips are scored)
    label_map = read_label_map(args.label_map)
    model_dir = resolve_model_dir(args.model)  # "default": the bundled model, as everywhere
    backend = make_backend(args.backend, args.model)
    try:  # before any clip is scored (a wrong one was found after all of them), naming the file
        detector = model_detector(backend.folder, backend.labels, backend.config.features.frame_seconds)
    except ConfigError as exc:
        where = str(Path(backend.folder) / "events.toml")
        raise ConfigError(str(exc) if where in str(exc) else f"{where}: {exc}") from None
    if args.expected is None:  # the defaults the model has: a model of dogs and rain expects neither
        expected = [x for x in ("speech", "music") if x in backend.labels]
    else:
        expected = [x.strip() for x in args.expected.split(",") if x.strip()]
    unknown_expected = [x for x in expected if x not in backend.labels]
    if args.false_alarm_audio and unknown_expected:  # a typo would count its class's events as false alarms
        raise ConfigError(f"--expected: {unknown_expected[0]!r} is not one of the model's classes (its config.json)")
    dataset = load_dataset(args.dataset, min_classes=1)  # one class is enough to measure how often it is found
    seen, unique = set(), []
    for i, clip in enumerate(dataset.clips):  # a clip listed twice would count twice
        real = clip.path.resolve()
        if real not in seen:
            seen.add(real)
            unique.append(i)
    for note in dataset.notes:
        print(f"streamtag eval: note: {note}", file=sys.stderr)
    if len(unique) < len(dataset.clips):
        twice = len(dataset.clips) - len(unique)
        print(f"streamtag eval: note: {count(twice, 'clip')} listed twice, scored once", file=sys.stderr)
        dataset = dataset.subset(unique)
    _, _, allowed, unknown = dataset_targets(dataset, backend.labels, label_map)  # the dataset's, before --limit
    if not allowed.any():  # every clip would count as an error: a report of nothing, not a figure
        raise ConfigError(
            f"none of the dataset's classes ({some(unknown, 5)}) is one "
            f"of the model's {len(backend.labels)}: evaluate a model trained on them "
            "(streamtag eval MODEL_FOLDER DATASET)"
        )
    if args.limit:  # taken across the classes in turn: the first N of a folder per class would be one class
        dataset = dataset.subset(_spread(dataset, args.limit, set(backend.labels)))
    _check_readable(dataset, backend.config.features.frame_seconds)
    k = args.baseline_folds
    baseline = k >= 2 and len(dataset.clips) >= 2 * k  # K-fold CV needs two clips a fold at least
    if baseline and importlib.util.find_spec("torch") is None:  # said now, not after every clip
        if asked:
            raise ConfigError(
                "the baseline needs torch, which is not installed; install it with pip install '.[train]' "
                "in streamtag's folder, or add --baseline-folds 0"
            )
        baseline, k = False, 0  # the runtime install evaluates too: the baseline is a comparison, not the figures
        print(
            "streamtag eval: note: no baseline (it needs torch, which is not installed: pip install '.[train]' in "
            "streamtag's folder)",
            file=sys.stderr,
        )
    warnings, in_training = _warn_if_seen(model_dir, dataset)  # also in the report: stderr scrolls away
    targets, hard, _, unknown = dataset_targets(dataset, backend.labels, label_map)
    if allowed.sum() < 2:  # an argmax among one class is right by construction: among every class instead
        print(
            f"streamtag eval: note: the dataset has one of the model's classes, so accuracy is the argmax over all "
            f"{len(backend.labels)} of them",
            file=sys.stderr,
        )
        allowed = np.ones(len(backend.labels), dtype=bool)
    if unknown:
        one = len(unknown) == 1
        what = "class is not a model class; its" if one else "classes are not model classes; their"
        warnings.append(f"{len(unknown)} dataset {what} clips count as errors: {unknown[:5]}")
    for line in warnings:
        print(f"streamtag eval: warning: {line}", file=sys.stderr)
    frame_s = backend.config.features.frame_seconds
    paths = [c.path for c in dataset.clips]
    print(f"streamtag eval: {len(paths)} clips through the {args.backend} backend", file=sys.stderr)
    bar = _progress_bar()
    probs = _with_bar(bar, "clips", len(paths), lambda tick: stream_scores(backend, paths, progress=tick))
    report = {
        "model": args.model,
        "dataset": str(args.dataset),
        "warnings": warnings,
        "metrics": metrics(probs, targets, backend.labels, frame_s, allowed, hard),
        "f1": f1_scores(np.stack([detected(p, detector) for p in probs]), hard, backend.labels),
    }
    if levels:
        report["levels"] = {}
        for db in levels:
            print(f"streamtag eval: level sweep, {db:g} dB", file=sys.stderr)
            quiet = (
                probs
                if db == 0
                else _with_bar(
                    bar, f"{db:g} dB", len(paths), lambda tick, db=db: stream_scores(backend, paths, db, tick)
                )
            )
            m = metrics(quiet, targets, backend.labels, frame_s, allowed, hard)
            report["levels"][f"{db:g}"] = {"acc_mean": m["acc_mean"], "acc_last": m["acc_last"]}
    if args.event_stream:
        first: dict[str, int] = {}
        for i, t in enumerate(targets):
            if t >= 0 and backend.labels[t] not in first and len(first) < args.event_stream:
                first[backend.labels[t]] = i
        print(f"streamtag eval: event stream of {len(first)} isolated sounds", file=sys.stderr)
        report["event_stream"] = event_stream(
            backend, [paths[i] for i in first.values()], list(first), detector=detector
        )
    if args.false_alarm_audio:
        files = [c.path for path in args.false_alarm_audio for c in unlabelled[path]]
        print(f"streamtag eval: false alarms on {count(len(files), 'file')}", file=sys.stderr)
        report["false_alarms"] = false_alarms(backend, detector, files, expected)
    if args.agreement_audio:
        files, groups = [], []
        for path in args.agreement_audio:
            for c in unlabelled[path]:
                files.append(c.path)
                # a manifest's group column names a row's source; a folder, or a row without a group, counts
                # as the source the argument names (read_unlabelled gives such a file its own path as group)
                groups.append(c.group if c.group != str(c.path) else str(path))
        print(f"streamtag eval: agreement with the teacher on {count(len(files), 'file')}", file=sys.stderr)
        report["teacher_agreement"] = teacher_agreement(
            backend, teacher, label_map, files, groups=groups if len(set(groups)) > 1 else None
        )
    if baseline:
        feats = backend.config.features
        report["baseline_acc"] = grouped_baseline(
            dataset, targets, feats, writable_cache(cache_dir() / "features"), k, len(backend.labels)
        )
        report["baseline_split"] = f"{k}-fold source-grouped CV on these clips"
    elif k >= 2:
        print(
            f"streamtag eval: note: no baseline: {len(dataset.clips)} clips are too few for {k}-fold CV "
            f"(at least {2 * k}; --baseline-folds sets K)",
            file=sys.stderr,
        )
    if bar is not None:
        bar.stop()
    replaced = (Path(args.report) / "report.json").is_file()
    clips = clip_rows(dataset.clips, probs, targets, hard, backend.labels, allowed, in_training)
    out = write_report(report, args.report, args.plot, clips)
    print((Path(out) / "report.md").read_text())
    if replaced:  # write_report also removed the plots of that earlier report unless --plot drew new ones
        print(f"streamtag eval: note: replaced the earlier report in {out}", file=sys.stderr)
    print(
        f"streamtag eval: report written to {Path(out) / 'report.md'}, report.json and clips.csv (each clip)",
        file=sys.stderr,
    )
    return 0


def _progress_bar():
    """A progress bar on stderr when it is a terminal (the stage lines say the rest when it is not)."""
    if not sys.stderr.isatty():
        return None
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    bar = Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        console=Console(stderr=True),
        transient=True,
    )
    bar.start()
    return bar


def _with_bar(bar, name: str, total: int, work):
    if bar is None:
        return work(None)
    task = bar.add_task(name, total=total)
    try:
        return work(lambda: bar.advance(task))
    finally:
        bar.remove_task(task)


def _warn_if_seen(model_dir: Path, dataset) -> tuple[list[str], list[bool]]:
    """Figures on clips a model was trained on are not held-out figures: the warning to say so, if any, naming a
    few (clips.csv marks each), and per clip whether it was."""
    from ..training.datasets import TRAINED_ON, clip_identity, learned_clips

    seen = learned_clips(model_dir)
    flags = [clip_identity(c.path) in seen for c in dataset.clips]
    overlap = sum(flags)
    if not overlap:
        return [], flags
    names = [c.path.name for c, f in zip(dataset.clips, flags) if f]
    return [
        f"{overlap} of {len(dataset.clips)} clips {'was' if overlap == 1 else 'were'} in this model's training set "
        f"({model_dir / TRAINED_ON}: {some(names, 3)}; clips.csv's in_training marks each); these figures are "
        "not held-out figures"
    ], flags


def _check_readable(dataset, hop_s: float) -> None:
    """Every clip opens as audio and holds a hop, or one line before any is scored: a bad file found mid-run cost
    the report."""
    from ..errors import AudioFileError
    from ..sources.file import probe_audio

    bad = []
    for clip in dataset.clips:
        try:
            info = probe_audio(clip.path)
        except AudioFileError as exc:
            bad.append(str(exc))
            continue
        if info.frames < hop_s * info.samplerate:
            seconds = info.frames / info.samplerate
            bad.append(f"{clip.path} is {seconds * 1000:.1f} ms long, shorter than one hop ({hop_s * 1000:g} ms)")
    if bad:
        raise ConfigError(f"{count(len(bad), 'clip')} of the dataset cannot be scored ({bad[0]}): fix or remove them")


def _spread(dataset, limit: int, known: set[str]) -> list[int]:
    """``limit`` clip indices taken from each class in turn (in dataset order within a class), the model's
    ``known`` classes first: a small look at a large dataset should score what the model can name."""
    by_class: dict[str, list[int]] = {}
    for i, clip in enumerate(dataset.clips):
        by_class.setdefault(clip.label, []).append(i)
    picked: list[int] = []
    for model_knows in (True, False):  # the classes of another model only once the model's own run out
        queues = [list(reversed(v)) for label, v in sorted(by_class.items()) if (label in known) == model_knows]
        while len(picked) < limit and any(queues):
            for q in queues:
                if q and len(picked) < limit:
                    picked.append(q.pop())
    return sorted(picked)
