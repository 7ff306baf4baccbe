"""Tag whole archives: many files at once as streams of one batched pool, resumably.

A file is one stream: decoded a second at a time (constant memory for hours-long
files), fed to its own :class:`~streamtag.engine.StreamTagger` on a slot of one
:class:`~streamtag.multistream.MultiStreamTagger`, so every model call steps one hop
of up to ``width`` files together. One file alone is stepped through the chunk graph
instead, 128 hops a call (batching over time). Probabilities and events are those of
``streamtag replay`` of the same file (to float rounding; the same events). Both kinds of
batch cost about the same per hop of audio (15-18 us on this project's machine at 16-64
streams, or 128 hops), so a pool of files loses nothing to time batching, and one long
file no longer pays the single-stream hop's 0.1 ms.

Per file, under ``out``: ``<name>.events.jsonl``, ``<name>.labels.txt`` (Audacity
labels), optionally ``<name>.scores.tsv``, and last ``<name>.done.json``, the marker
a rerun skips on. The marker names what the outputs depend on (the file's size and
time, the model, the event settings, ``--scores``): a rerun tags a file again when any
of that changed, rather than keep outputs that no longer match the command. Everything
is written to a temporary name and renamed, so a stopped run leaves finished files or
nothing. ``summary.csv`` (and Parquet) lists every finished file under ``out``, from
the markers; ``errors.csv`` the files of this run that failed, one line each.
"""

from __future__ import annotations

import codecs
import contextlib
import csv
import dataclasses
import hashlib
import json
import os
import signal
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from queue import Empty

import numpy as np

from .backends import one_thread
from .errors import AudioFileError, ConfigError
from .events import EventDetector, model_detector
from .multistream import MultiStreamTagger
from .outputs.files import event_line, scores_header, scores_line, valid_utf8
from .sources.file import AUDIO_SUFFIXES, WavReplaySource, is_url
from .steps import Step, StepBlock, write_to

MANIFEST_SUFFIXES = (".csv", ".txt", ".lst")
STOP_SIGNALS = {signal.SIGINT, signal.SIGTERM}
DONE = ".done.json"
OUTPUTS = {"events": ".events.jsonl", "labels": ".labels.txt", "scores": ".scores.tsv"}  # a file's, by kind
FIRST_OUTPUTS = (OUTPUTS["events"], OUTPUTS["labels"])  # what every done file has (older markers list none)
TOP_LABELS = 3


@dataclasses.dataclass(frozen=True)
class Item:
    """One file to tag and the name its outputs take under ``out`` (its path below the folder given).

    ``opener(rate)``, when set, makes the source instead of decoding ``path`` (``tag -`` reads stdin);
    ``listed_in``: the manifest that listed it (named when the file is missing)."""

    path: Path
    name: str
    opener: Callable[[int], object] | None = dataclasses.field(default=None, compare=False)
    listed_in: str | None = dataclasses.field(default=None, compare=False)


_URL_FIX = (
    "a URL, not a file; tag reads files (download it first) or stdin: "
    "ffmpeg -i URL -f wav - | streamtag tag - --name NAME (a live stream: streamtag serve pulls it)"
)


def find_inputs(
    inputs: Sequence[str | os.PathLike], passed_over: list[Path] | None = None, out: str | os.PathLike | None = None
) -> list[Item]:
    """Files, folders (searched recursively for audio) and manifests (``.csv`` with a ``path`` column, or
    ``.txt``/``.lst`` with one path a line; relative paths are taken from the manifest's folder). A file listed
    twice is tagged once. ``passed_over`` receives what a folder search left out and the user may want:
    files whose extension is not audio (a manifest can still list them), links to folders (not followed: a
    link back up would loop) and broken links. Hidden files and folders (``.git``, macOS ``._x.wav``) and the
    output folder ``out`` are never searched."""
    items: list[Item] = []
    skip = Path(out).resolve() if out is not None else None
    for given in inputs:
        if is_url(given):
            raise ConfigError(f"{given}: {_URL_FIX}")
        p = Path(given)
        if p.is_dir():
            found = _search(p, skip, passed_over if passed_over is not None else [])
            if not found:
                raise ConfigError(f"{p}: no audio files in this folder ({', '.join(AUDIO_SUFFIXES)})")
            items += [Item(f, str(Path(p.resolve().name) / f.relative_to(p))) for f in found]
        elif p.suffix.lower() in MANIFEST_SUFFIXES and p.is_file():
            items += [Item(f, _name_in(f, p.parent), listed_in=str(p)) for f in _manifest(p)]
        elif p.is_file():
            items.append(Item(p, p.name))
        elif p.exists():  # a named pipe, <(...), a device: one stream, which - reads
            raise ConfigError(f"{p} is a pipe or a device, not a file: tag it as - --name NAME, fed on stdin")
        else:
            raise ConfigError(f"{p}: no such file or folder")
    seen: dict[str, Item] = {}
    files: set[Path] = set()
    unique = []
    for item in items:
        real = item.path.resolve()
        if real in files:  # the same file twice (listed, or also in a folder given): tagged once
            continue
        other = seen.setdefault(item.name, item)
        if other is not item:
            if item.listed_in or other.listed_in:  # a manifest names its files by their paths below its folder
                fix = "list them in one manifest in a folder above both, or tag them into separate --out folders"
            elif "/" not in item.name:  # two files given by themselves
                fix = "give their folders instead (outputs keep the path below each folder)"
            else:
                fix = (
                    "give folders above these that differ in name (outputs keep the path from each folder given "
                    "down, its own name first), or tag them into separate --out folders"
                )
            raise ConfigError(f"{other.path} and {item.path} would both write outputs named '{item.name}': {fix}")
        files.add(real)
        unique.append(item)
    return unique


