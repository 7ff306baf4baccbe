"""File outputs: rolling updates (JSONL), events (JSONL), frame scores (sed_scores_eval TSV).

Every file is written line by line and flushed per line, so a stopped run never
leaves a partial last line.
"""

from __future__ import annotations

import dataclasses
import datetime
import errno
import json
import os
import re
import sys
import tempfile
import time
from pathlib import Path
from typing import TextIO

from ..errors import ConfigError
from ..steps import Step
from .selection import ClassSelection

SCHEMA_VERSION = 1  # of the JSONL rows below; bumped when a field changes meaning or goes away


def valid_utf8(text: str) -> str:
    """``text`` as valid UTF-8: a file name's bytes that are not (a legacy Latin-1 name, kept by Python as lone
    surrogates) shown as ``\\udce9``, as the archive's tables write it, so strict readers (DuckDB, Arrow) open it."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def row_header(source: str | None, stream: str | None) -> dict:
    """The fields every JSONL row starts with: schema version, wall-clock time (UTC), source and stream."""
    row: dict = {
        "schema": SCHEMA_VERSION,
        "time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="milliseconds"),
    }
    if source is not None:
        row["source"] = valid_utf8(source)  # json.dumps would write a lone surrogate as \udce9: not UTF-8
    if stream is not None:
        row["stream"] = stream
    return row


# how audio files start (WAV, RF64, FLAC, Ogg, AIFF, MP3 with a tag, CAF, AU): no output path may be one
AUDIO_MAGIC = (b"RIFF", b"RF64", b"fLaC", b"OggS", b"FORM", b"ID3", b"caff", b".snd")


def check_output_path(path: str | os.PathLike, flag: str | None = None) -> Path:
    """Refuse a path that cannot be written, before anything is opened (so nothing gets truncated first).

    The folder must exist already (nothing is created) and be writable. ``flag`` (e.g. ``"--jsonl"``)
    starts the message, so it names the option to fix.
    """
    path = Path(path)
    name = f"{flag} {path}" if flag else f"output path {path}"
    if path.is_dir():
        raise ConfigError(f"{name} is a directory; give a file name")
    folder = path.parent
    if folder.exists() and not folder.is_dir():
        raise ConfigError(f"{name}: {folder} is not a folder")
    if not folder.is_dir():
        raise ConfigError(f"{name}: output folder {folder} does not exist; create it first")
    if path.is_file():  # opened for appending, nothing written: what a write would meet (root passes os.access)
        try:
            open(path, "ab").close()
            with open(path, "rb") as f:
                head = f.read(4)
        except OSError as exc:
            raise ConfigError(f"{name}: file {path} is not writable ({exc.strerror or exc})") from None
        if head.startswith(AUDIO_MAGIC):  # a recording (the one replayed from a pipe, say): never an output of ours
            raise ConfigError(f"{name}: {path} is an audio file, which this output would replace; give another name")
    elif path.exists():  # a FIFO or a device: opening it would connect to (and end) its reader
        if not os.access(path, os.W_OK):
            raise ConfigError(f"{name}: {path} is not writable")
    else:
        _probe(folder, name)
    return path


def check_output_folder(path: str | os.PathLike, flag: str) -> Path:
    """Refuse an output folder that cannot be written, before any work is done: a file in its place, or a
    location where not even a probe file can be made (read-only, /proc), found by trying rather than from
    permission bits (root passes those everywhere). A missing folder is checked at its nearest existing parent."""
    if not str(path).strip():  # an unset shell variable: the current folder would be taken without a word
        raise ConfigError(f"{flag} is empty; give a folder (. for the current one)")
    path = Path(path)
    try:
        if path.exists() and not path.is_dir():
            raise ConfigError(f"{flag} {path} is a file; give a folder")
        where = path
        while not where.exists() and where != where.parent:
            where = where.parent
    except OSError as exc:  # a name longer than the file system takes, a loop of links
        raise ConfigError(f"{flag} {path}: {exc.strerror or exc}") from None
    if not where.is_dir():
        raise ConfigError(f"{flag} {path}: {where} is not a folder")
    _probe(where, f"{flag} {path}")
    return path


def _probe(folder: Path, name: str) -> None:
    """Make and remove a file in ``folder``: the one sure test that it takes new files."""
    try:
        fd, probe = tempfile.mkstemp(dir=folder, prefix=".streamtag-probe-")
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:  # (a folder that takes no files, /proc, answers "no such file")
        why = "it takes no new files" if exc.errno == errno.ENOENT and folder.is_dir() else exc.strerror or exc
        raise ConfigError(f"{name}: cannot write in {folder} ({why})") from None


def named_error(exc: OSError, path: str | os.PathLike) -> OSError:
    """``exc`` with ``path`` as its filename: a write that fails mid-run (disk full) says which file."""
    return OSError(exc.errno, exc.strerror or str(exc), str(path))


STDOUT = "-"  # as an output path: standard output (for pipes into jq, mosquitto_pub, ...)


def open_for_writing(path: str | os.PathLike, line_buffered: bool = True) -> TextIO:
    if str(path) == STDOUT:
        return _Unclosed(sys.stdout)
    path = check_output_path(path)
    try:
        return open(path, "w", encoding="utf-8", buffering=1 if line_buffered else -1)
    except OSError as exc:
        raise ConfigError(f"cannot write {path}: {exc.strerror}") from None


class _Unclosed:
    """Standard output as an output file: written and flushed line by line, never closed."""

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream

    def write(self, text: str) -> None:
        self._stream.write(text)
        if text.endswith("\n"):
            self._stream.flush()

    def close(self) -> None:
        self._stream.flush()


@dataclasses.dataclass(frozen=True)
class Rotation:
    """When an output file is closed and a fresh one started (``--rotate 1h``, ``--rotate 100MB``).

    The closed file keeps its name with the UTC time it was started inserted before the suffix
    (``events.jsonl`` -> ``events.2026-12-02T01-06-29.417Z.jsonl``); the path given is always the current one.
    A file already at the path when the run starts is rotated away first, never truncated.
    """

    seconds: float | None = None
    bytes: int | None = None

    @classmethod
    def parse(cls, text: str) -> Rotation:
        match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*(s|m|h|d|kb|mb|gb)\s*", text.lower())
        if not match:
            raise ConfigError(f"--rotate {text!r}: give a duration (30m, 1h, 1d) or a size (100MB, 1GB)")
        if text.strip().endswith("M"):  # 100M: megabytes to most, minutes to the pattern
            n = match.group(1)
            raise ConfigError(f"--rotate {text!r}: write {n}m for minutes or {n}MB for megabytes")
        value, unit = float(match.group(1)), match.group(2)
        if value <= 0:
            raise ConfigError(f"--rotate {text!r} must be above 0")
        if unit in ("s", "m", "h", "d"):
            return cls(seconds=value * {"s": 1, "m": 60, "h": 3600, "d": 86400}[unit])
        return cls(bytes=int(value * {"kb": 1e3, "mb": 1e6, "gb": 1e9}[unit]))


def rotated_name(path: Path, started: datetime.datetime) -> Path:
    """``path`` with the UTC time its file was started, to the millisecond: the names sort in time order (``ls``,
    ``cat scores.*.tsv``). A name already taken (two files started in one millisecond) moves on to the next free
    millisecond, so the order stays that of the names (a ``-1`` suffix would sort before the name without it)."""
    while True:
        stamp = f"{started:%Y-%m-%dT%H-%M-%S}.{started.microsecond // 1000:03d}Z"
        candidate = path.with_name(f"{path.stem}.{stamp}{path.suffix}")
        if not candidate.exists():
            return candidate
        started += datetime.timedelta(milliseconds=1)


class _TextFile:
    """A file opened for writing whose errors name it (see :func:`named_error`); rotated when asked.

    ``header`` starts every file (a TSV's column names)."""

    def __init__(
        self, path: str | os.PathLike, line_buffered: bool = True, rotation: Rotation | None = None, header: str = ""
    ) -> None:
        self.path = Path(path)
        self.line_buffered, self.header = line_buffered, header
        self.rotation = rotation if str(path) != STDOUT else None
        if self.rotation is not None and self.path.is_file() and self.path.stat().st_size:
            # a restart never truncates the last run's file; it is named by its last write (its start is not kept)
            written = datetime.datetime.fromtimestamp(self.path.stat().st_mtime, datetime.timezone.utc)
            os.replace(self.path, rotated_name(self.path, written))
        self._open()

    def _open(self) -> None:
        self._file = open_for_writing(self.path, self.line_buffered)
        self._started = datetime.datetime.now(datetime.timezone.utc)
        self._opened_at = time.monotonic()
        self._bytes = 0
        if self.header:
            self.write(self.header)

    def write(self, text: str) -> None:
        try:
            self._file.write(text)
        except OSError as exc:
            raise named_error(exc, self.path) from None
        self._bytes += len(text)
        r = self.rotation
        if r is not None and text.endswith("\n"):
            if (r.bytes and self._bytes >= r.bytes) or (r.seconds and time.monotonic() - self._opened_at >= r.seconds):
                self._rotate()

    def _rotate(self) -> None:
        self.close()
        os.replace(self.path, rotated_name(self.path, self._started))
        self._open()

    def close(self) -> None:
        try:
            self._file.close()
        except OSError as exc:
            raise named_error(exc, self.path) from None


class UpdatesJsonl:
    """One JSON object per update: ``{"t": s, "top": [[label, p], ...]}`` or all classes with ``all_classes``."""

    def __init__(
        self,
        path: str | os.PathLike,
        selection: ClassSelection,
        every_frames: int,
        all_classes: bool = False,
        stream: str | None = None,
        source: str | None = None,
        rotation: Rotation | None = None,
    ) -> None:
        self._file = _TextFile(path, rotation=rotation)
        self.selection, self.every, self.all_classes, self.stream = selection, every_frames, all_classes, stream
        self.source = source

    def write(self, step: Step) -> None:
        if not step.has_scores or (step.frame_index + 1) % self.every:
            return
        row = row_header(self.source, self.stream)
        row["t"] = round(step.t, 3)
        if self.all_classes:
            probs, labels = step.probs, step.labels  # every class --allow/--deny leave in
            row["probs"] = {labels[i]: round(float(probs[i]), 5) for i in self.selection.indices}
        else:
            row["top"] = [[label, round(p, 5)] for label, p in self.selection.pick(step.probs)]
        self._file.write(json.dumps(row) + "\n")

    def close(self) -> None:
        self._file.close()


def event_line(event, source: str | None, stream: str | None = None) -> str:
    """One event as a line of an events file (``replay --events``, ``tag``)."""
    return json.dumps(row_header(source, stream) | event.as_dict()) + "\n"


def scores_header(labels) -> str:
    return "\t".join(["onset", "offset", *labels]) + "\n"


def scores_line(onset: float, end: float, probs) -> str:
    """One frame of a scores TSV (the sed_scores_eval layout)."""
    values = "\t".join(f"{p:.6g}" for p in probs)
    return f"{onset:.3f}\t{end:.3f}\t{values}\n"


class EventsJsonl:
    """An "open" line when an event is confirmed, a "close" line with onset, offset and scores when it ends."""

    def __init__(
        self,
        path: str | os.PathLike,
        stream: str | None = None,
        source: str | None = None,
        rotation: Rotation | None = None,
    ) -> None:
        self._file = _TextFile(path, rotation=rotation)
        self.stream, self.source = stream, source

    def write(self, step: Step) -> None:
        for event in step.events:
            self._file.write(event_line(event, self.source, self.stream))

    def close(self) -> None:
        self._file.close()


class ScoresTsv:
    """Every frame's scores as a TSV in the sed_scores_eval layout: ``onset  offset  <class>...``.

    ``sed_scores_eval.io.read_sed_scores`` reads it back (one file per audio id).
    """

    def __init__(self, path: str | os.PathLike, labels, rotation: Rotation | None = None) -> None:
        header = scores_header(labels)  # every rotated file starts with it
        self._file = _TextFile(path, line_buffered=False, rotation=rotation, header=header)  # flushed on close

    def write(self, step: Step) -> None:
        if not step.has_scores:
            return
        self._file.write(scores_line(step.onset, step.t, step.probs))

    def close(self) -> None:
        self._file.close()
