"""``streamtag tag``: every file of an archive tagged, resumably, many files per model call."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

from ..errors import ConfigError, StreamtagError, count, stop_exit_code
from ..outputs.files import check_output_folder
from .run import ray_address

PYARROW_HINT = "pip install '.[archive]' in streamtag's folder (or pip install pyarrow)"


def _has_pyarrow() -> bool:
    try:
        import pyarrow  # noqa: F401
    except ImportError:
        return False
    return True


def usable_cores() -> int:
    """The cores this process may run on (a container's or taskset's share, not the machine's)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "tag",
        help="tag whole archives: files, folders or manifests, resumably",
        description="Tag every audio file given (folders are searched recursively; a .csv manifest with a 'path' "
        "column or a .txt with one path a line lists files). Files are decoded a second or so at a time and stepped "
        "as streams of one batched pool (one file alone: 128 hops per model call), so results equal 'streamtag "
        "replay' of each file (to float rounding; the same events). Per file, under "
        "--out: NAME.events.jsonl, NAME.labels.txt (Audacity labels), NAME.scores.tsv with --scores, and "
        "NAME.done.json; summary.csv (every finished file under --out; summary.parquet with --parquet) and errors.csv "
        "(this run's failures). A rerun skips the files finished with the same model and settings and tags the "
        "others (new, changed, or finished with other settings); Ctrl-C stops cleanly, and the same command "
        "resumes. Exit 1 when any file failed (see errors.csv), 130 when stopped by Ctrl-C (0 by SIGTERM).",
    )
    p.add_argument(
        "inputs", nargs="+", metavar="INPUT", help="audio files, folders, or manifests (.csv/.txt); - reads stdin"
    )
    p.add_argument("--out", required=True, metavar="DIR", help="output folder (created, with its parents, if missing)")
    p.add_argument("--model", metavar="DIR", help="model folder (default: the bundled model)")
    p.add_argument("--backend", choices=["onnx", "torch"], default="onnx", help="inference backend (default onnx)")
    p.add_argument("--scores", action="store_true", help="also write every frame's scores (sed_scores_eval TSV)")
    p.add_argument("--parquet", action="store_true", help="also write summary.parquet (needs pyarrow)")
    p.add_argument("--force", action="store_true", help="tag files again even when a finished output exists")
    p.add_argument(
        "--jobs",
        type=int,
        default=None,
        help=f"local processes, or Ray actors with --ray (default: one per core, {usable_cores()} here; with --ray, "
        "one per CPU of the cluster)",
    )
    p.add_argument(
        "--ray",
        metavar="ADDRESS",
        type=ray_address,
        help="run on Ray (the ray extra, pip install '.[ray]'): auto (a Ray running here, else a local one) or a "
        "cluster address; --out must be a path every node shares",
    )
    p.add_argument("--width", type=int, default=64, help="files stepped together per model call (default 64)")
    p.add_argument("--event-config", metavar="FILE", help="event thresholds per class (TOML or JSON), as replay's")
    p.add_argument(
        "--on-threshold",
        type=float,
        help="score that starts an event, for every class (default: the model's per-class thresholds, its events.toml)",
    )
    p.add_argument("--name", help="with -: the name stdin's outputs take (default stdin)")
    p.add_argument("--raw-rate", type=int, metavar="HZ", help="with -: raw PCM at this rate (default: a WAV stream)")
    p.add_argument("--raw-format", choices=["s16le", "s32le", "f32le"], help="with -: raw PCM sample format")
    p.add_argument("--raw-channels", type=int, metavar="N", help="with -: raw PCM channels (default 1)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(handler=run)


def run(args) -> int:
    from ..archive import (
        check_out,
        done_before,
        find_inputs,
        lock_out,
        names_too_long,
        settings_key,
        settled,
        tag_in_processes,
        write_tables,
    )
    from ..backends import make_backend
    from ..modelfile import load_config, resolve_model_dir
    from ..sources.file import FFMPEG_SUFFIXES
    from . import interrupt_on_signals
    from .run import detector_factory, raw_pcm

    for flag, value in (("--jobs", args.jobs), ("--width", args.width)):
        if value is not None and value < 1:
            raise ConfigError(f"{flag} must be a whole number >= 1 ({value} given)")
    if args.parquet and not _has_pyarrow():
        raise ConfigError(f"--parquet needs pyarrow: {PYARROW_HINT}")
    if args.ray and "-" in args.inputs:  # before --out is made and stdin read
        raise ConfigError("--ray tags files: stdin (-) is tagged locally, without --ray")
    out = check_output_folder(args.out, "--out")
    passed_over: list[Path] = []
    if "-" in args.inputs:
        args.name = "stdin" if args.name is None else args.name
        items = [_stdin_item(args, out)]
        args.jobs = 1  # worker processes cannot share this process's stdin
        if (out / f"{args.name}.events.jsonl").exists() and not args.force:
            raise ConfigError(
                f"--out {out} already holds results named '{args.name}'; give stdin another --name, "
                "or add --force to replace them"
            )
    else:
        raw_pcm(args, from_stdin=False)  # refuses raw PCM options without stdin
        if args.name is not None:
            raise ConfigError("--name names stdin's outputs: give - as the input to read it (files keep their names)")
        items = find_inputs(args.inputs, passed_over, out=out)
    too_long, items = names_too_long(items, out)  # each fails alone, said with the others at the end
    detectors = detector_factory(args.model, args.event_config, args.on_threshold)
    make_backend(args.backend, args.model)  # torch missing, or a model with no graph to run: one line, now
    check_out(items, out, args.force)
    cores = usable_cores()
    if args.jobs is not None and args.jobs > cores and not args.ray:  # more processes only share the same cores
        print(
            f"streamtag tag: note: --jobs {args.jobs} is more than the {count(cores, 'core')} here; using {cores}",
            file=sys.stderr,
        )
        args.jobs = cores
    # a summary.parquet an earlier run wrote beside its summary.csv is kept up to date; a file of that name with no
    # summary.csv of ours is the user's, and is left alone
    ours = (out / "summary.parquet").is_file() and (out / "summary.csv").is_file()
    parquet = args.parquet or ours
    if parquet and not args.parquet and not _has_pyarrow():
        parquet = False
        print(
            f"streamtag tag: note: {out / 'summary.parquet'} is not updated by this run (no pyarrow here: "
            f"{PYARROW_HINT}); summary.csv lists every finished file",
            file=sys.stderr,
        )
    out.mkdir(parents=True, exist_ok=True)
    lock = lock_out(out)  # noqa: F841  (held until this process ends)
    bar = _Progress(len(items), enabled=not args.quiet and sys.stderr.isatty())
    kwargs = dict(out=out, model=args.model, backend=args.backend, width=args.width, scores=args.scores)
    kwargs.update(detector=detectors, force=args.force)
    outcomes: list = []  # as each file ends, so an interrupted run still writes its summary

    def ended(outcome) -> None:
        outcomes.append(outcome)
        bar.update(outcome)

    for outcome in too_long:
        ended(outcome)

    folder = resolve_model_dir(args.model)
    cfg = load_config(folder)
    key = settings_key(folder, cfg.labels, cfg.features.frame_seconds, args.scores, detectors)
    started, begun = time.perf_counter(), time.time()
    interrupted: KeyboardInterrupt | StreamtagError | None = None  # the stop (Ctrl-C or SIGTERM), if one came
    lost: StreamtagError | None = None  # the Ray cluster, gone mid-run (also in ``interrupted``)
    interrupt_on_signals()  # SIGTERM too: finished files kept, the summary written, nothing half-written left
    try:
        if args.ray:
            from ..distributed import tag_on_ray

            done, rest = ([], items) if args.force else done_before(items, out, key)
            for outcome in done:  # a rerun of a finished archive starts no Ray (seconds, a cluster's logs)
                ended(outcome)
            if rest:
                tag_on_ray(rest, args.ray, args.jobs, progress=ended, **kwargs)
        elif items:
            jobs = args.jobs or cores
            tag_in_processes(items, min(jobs, len(items)), progress=ended, **kwargs)
    except KeyboardInterrupt as stop:
        interrupted = stop
    except StreamtagError as exc:  # the Ray cluster lost mid-run: what finished is kept and summed up, as a stop
        from ..distributed import ClusterLost

        if not isinstance(exc, ClusterLost):
            raise
        interrupted = lost = exc
    except OSError as exc:  # a write to --out failed (a full disk): said by main(), naming the folder
        exc.filename = exc.filename or str(out)
        raise
    finally:
        bar.close()
    wall = time.perf_counter() - started
    unfinished: list = []
    if interrupted is not None:  # workers report late (Ray a batch at a time): the done markers say what else finished
        if args.ray:  # Ray's actors were stopped without their own clean-up: what they left half-written goes
            for part in out.rglob("*.part"):
                part.unlink(missing_ok=True)
        # a Ctrl-C at a terminal reaches Ray's actors too: the files of the ones it stopped are not finished,
        # not failed
        outcomes = [o for o in outcomes if not o.worker_lost]
        reported = {o.name for o in outcomes}
        late = settled([i for i in items if i.name not in reported], out, key, begun, args.force)
        outcomes += late
        reported |= {o.name for o in late}
        unfinished = [i for i in items if i.name not in reported]
    tables = write_tables(outcomes, out, parquet=parquet, key=key)
    failed = [o for o in outcomes if o.error]
    skipped = sum(o.skipped for o in outcomes)
    tagged_s = sum(o.seconds for o in outcomes if not o.skipped and not o.error)
    print(
        f"tagged {count(len(outcomes) - len(failed) - skipped, 'file')} ({tagged_s / 3600:.2f} h of audio in "
        f"{wall:.1f} s, "
        f"{tagged_s / max(wall, 1e-9):.0f}x real time), {skipped} already done, {len(failed)} failed; "
        f"summary in {tables.summary}",
        file=sys.stderr,
    )
    _say_each("error", failed, lambda o: o.error, tables.errors)
    _say_each("warning", [o for o in outcomes if o.warning], lambda o: o.warning, tables.summary)
    retagged = sum(o.retagged and not o.error for o in outcomes)  # of the files tagged: a failed one is not
    if retagged:
        print(
            f"streamtag tag: note: {retagged} of the files tagged had been finished before with other settings, "
            "as an older version of the file, with outputs since deleted, or by an older streamtag (markers "
            "without settings): tagged again "
            "(their earlier outputs replaced)",
            file=sys.stderr,
        )
    links = [f for f in passed_over if f.is_symlink()]  # a folder's links: to folders, or broken
    special = [f for f in passed_over if not f.is_symlink() and f.exists() and not f.is_file()]
    others = [f for f in passed_over if not f.is_symlink() and f not in special]
    if special:  # a named pipe, a socket, a device: whatever its name, not a file to read to its end
        print(
            f"streamtag tag: note: {count(len(special), 'entry', 'entries')} in the folders given "
            f"{'is' if len(special) == 1 else 'are'} not a regular file (a named pipe, a socket or a device; e.g. "
            f"{special[0]}); tag a pipe as - --name NAME, fed on stdin",
            file=sys.stderr,
        )
    if others:
        kinds = ", ".join(sorted({f.suffix.lower() or "no extension" for f in others}))
        piped = [f for f in others if f.suffix.lower() in FFMPEG_SUFFIXES]  # a manifest would not help these
        how = ["list them in a manifest to tag them"] if len(piped) < len(others) else []
        if piped:
            how.append(f"{piped[0].suffix} files through ffmpeg: ffmpeg -i FILE -f wav - | streamtag tag - --name N")
        how = "; ".join(how)
        print(
            f"streamtag tag: note: {count(len(others), 'file', 'files')} of the folders given "
            f"{'was' if len(others) == 1 else 'were'} not tagged: an extension tag does not read ({kinds}; e.g. "
            f"{others[0]}); "
            f"{how}",
            file=sys.stderr,
        )
    if tables.gone:
        print(
            f"streamtag tag: note: {count(len(tables.gone), 'file')} in {tables.summary} from earlier runs "
            f"{'is' if len(tables.gone) == 1 else 'are'} no longer at the path tagged from (deleted or moved; e.g. "
            f"{tables.gone[0]}): the rows stay until their outputs under {out} are deleted",
            file=sys.stderr,
        )
    if tables.other:
        print(
            f"streamtag tag: note: {count(len(tables.other), 'file')} in {tables.summary} "
            f"{'was' if len(tables.other) == 1 else 'were'} tagged by earlier runs with other settings (model, "
            f"event settings or --scores; e.g. {tables.other[0]}): tag them with these to make it alike",
            file=sys.stderr,
        )
    if tables.twice:
        first, second = tables.twice[0]
        print(
            f"streamtag tag: note: {count(len(tables.twice), 'recording')} in {tables.summary} "
            f"{'is' if len(tables.twice) == 1 else 'are'} there twice, under two names (e.g. {first} and {second}: "
            "a folder given at two levels into one --out); delete one's outputs to count each once",
            file=sys.stderr,
        )
    if links:
        print(
            f"streamtag tag: note: {len(links)} link(s) in the folders given were not followed (links to folders, "
            f"which may loop, and broken links; e.g. {links[0]}); give a linked folder by its own path to tag it",
            file=sys.stderr,
        )
    if interrupted is not None:
        if items and items[0].opener is not None:  # stdin cannot be read again: what came is kept
            kept = any(not o.error for o in outcomes)
            print(
                "streamtag tag: stopped; stdin's audio up to the stop is tagged (its open events closed as interrupted)"
                if kept
                else "streamtag tag: stopped before stdin gave a hop of audio; nothing was written",
                file=sys.stderr,
            )
        elif lost is not None:
            print(
                f"streamtag tag: error: {lost}; {len(unfinished)} of {count(len(items), 'file')} not finished "
                "(nothing half-written was kept): run the same command again once the cluster is back",
                file=sys.stderr,
            )
            return lost.exit_code
        elif not unfinished:
            print(
                f"streamtag tag: interrupted after all {count(len(items), 'file')} had finished; nothing is left",
                file=sys.stderr,
            )
        else:
            print(
                f"streamtag tag: interrupted; {len(unfinished)} of {count(len(items), 'file')} not finished "
                "(nothing half-written was kept); "
                + (
                    "--force tags every file again: run it again to redo them all"
                    if args.force
                    else "run the same command again to tag them"
                ),
                file=sys.stderr,
            )
        code = stop_exit_code(interrupted)  # 130 for Ctrl-C; a SIGTERM's 0 unless files failed
        return 1 if failed and code == 0 else code
    return 1 if failed else 0


def _say_each(kind: str, outcomes: list, what, table: Path, most: int = 5) -> None:
    """One line per file for the first few, then where the rest are listed."""
    for o in outcomes[:most]:
        text = what(o)
        print(f"streamtag tag: {kind}: {text if o.path in text else f'{o.path}: {text}'}", file=sys.stderr)
    if len(outcomes) > most:
        print(f"streamtag tag: ... and {len(outcomes) - most} more in {table}", file=sys.stderr)


def _stdin_item(args, out: Path):
    """``tag -``: stdin as one file named ``--name`` (its outputs under ``out``), a WAV stream or raw PCM as
    ``replay -`` reads it."""
    from ..archive import Item, name_limit, name_too_long
    from ..sources.pipe import PipeSource, stdin_stream
    from .run import raw_pcm

    if args.inputs != ["-"]:
        raise ConfigError("- (stdin) is tagged alone: give it as the only INPUT")
    fmt = raw_pcm(args, from_stdin=True)
    if not args.name.strip() or "/" in args.name or args.name.startswith("."):
        raise ConfigError(f"--name {args.name!r}: give a plain file name for stdin's outputs")
    why = name_too_long(args.name, name_limit(out))
    if why:
        raise ConfigError(f"--name is too long: {why}; give a shorter one")
    stream = stdin_stream()
    pipe = {}

    def opener(rate):
        if "source" not in pipe:
            pipe["source"] = PipeSource(stream, rate, fmt, speed=0)
        return pipe["source"]

    if fmt is None:  # a bad WAV header fails here, one line, before any output is opened
        from ..modelfile import load_config, resolve_model_dir

        opener(load_config(resolve_model_dir(args.model)).features.sample_rate)
    return Item(Path("-"), args.name, opener)


class _Progress:
    """Files done, audio hours, and audio hours per second of wall time."""

    def __init__(self, total: int, enabled: bool) -> None:
        self.bar = None
        self.hours = 0.0
        self.started = time.perf_counter()
        if enabled:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

            self.bar = Progress(
                TextColumn("tagging"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[audio]}"),
                TimeElapsedColumn(),
                transient=True,
            )
            self.task = self.bar.add_task("tag", total=total, audio="")
            self.bar.start()

    def update(self, outcome) -> None:
        if self.bar is None:
            return
        self.hours += outcome.seconds / 3600
        rate = self.hours / max(time.perf_counter() - self.started, 1e-9)
        self.bar.update(self.task, advance=1, audio=f"{self.hours:.2f} h audio, {rate * 3600:.0f}x real time")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()