def _search(folder: Path, skip: Path | None, passed_over: list[Path]) -> list[Path]:
    """The audio files below ``folder``, sorted; what is left out but worth a word goes to ``passed_over``."""
    found = []

    def unreadable(exc: OSError) -> None:  # a folder os.walk cannot list: said, never skipped in silence
        raise ConfigError(
            f"{exc.filename}: cannot read this folder ({exc.strerror or exc}); fix its permissions, or tag the "
            "other folders by their own paths"
        )

    for root, dirs, names in os.walk(folder, onerror=unreadable):  # links to folders: not walked (followlinks=False)
        here = Path(root)
        for d in sorted(dirs):
            if d.startswith(".") or (skip is not None and (here / d).resolve() == skip):
                dirs.remove(d)
            elif (here / d).is_symlink():
                passed_over.append(here / d)
        for n in names:
            f = here / n
            if n.startswith(".") or (skip is not None and _is_output(f, skip)):
                continue
            if not f.is_file():  # a broken link (or a socket, a FIFO)
                passed_over.append(f)
            elif f.suffix.lower() in AUDIO_SUFFIXES:
                found.append(f)
            else:
                passed_over.append(f)
    passed_over.sort()
    return sorted(found)


OUTPUT_ENDINGS = (*OUTPUTS.values(), DONE, ".part")  # what tag writes per file


def _is_output(f: Path, out: Path) -> bool:
    """Whether ``f`` is one of tag's outputs in the output folder (``--out`` is the folder given: its outputs sit
    among the recordings, and are neither tagged nor listed as passed over)."""
    if f.name in (*TABLES, "summary.parquet"):
        return f.parent.resolve() == out
    return f.name.endswith(OUTPUT_ENDINGS) and out in f.resolve().parents


def _name_in(path: Path, folder: Path) -> str:
    """The output name of a manifest's file: its path below the manifest's folder, else folder/name."""
    try:
        return str(path.resolve().relative_to(folder.resolve()))
    except ValueError:
        return str(Path(path.parent.name) / path.name) if path.parent.name else path.name


def _manifest(path: Path) -> list[Path]:
    base = path.parent
    with open(path, "rb") as f:
        utf16 = f.read(2) in (codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)  # Excel's "Unicode text"
    # UTF-8 (-sig: the byte-order mark Excel starts a CSV with); bytes that are not UTF-8 are kept as the file
    # system's own (a listing made by find of names in another encoding names those files)
    encoding, errors = ("utf-16", "strict") if utf16 else ("utf-8-sig", "surrogateescape")
    try:
        rows = _manifest_rows(path, encoding, errors)
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not a readable UTF-16 text (it starts like one); save it as UTF-8") from None
    url = next((row for row in rows if is_url(row)), None)
    if url is not None:
        raise ConfigError(f"{path} lists {url}: {_URL_FIX}")
    out = [p if p.is_absolute() else base / p for p in map(Path, rows)]
    if not out:
        raise ConfigError(f"{path}: the manifest lists no files")
    return out


def _manifest_rows(path: Path, encoding: str, errors: str) -> list[str]:
    """The paths a manifest lists, as written (a CSV's ``path`` column, or a text file's lines), trimmed."""
    with open(path, newline="", encoding=encoding, errors=errors) as f:
        if path.suffix.lower() != ".csv":
            return [line.strip() for line in f if line.strip() and not line.startswith("#")]
        reader = csv.DictReader(f)
        column = next((k for k in reader.fieldnames or () if k.strip().lower() == "path"), None)
        if column is None:
            raise ConfigError(f"{path}: a manifest CSV needs a 'path' column ({reader.fieldnames} found)")
        return [row[column].strip() for row in reader if row[column] and row[column].strip()]


@dataclasses.dataclass
class Outcome:
    """What tagging one file gave (one summary row)."""

    name: str
    path: str
    seconds: float = 0.0
    events: dict[str, int] = dataclasses.field(default_factory=dict)  # opened events per label
    top: list[tuple[str, float]] = dataclasses.field(default_factory=list)  # highest mean probabilities
    error: str | None = None
    warning: str | None = None  # tagged, with something to know (NaN samples replaced)
    skipped: bool = False  # finished by an earlier run
    retagged: bool = False  # finished before, with other settings or an older file or streamtag: tagged again
    worker_lost: bool = False  # failed because the worker tagging it was lost (a Ray actor), not for the file

    def row(self) -> dict[str, object]:
        return {
            "name": self.name,
            "path": self.path,
            "seconds": round(self.seconds, 3),
            "events": sum(self.events.values()),
            "events_by_label": ";".join(f"{k}:{v}" for k, v in sorted(self.events.items())),
            "top_labels": ";".join(f"{k}:{p:.3f}" for k, p in self.top),
            "error": self.error or "",
            "warning": self.warning or "",
        }


class _Job:
    """One file in flight: its decoder, its partial outputs and its running sums."""

    def __init__(
        self, item: Item, out: Path, rate: int, hop: int, scores: bool, labels: Sequence[str], stamp: dict
    ) -> None:
        self.item, self.marker, self.stamp = item, done_marker(out, item), stamp
        self.retagged = False
        self.engine = None  # the StreamTagger that steps it, for its input statistics
        if item.opener is not None:
            self.source = item.opener(rate)
        else:
            self.source = WavReplaySource(item.path, rate, speed=0, min_samples=hop)  # AudioFileError: a bad file
        self.chunks: Iterator[np.ndarray] = iter(self.source.chunks())
        base = out / item.name
        base.parent.mkdir(parents=True, exist_ok=True)
        kinds = ("events", "labels", "scores") if scores else ("events", "labels")
        self.final = {k: _with(base, OUTPUTS[k]) for k in kinds}
        self.stale = [] if scores else [_with(base, OUTPUTS["scores"])]  # an earlier run's, not written by this one
        self.files = {k: open(_tmp(p), "w", encoding="utf-8") for k, p in self.final.items()}
        if scores:
            self.files["scores"].write(scores_header(labels))
        self.labels = labels
        self.sums = np.zeros(len(labels), np.float64)
        self.frames = 0
        self.events: dict[str, int] = {}

    def broke_off(self) -> bool:
        """Whether its decoding ended in an error (a truncated file): its open events close as ``interrupted``."""
        return bool(self.source.error)

    def write(self, step: Step) -> None:
        if step.has_scores:
            self.sums += step.probs
            self.frames += 1
            if "scores" in self.files:
                self._score_row(step.onset, step.t, step.probs)
        self._events(step.events)

    def write_block(self, block: StepBlock) -> None:
        """A block's hops at once: the running sums in one reduction, events as they come."""
        self.sums += block.probs.sum(axis=0, dtype=np.float64)
        self.frames += len(block)
        if "scores" not in self.files:
            for i in sorted(block.events):
                self._events(block.events[i])
            return
        for i in range(len(block)):
            self._score_row(block.t(i) - block.frame_seconds, block.t(i), block.probs[i])
            self._events(block.events.get(i, ()))

    def _score_row(self, onset: float, end: float, probs: np.ndarray) -> None:
        self.files["scores"].write(scores_line(onset, end, probs))

    def _events(self, events) -> None:
        source = self.item.name if self.item.opener is not None else str(self.item.path)
        for event in events:  # the rows replay --events writes
            self.files["events"].write(event_line(event, source))
            if event.kind == "open":
                self.events[event.label] = self.events.get(event.label, 0) + 1
            elif event.offset is not None:  # Audacity: start, end, label
                self.files["labels"].write(f"{event.onset:.3f}\t{event.offset:.3f}\t{event.label}\n")

    def finish(self, frame_seconds: float) -> Outcome:
        """Close and rename the outputs; the done marker goes last."""
        for f in self.files.values():
            f.close()
        outcome = Outcome(self.item.name, str(self.item.path), self.frames * frame_seconds, dict(self.events))
        outcome.retagged = self.retagged
        if self.frames:
            mean = self.sums / self.frames
            outcome.top = [(self.labels[i], float(mean[i])) for i in np.argsort(-mean)[:TOP_LABELS]]
        outcome.warning = self._warning()
        if not self.frames:  # an earlier run's outputs (and marker) stay: they are still what they say
            outcome.error = self.source.error or "no audio (less than one hop)"
            self.discard()
            return outcome
        # the old marker goes first: from here to the new one, the outputs are not those it describes
        self.marker.unlink(missing_ok=True)
        for path in self.final.values():
            os.replace(_tmp(path), path)
        for path in self.stale:
            path.unlink(missing_ok=True)
        if self.source.error:  # cut short (a truncated file): what was read is kept, but the file is not done
            outcome.error = self.source.error
            return outcome
        outputs = sorted(OUTPUTS[k] for k in self.final)
        given = os.path.abspath(self.item.path)  # the path as given: a link pointed elsewhere since is still it
        marker = {**dataclasses.asdict(outcome), **self.stamp, "outputs": outputs, "given": given}
        _write_atomic(self.marker, json.dumps(marker))
        return outcome

    def _warning(self) -> str | None:
        """What to know about the input, as replay says it: samples replaced or clipped, silence."""
        parts = []
        nonfinite = self.source.status.nonfinite_samples
        if getattr(self.source, "warning", None):  # stdin's: a part-frame at its end
            parts.append(self.source.warning)
        if nonfinite:
            parts.append(f"{nonfinite} NaN/Inf samples were replaced by 0")
        stats = self.engine.stats if self.engine is not None else None
        if stats is not None and self.frames:
            problems = stats.problems(overshoot=False)  # a lossy file's few samples over: not worth a column
            if problems:
                parts.append(problems)
            if stats.peak == 0:
                parts.append("digital silence: every sample is 0 (is this the right file or channel?)")
            elif stats.peak_dbfs < -50:
                parts.append(f"very quiet input (peak {stats.peak_dbfs:.1f} dBFS): check the recording's level")
        return "; ".join(parts) or None

    def discard(self) -> None:
        for key, f in self.files.items():
            with contextlib.suppress(OSError):  # its buffer cannot be written (a full disk): it goes anyway
                f.close()
            _tmp(self.final[key]).unlink(missing_ok=True)


def _with(base: Path, suffix: str) -> Path:
    return base.with_name(base.name + suffix)


def _tmp(path: Path) -> Path:
    return path.with_name(path.name + ".part")


@contextlib.contextmanager
def _replaced(path: Path) -> Iterator[Path]:
    """Write ``path`` under its temporary name and rename it once written: a stop midway (a Ctrl-C as the
    summary is written) leaves the file as it was and no ``.part`` behind."""
    tmp = _tmp(path)
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _write_atomic(path: Path, text: str) -> None:
    with _replaced(path) as tmp:
        tmp.write_text(text + "\n", encoding="utf-8")


def done_marker(out: Path, item: Item) -> Path:
    return _with(out / item.name, DONE)


def finished(out: Path, item: Item, key: str, begun: float, force: bool = False) -> bool:
    """Whether a run begun at ``begun`` (``time.time()``) with settings ``key`` has nothing left to do for
    ``item``: its done marker was written by the run, or (without ``--force``) matches the file and ``key``.
    What an interrupted run counts as finished, whatever its workers had reported."""
    marker = done_marker(out, item)
    if marked_since(marker, begun):
        return True
    if force or item.opener is not None:
        return False
    try:
        return _finished(marker, _stamp(item, key)) is not None
    except OSError:
        return False


def settled(items: Sequence[Item], out: Path, key: str, begun: float, force: bool = False) -> list[Outcome]:
    """The outcomes, read from their done markers, of ``items`` that are finished though no worker reported them
    (a stop came first): tagged by this run, or (``skipped``) done before with the same file and settings."""
    outcomes = []
    for item in items:
        if finished(out, item, key, begun, force):
            marker = done_marker(out, item)
            outcome = _finished(marker) or Outcome(item.name, str(item.path))
            outcome.skipped = not marked_since(marker, begun)
            outcomes.append(outcome)
    return outcomes


LONGEST_ENDING = ".events.jsonl.part"  # the longest name tag gives a file's output: its name and this


def name_limit(out: Path) -> int:
    """The longest file name, in bytes, that ``out``'s file system takes (asked of its nearest existing folder)."""
    folder = Path(out).absolute()
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    try:
        return os.pathconf(folder, "PC_NAME_MAX")
    except (OSError, ValueError, AttributeError):  # not said (Windows): the usual limit
        return 255


def name_too_long(name: str, limit: int) -> str | None:
    """Why the file system would refuse the outputs' names of a file named ``name`` (its name and
    ``.events.jsonl.part`` over ``limit`` bytes); ``None`` when they fit."""
    size = len(os.fsencode(Path(name).name + LONGEST_ENDING))
    if size <= limit:
        return None
    return f"its outputs' names would be {size} bytes long, more than the {limit} the file system of --out takes"


def names_too_long(items: Sequence[Item], out: Path) -> tuple[list[Outcome], list[Item]]:
    """``items`` split into the failed outcomes of those whose outputs' names the file system would refuse, and
    the rest: such a file fails alone, saying why (it made every file of its worker fail, and the next run stop
    with a traceback)."""
    limit = name_limit(out)
    failed, rest = [], []
    for item in items:
        why = name_too_long(item.name, limit)
        if why is None:
            rest.append(item)
        else:
            fix = "give it a shorter name, or tag it as - --name NAME on stdin"
            failed.append(Outcome(item.name, str(item.path), error=f"{why}: {fix}"))
    return failed, rest


def done_before(items: Sequence[Item], out: Path, key: str) -> tuple[list[Outcome], list[Item]]:
    """``items`` split into the outcomes of those an earlier run finished with settings ``key`` (their done markers
    match the file and its outputs are there) and the rest: what a run sets aside before it starts workers that
    cost seconds (Ray), so a rerun of a finished archive does not start them. A file that cannot be looked at is
    left to its job, which says why."""
    outcomes, rest = [], []
    for item in items:
        try:
            stamp = None if item.opener is not None else _stamp(item, key)
        except OSError:
            stamp = None
        done = _finished(done_marker(out, item), stamp) if stamp is not None else None
        if done is None:
            rest.append(item)
        else:
            outcomes.append(done)
    return outcomes, rest


def marked_since(marker: Path, begun: float) -> bool:
    """Whether a done marker was written since ``begun`` (``time.time()``), by this run: an older one may be
    stale (other settings, a changed file) until the run looks at its file."""
    try:
        return marker.stat().st_mtime >= begun - 0.05  # the kernel stamps files from a clock a tick behind
    except OSError:
        return False


def tag_archive(
    items: Iterable[Item],
    out: str | os.PathLike,
    model: str | os.PathLike | None = None,
    backend: str = "onnx",
    width: int = 64,
    scores: bool = False,
    detector: Callable[[], EventDetector] | None = None,
    force: bool = False,
    progress: Callable[[Outcome], None] | None = None,
    multi: MultiStreamTagger | None = None,
) -> list[Outcome]:
    """Tag every item not finished yet (all with ``force``), ``width`` files at a time; returns one outcome
    per item, in order of completion. ``detector()`` makes each file's event detector (default thresholds
    when ``None``); ``progress(outcome)`` is called as each file ends. ``multi``: a pool to reuse (a Ray
    actor keeps one across batches); every stream has left it again when this returns."""
    out = Path(out)
    items = list(items)
    if multi is None and len(items) == 1:  # one stream: the chunk step, 128 hops a call, beats a pool of one
        return _tag_alone(items[0], out, model, backend, scores, detector, force, progress)
    if multi is None:
        multi = MultiStreamTagger(model, backend, capacity=width, events=detector or True, **one_thread(backend))
    feats = multi.backend.config.features
    key = settings_key(multi.backend.folder, multi.labels, feats.frame_seconds, scores, detector)
    outcomes: list[Outcome] = []

    def ended(outcome: Outcome) -> None:
        outcomes.append(outcome)
        if progress is not None:
            progress(outcome)

    queue = items[::-1]  # pop() takes them in the order given
    active: dict[str, _Job] = {}
    try:
        while queue or active:
            _check_stop()
            while queue and len(active) < width:
                _check_stop()  # thousands of finished files can come one after another
                item = queue.pop()
                job = _open_job(item, out, force, feats, scores, multi.labels, key)
                if isinstance(job, Outcome):
                    ended(job)
                    continue
                job.engine = multi.join(item.name)
                active[item.name] = job
            for name, job in list(active.items()):
                chunk = next(job.chunks, None)
                if chunk is None:
                    for step in multi.leave(name, "interrupted" if job.broke_off() else "stream_end"):
                        job.write(step)
                    ended(job.finish(feats.frame_seconds))
                    del active[name]
                else:
                    multi.feed(name, chunk)
            for name, item in multi.step_blocks():
                write_to(active[name], item)
    except BaseException:  # stopped (Ctrl-C, SIGTERM) or failed: no half-written outputs, the pool left empty
        for name, job in active.items():
            job.discard()
            with contextlib.suppress(Exception):
                multi.leave(name)
        raise
    return outcomes


def _tag_alone(item: Item, out: Path, model, backend: str, scores: bool, detector, force: bool, progress):
    """One file through one engine on the backend's own (lockstep) state, each decoded block as one backlog
    (the chunk graph): the same steps as in a pool."""
    from .backends import make_backend
    from .engine import StreamTagger, drive
    from .modelfile import load_config, resolve_model_dir

    folder = resolve_model_dir(model)
    cfg = load_config(folder)  # the model loads only when there is something to tag
    key = settings_key(folder, cfg.labels, cfg.features.frame_seconds, scores, detector)
    outcome = job = _open_job(item, out, force, cfg.features, scores, cfg.labels, key)
    if isinstance(job, _Job):
        try:
            engine = StreamTagger(make_backend(backend, model, **one_thread(backend)), events=detector or True)
            job.engine = engine
            drive(engine, _until_stopped(job.chunks), [job], broke_off=job.broke_off)
        except KeyboardInterrupt:
            if item.opener is not None and job.engine is not None:
                _keep_stopped_stdin(job, cfg.features.frame_seconds, progress)
            else:
                job.discard()  # a file is tagged again by the next run: no half-written outputs left behind
            raise
        except BaseException:
            job.discard()  # no half-written outputs left behind
            raise
        outcome = job.finish(cfg.features.frame_seconds)
    if progress is not None:
        progress(outcome)
    return [outcome]


def _keep_stopped_stdin(job: _Job, frame_seconds: float, progress) -> None:
    """stdin cannot be read again: what came before a stop is kept, its open events closed as interrupted. With
    nothing stepped there is nothing to keep, and the stop is no failure; a second stop meanwhile keeps nothing
    half-written either."""
    try:
        for step in job.engine.finish("interrupted"):
            job.write(step)
        if not job.frames:
            job.discard()
            return
        outcome = job.finish(frame_seconds)
    except BaseException:
        job.discard()
        raise
    outcome.warning = "; ".join(filter(None, ["stopped before stdin ended: tagged up to the stop", outcome.warning]))
    if progress is not None:
        progress(outcome)


def settings_key(folder: Path, labels: Sequence[str], frame_seconds: float, scores: bool, detector) -> str:
    """What a file's outputs depend on besides its audio, as one digest: the model's files, every event
    setting (``detector()``'s, else the model's events.toml) and whether frame scores are written."""
    digest = hashlib.sha256()
    for name in ("config.json", "model.safetensors", "model.onnx"):
        path = Path(folder) / name
        if path.is_file():
            digest.update(name.encode() + path.read_bytes())
    events = detector() if detector is not None else None
    if not isinstance(events, EventDetector):
        events = model_detector(folder, labels, frame_seconds)
    digest.update(events.describe().encode() + (b"scores" if scores else b""))
    return digest.hexdigest()[:20]


def _stamp(item: Item, key: str) -> dict:
    """What a done marker records its outputs depend on: the settings ``key`` and the file (:func:`_identity`)."""
    return {"settings": key, "file": _identity(item)}


def _identity(item: Item) -> dict | None:
    """The file a marker was written for: a file of the same name elsewhere, or this one changed, is not it."""
    if item.opener is not None:
        return None
    st = item.path.stat()
    return {"path": str(item.path.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def _open_job(item: Item, out: Path, force: bool, feats, scores: bool, labels, key: str) -> _Job | Outcome:
    """The job for one item, or its outcome when there is nothing to tag: finished by an earlier run with
    the same settings (its done marker says so; stdin is new audio every time), or not readable."""
    marker = done_marker(out, item)
    try:
        stamp = _stamp(item, key)
    except FileNotFoundError:
        where = f"listed in {item.listed_in}" if item.listed_in else "given"
        error = f"{item.path} is {where} but missing"
        if item.listed_in and not str(item.path).isprintable():  # a byte that is not UTF-8 in the manifest
            error += " (the manifest is not UTF-8 text: save it as UTF-8)"
        return Outcome(item.name, str(item.path), error=error)
    except OSError as exc:
        return Outcome(item.name, str(item.path), error=_one_line(exc))
    retagged = False
    if marker.is_file() and not force and item.opener is None:
        done = _finished(marker, stamp)
        if done is not None:
            return done
        retagged = True  # said in the run's last lines: an archive tagged again is hours, not a surprise
    try:
        job = _Job(item, out, feats.sample_rate, feats.hop_length, scores, labels, stamp)
    except (AudioFileError, OSError) as exc:
        error = _one_line(exc)
        # what an earlier run left is of another version of the file, which cannot be read now: it goes, or a later
        # run's summary (built from the markers) listed the file as tagged; not for a failure of our own (a full
        # disk) or for new settings alone, where the outputs still say what the file holds
        if retagged and isinstance(exc, AudioFileError) and (_marker_data(marker) or {}).get("file") != stamp["file"]:
            _drop_finished(marker)
            error += "; the outputs of its earlier version were removed"
        return Outcome(item.name, str(item.path), error=error)
    job.retagged = retagged  # the old marker stays until the new outputs are in place (a stop keeps it)
    return job


def _marker_data(marker: Path) -> dict | None:
    """A done marker's contents; None when it is missing, unreadable or not one of ours."""
    try:
        data = json.loads(marker.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _drop_finished(marker: Path) -> None:
    """A done marker and every output a file can have, gone."""
    base = marker.parent / marker.name[: -len(DONE)]
    marker.unlink(missing_ok=True)  # first: from here on no output claims to be finished
    for output in OUTPUTS.values():
        _with(base, output).unlink(missing_ok=True)


def _finished(marker: Path, stamp: dict | None = None, data: dict | None = None) -> Outcome | None:
    """The outcome a done marker keeps (``data``: its contents, when read already); ``None`` when it is
    unreadable or, given ``stamp``, was written for other settings or another version of the file (the file is
    tagged again)."""
    data = _marker_data(marker) if data is None else data
    if data is None:
        return None
    try:
        if stamp is not None and any(data.get(k) != v for k, v in stamp.items()):
            return None
        base = marker.parent / marker.name[: -len(DONE)]
        if stamp is not None and not all(_with(base, o).is_file() for o in data.get("outputs", FIRST_OUTPUTS)):
            return None  # an output deleted since: made again
        outcome = Outcome(**{k: data[k] for k in ("name", "path", "seconds", "events", "error")})
        outcome.top = [tuple(x) for x in data.get("top", [])]
        outcome.warning = data.get("warning")
    except (OSError, ValueError, KeyError, TypeError):
        return None
    outcome.skipped = True
    return outcome


LOCK = ".streamtag-tag.lock"  # hidden: never searched as an input


def lock_out(out: Path):
    """Hold ``out`` for this run (an open file with an exclusive lock, released when the process ends): two runs
    into one folder at once renamed each other's half-written outputs away and one died with a traceback."""
    try:
        import fcntl
    except ImportError:  # Windows: no advisory locks here; runs into one folder at once are the user's to avoid
        return None
    f = open(out / LOCK, "a+", encoding="utf-8")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        f.seek(0)
        holder = f.read().strip() or "another process"
        f.close()
        raise ConfigError(
            f"--out {out} is in use by another streamtag tag run ({holder}); wait for it to end, or give another --out"
        ) from None
    f.seek(0)
    f.truncate()
    f.write(f"pid {os.getpid()}\n")
    f.flush()
    return f


def _one_line(exc: BaseException) -> str:
    return str(exc).splitlines()[0] if str(exc) else type(exc).__name__


TABLES = {"summary.csv": ["name", "path", "seconds"], "errors.csv": ["name", "path", "error"]}  # how ours start


def check_out(items: Sequence[Item], out: Path, force: bool = False) -> None:
    """Refuse, before any work, what the run would otherwise meet file by file or overwrite unasked: a file
    where an output folder must go, a ``summary.csv``/``errors.csv`` that is not one of ours, and outputs of
    another file of the same name (another folder's ``rec/x.wav``) that a run without ``--force`` would replace."""
    for name, start in TABLES.items():
        path = out / name
        try:
            with open(path, newline="", encoding="utf-8") as f:
                header = next(csv.reader(f), [])
        except FileNotFoundError:
            continue
        except (OSError, UnicodeDecodeError, csv.Error):
            header = []
        if header[: len(start)] != start:
            raise ConfigError(
                f"--out {out}: {path} is not a table streamtag wrote, and a run writes its own there; "
                "move it away, or give another --out"
            )
    folders: set[Path] = set()
    for item in items:
        folders.update(Path(item.name).parents)
    for rel in sorted(folders):
        if (out / rel).exists() and not (out / rel).is_dir():
            raise ConfigError(
                f"--out {out}: {out / rel} is a file where a folder of outputs goes; "
                "move it away, or give another --out"
            )
    for item in items:  # a file of the user's own where an output goes (no marker: nothing says it is ours)
        base = out / item.name
        if item.opener is None and not done_marker(out, item).is_file():
            for ending in OUTPUTS.values():
                if not _ours(_with(base, ending)):
                    raise ConfigError(
                        f"--out {out}: {_with(base, ending)} is not a file streamtag wrote, and tagging "
                        f"{item.path} writes one there; move it away, or give another --out"
                    )
    if force:
        return
    for item in items:
        marker = done_marker(out, item)
        if item.opener is not None or not marker.is_file():
            continue
        other = _other_file(marker, item)
        if other:
            raise ConfigError(
                f"--out {out} already holds the results named '{item.name}' of another file, "
                f"{other}; give {item.path} another --out, or add --force to replace them"
            )


def _ours(path: Path) -> bool:
    """Whether ``path`` is missing or looks like an output of ours (a file cut short keeps its outputs and no
    marker): events as JSON lines with a schema, Audacity labels, a scores table."""
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            first = f.readline()
    except FileNotFoundError:
        return True
    except OSError:
        return False
    if not first:
        return True
    if path.name.endswith(OUTPUTS["events"]):
        return first.startswith('{"schema"')
    if path.name.endswith(OUTPUTS["scores"]):
        return first.startswith("onset\toffset\t")
    parts = first.rstrip("\n").split("\t")  # labels: start, end, label
    try:
        return len(parts) == 3 and float(parts[0]) <= float(parts[1])
    except ValueError:
        return False


def _other_file(marker: Path, item: Item) -> str | None:
    """The file a marker was written for, when that is another file that still exists: not a moved archive, and
    not a copy of this one (same size and modification time, as ``cp -p`` or rsync keep them)."""
    data = _marker_data(marker)
    if data is None:
        return None
    try:
        written_for, other = data["file"], data["file"]["path"]
        if other == str(item.path.resolve()) or not os.path.exists(other) or os.path.samefile(other, item.path):
            return None
        if data.get("given") == os.path.abspath(item.path):  # the same input path, a link now pointed elsewhere
            return None
        st = item.path.stat()
        if (written_for["size"], written_for["mtime_ns"]) == (st.st_size, st.st_mtime_ns):
            return None
        return other
    except (OSError, ValueError, TypeError, KeyError):  # unreadable, or an older marker naming no file
        return None


@dataclasses.dataclass
class Tables:
    """What :func:`write_tables` wrote, and what an analyst should know of the summary's rows (every finished
    file under ``--out``): of the files from earlier runs, those no longer at the path they were tagged from
    (deleted, moved) and those tagged with other settings; and pairs of names that are one recording tagged
    twice (its folder given at another level, or by itself)."""

    summary: Path
    errors: Path
    gone: list[str] = dataclasses.field(default_factory=list)
    other: list[str] = dataclasses.field(default_factory=list)
    twice: list[tuple[str, str]] = dataclasses.field(default_factory=list)


def write_tables(
    outcomes: Sequence[Outcome], out: str | os.PathLike, parquet: bool = False, key: str | None = None
) -> Tables:
    """``summary.csv`` (one row per finished file under ``out``: this run's and, from their markers, those
    of earlier runs; Parquet too when asked) and ``errors.csv`` (the files of this run that failed). ``key``,
    this run's settings: earlier rows of other settings are named in the result."""
    out = Path(out)
    tables = Tables(out / "summary.csv", out / "errors.csv")
    mine = {o.name for o in outcomes}
    names_of: dict[str, list[str]] = {}  # recording -> the names it is in the summary under
    for o in outcomes:  # this run's: from their paths (their markers are not read again)
        if not o.error and o.path != "-":
            names_of.setdefault(os.path.realpath(o.path), []).append(o.name)
    earlier = []
    for marker in sorted(out.rglob("*" + DONE)):
        name = str(marker.relative_to(out))[: -len(DONE)]
        if name in mine:
            continue
        data = _marker_data(marker)
        outcome = _finished(marker, data=data) if data is not None else None
        if outcome is None:
            continue
        earlier.append(outcome)
        source = (data.get("file") or {}).get("path")
        if source is not None:
            names_of.setdefault(source, []).append(name)
            if not os.path.exists(source):
                tables.gone.append(name)
                continue
        if key is not None and data.get("settings") != key:
            tables.other.append(name)
    tables.twice = [(names[0], names[1]) for names in names_of.values() if len(names) > 1]
    outcomes = [*outcomes, *earlier]
    rows = [o.row() for o in sorted(outcomes, key=lambda o: o.name)]
    fields = list(Outcome("", "").row())
    _write_csv(tables.summary, fields, [r for r in rows if not r["error"]])
    failed = [{k: r[k] for k in ("name", "path", "error")} for r in rows if r["error"]]
    _write_csv(tables.errors, ["name", "path", "error"], failed)
    if parquet:
        import pyarrow as pa
        import pyarrow.parquet as pq

        done = [{k: _cell(v) for k, v in r.items()} for r in rows if not r["error"]]
        table = pa.Table.from_pylist(done, schema=_parquet_schema(pa))
        with _replaced(out / "summary.parquet") as tmp:
            pq.write_table(table, tmp)
    return tables


def _cell(value):
    """A summary value for Parquet: text as valid UTF-8, an empty cell as null (as pandas and DuckDB read the
    CSV's: an '' answered `where warning is null` otherwise than the CSV did)."""
    return (valid_utf8(value) or None) if isinstance(value, str) else value


def _parquet_schema(pa):
    return pa.schema(
        [
            ("name", pa.string()),
            ("path", pa.string()),
            ("seconds", pa.float64()),
            ("events", pa.int64()),
            ("events_by_label", pa.string()),
            ("top_labels", pa.string()),
            ("error", pa.string()),
            ("warning", pa.string()),
        ]
    )


def _write_csv(path: Path, fields: list[str], rows: list[dict]) -> None:
    """A table any UTF-8 reader opens: a file name that is not UTF-8 is written with its odd bytes escaped."""
    with _replaced(path) as tmp, open(tmp, "w", newline="", encoding="utf-8", errors="backslashreplace") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)


def shards(items: Sequence[Item], n: int) -> list[list[Item]]:
    """``n`` shards of about equal bytes (largest files first, each to the lightest shard)."""
    loads = [0] * n
    out: list[list[Item]] = [[] for _ in range(n)]
    sized = sorted(items, key=lambda it: -(it.path.stat().st_size if it.path.is_file() else 0))
    for item in sized:
        k = loads.index(min(loads))
        out[k].append(item)
        loads[k] += item.path.stat().st_size if item.path.is_file() else 0
    return [s for s in out if s]


STOP = threading.Event()  # set by a worker process's SIGTERM; its tagging stops at the next safe point


def _check_stop() -> None:
    """Raise ``SystemExit`` where a stop leaves nothing behind (between rounds, between blocks): raised from the
    signal handler itself it could land anywhere, between a file's outputs opening and their being listed for
    removal, or inside a generator's clean-up, which swallows it and goes on."""
    if STOP.is_set():
        raise SystemExit(128 + signal.SIGTERM)


def _until_stopped(chunks: Iterable[np.ndarray]) -> Iterator[np.ndarray]:
    for chunk in chunks:
        _check_stop()
        yield chunk


def _shard_main(k: int, shard: list[Item], queue, kwargs: dict) -> None:
    """One worker process: ``(k, outcome)`` per file, then ``(k, None)``. Ctrl-C is the parent's to handle;
    SIGTERM (the parent stopping it) ends it through ``SystemExit`` at the next round, so its half-written
    outputs go."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)

    def stopped(signum, frame):  # what is still queued for a parent that stopped reading is not waited for
        queue.cancel_join_thread()
        STOP.set()

    signal.signal(signal.SIGTERM, stopped)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)  # blocked while it started
    reported: set[str] = set()

    def report(outcome: Outcome) -> None:
        reported.add(outcome.name)
        queue.put((k, outcome))

    try:
        tag_archive(shard, progress=report, **kwargs)
    except Exception as exc:  # a process that cannot go on reports the files it did not finish as failed
        for item in shard:
            if item.name not in reported:
                queue.put((k, Outcome(item.name, str(item.path), error=f"worker process failed: {_one_line(exc)}")))
    queue.put((k, None))


def tag_in_processes(
    items: Sequence[Item], jobs: int, progress: Callable[[Outcome], None] | None = None, **kwargs
) -> list[Outcome]:
    """:func:`tag_archive` in ``jobs`` local processes, each with its own backend and its share of the files."""
    import multiprocessing as mp

    parts = shards(items, jobs)
    if len(parts) <= 1:
        return tag_archive(items, progress=progress, **kwargs)
    ctx = mp.get_context("spawn")  # a fresh interpreter per process: no forked threads or sessions
    queue = ctx.Queue()
    procs = [
        ctx.Process(target=_shard_main, args=(k, part, queue, kwargs), daemon=True) for k, part in enumerate(parts)
    ]
    outcomes: list[Outcome] = []
    unreported = [{item.name: item for item in part} for part in parts]
    ended: set[int] = set()
    quiet: set[int] = set()  # found dead once with nothing in the queue: gone without a word if again

    def report(outcome: Outcome) -> None:
        outcomes.append(outcome)
        if progress is not None:
            progress(outcome)

    started: list = []
    try:
        # started with Ctrl-C and SIGTERM blocked (they inherit the mask and then ignore Ctrl-C: this process
        # stops them), and held: a signal can still reach another thread of this process (onnxruntime's), and
        # its handler would then raise in the middle of a start, leaving a half-started worker unstopped; a
        # Ctrl-C meanwhile is raised once they are all started, and the clause below stops them
        held: list[int] = []
        handlers = {sig: signal.signal(sig, lambda signum, frame: held.append(signum)) for sig in STOP_SIGNALS}
        signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
        try:
            for p in procs:
                p.start()
                started.append(p)
        finally:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)
            for sig, handler in handlers.items():
                signal.signal(sig, handler)
        stops = [sig for sig in held if handlers[sig] is not signal.SIG_IGN]
        if stops:  # raised as the command's own handler raises it (tag's: Terminated for SIGTERM, exit 0)
            if callable(handlers[stops[0]]):
                handlers[stops[0]](stops[0], None)
            raise KeyboardInterrupt
        while len(ended) < len(procs):
            try:
                k, got = queue.get(timeout=1.0)
            except Empty:
                for k, p in enumerate(procs):
                    if k in ended or p.is_alive():
                        continue
                    if k in quiet:  # killed (out of memory, SIGKILL): its files fail, the others go on
                        ended.add(k)
                        for item in unreported[k].values():
                            why = f"worker process ended (exit code {p.exitcode}) before finishing this file"
                            report(Outcome(item.name, str(item.path), error=why))
                    quiet.add(k)
                continue
            if got is None:
                ended.add(k)
            else:
                unreported[k].pop(got.name, None)
                report(got)
    finally:
        for p in started:
            if p.is_alive():
                p.terminate()  # SIGTERM: each removes its half-written outputs
        deadline = time.monotonic() + 30
        while any(p.is_alive() for p in started) and time.monotonic() < deadline:
            with contextlib.suppress(Empty, OSError, EOFError, ValueError):  # read on: a full pipe stops no one
                queue.get(timeout=0.1)
        for p in started:
            if p.is_alive():
                p.kill()
            p.join()
    return outcomes
