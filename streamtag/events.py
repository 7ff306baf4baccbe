"""Per-class hysteresis on streaming probabilities -> events with onset and offset.

A thin layer over the scores, like silero-vad's ``VADIterator``: per class it keeps
only its state and a few counters. For each class:

- an event *starts* when the score reaches ``on_threshold`` and is *confirmed*
  ("open") once it has lasted ``min_duration_s`` with ``patience_frames``
  consecutive frames at or above ``on_threshold``; its onset is backdated to the
  first frame above the threshold;
- it *ends* when the score falls below ``off_threshold`` (default ``on - 0.15``)
  and stays there ``min_gap_s``; rising above ``on_threshold`` within the gap
  continues (merges into) the same event. The offset is the first frame below.

Every "open" gets exactly one "close" (``flush`` closes what is open at stream end).
Times are in stream seconds: frame ``i`` covers ``[i * hop, (i + 1) * hop)``.
"""

from __future__ import annotations

import bisect
import copy
import dataclasses
import difflib
import json
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: the same parser, from PyPI
    import tomli as tomllib

from .errors import ConfigError, is_real, is_whole

OFF_MARGIN = 0.15  # silero-vad's neg_threshold = threshold - 0.15


@dataclasses.dataclass(frozen=True)
class EventParams:
    """Args:
    on_threshold (float): score that starts an event. (Default: ``0.5``)
    off_threshold (float or None): score below which it ends. (Default: ``on_threshold - 0.15``)
    min_duration_s (float): shorter events are never reported. (Default: ``0.1``)
    min_gap_s (float): a dip shorter than this merges the two sides. (Default: ``0.3``)
    patience_frames (int): consecutive frames at or above ``on_threshold`` needed to confirm. (Default: ``1``)
    max_duration_s (float or None): an event this long is closed (reason ``max_duration``) and, if the
        sound goes on, a new one opens, so consumers of a never-ending sound (an engine, rain) are
        not left waiting for a close. (Default: ``None``, no limit)
    """

    on_threshold: float = 0.5
    off_threshold: float | None = None
    min_duration_s: float = 0.1
    min_gap_s: float = 0.3
    patience_frames: int = 1
    max_duration_s: float | None = None

    def __post_init__(self) -> None:
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if value is None and field.name in ("off_threshold", "max_duration_s"):
                continue
            if not is_real(value) or not math.isfinite(value):
                raise ConfigError(f"{field.name} must be a finite number ({value!r} given)")
        if not is_whole(self.patience_frames):
            raise ConfigError(f"patience_frames must be a whole number ({self.patience_frames!r} given)")
        if not 0.0 < self.on_threshold <= 1.0:
            raise ConfigError(f"on_threshold must be in (0, 1] ({self.on_threshold} given)")
        if self.off_threshold is not None and not 0.0 <= self.off_threshold <= self.on_threshold:
            raise ConfigError(
                f"off_threshold must be in [0, on_threshold], on_threshold {self.on_threshold:g} here "
                f"({self.off_threshold} given)"
            )
        for key in ("min_duration_s", "min_gap_s"):
            if getattr(self, key) < 0:
                raise ConfigError(f"{key} must be >= 0 ({getattr(self, key)} given)")
        if self.max_duration_s is not None and not self.max_duration_s > self.min_duration_s:
            raise ConfigError(
                f"max_duration_s must be longer than min_duration_s ({self.max_duration_s} given, "
                f"min_duration_s {self.min_duration_s})"
            )
        if self.patience_frames < 1:
            raise ConfigError(f"patience_frames must be >= 1 ({self.patience_frames} given)")

    @property
    def off(self) -> float:
        return max(0.0, self.on_threshold - OFF_MARGIN) if self.off_threshold is None else self.off_threshold


CLOSE_REASONS = ("ended", "stream_end", "interrupted", "reset", "max_duration", "gap", "settings")


def check_close_reason(reason: str) -> None:
    """A close reason is one of :data:`CLOSE_REASONS` (what consumers of events switch on)."""
    if reason not in CLOSE_REASONS:
        raise ConfigError(f"unknown close reason {reason!r} (one of {', '.join(CLOSE_REASONS)})")


@dataclasses.dataclass(frozen=True)
class Event:
    """``kind`` is ``"open"`` (confirmed, still going; ``offset`` is None) or ``"close"``.

    A close says why (``reason``): ``ended`` (the score fell and stayed down), ``stream_end`` (the
    file or stream ended while it was on), ``interrupted`` (Ctrl-C, SIGTERM or an error), ``reset``
    (a scheduled state reset), ``max_duration`` (``max_duration_s`` reached), ``gap`` (the live
    device was lost; ``live --reconnect`` reopens it) or ``settings`` (the stream's event settings
    were changed while it ran: ``serve``).
    """

    kind: str
    label: str
    onset: float
    offset: float | None
    score_max: float
    score_mean: float
    reason: str | None = None

    def as_dict(self) -> dict[str, Any]:
        row = {"type": self.kind, "label": self.label, "onset": round(self.onset, 3)}
        if self.offset is not None:
            row["offset"] = round(self.offset, 3)
        row["score_max"] = round(self.score_max, 4)
        row["score_mean"] = round(self.score_mean, 4)
        if self.reason is not None:
            row["reason"] = self.reason
        return row


_IDLE, _PENDING, _ACTIVE, _GAP = range(4)


class _Track:
    __slots__ = ("state", "onset", "below_since", "run", "best_run", "score_max", "score_sum", "n")

    def __init__(self) -> None:
        self.state = _IDLE
        self.onset = self.below_since = self.run = self.best_run = self.n = 0
        self.score_max = self.score_sum = 0.0


class EventDetector:
    """``update(frame_index, probs) -> list[Event]``; ``flush(end_frame)``; ``reset_states()``.

    Args:
        labels: class names, in score order.
        frame_seconds (float): the hop in seconds.
        params (EventParams): defaults for every class.
        per_class (dict): label -> EventParams overriding the defaults.
        enabled (list of bool): per class, whether it may open events at all (``serve``'s allow/deny).
            (Default: every class)
    """

    def __init__(
        self,
        labels: Sequence[str],
        frame_seconds: float,
        params: EventParams | None = None,
        per_class: dict[str, EventParams] | None = None,
        enabled: Sequence[bool] | None = None,
    ) -> None:
        self.labels = list(labels)
        self.frame_seconds = frame_seconds
        default = params or EventParams()
        per_class = per_class or {}
        from .outputs.selection import check_class_names  # (outputs import this module)

        check_class_names(sorted(set(per_class) - set(self.labels)), self.labels, "event settings")
        chosen = [per_class.get(label, default) for label in self.labels]
        self._on = np.array([p.on_threshold for p in chosen], dtype=np.float32)
        if enabled is not None:  # a class turned off never reaches its threshold
            self._on[~np.asarray(enabled, dtype=bool)] = np.inf
        self._off = np.array([p.off for p in chosen], dtype=np.float32)
        self._lowest_on = float(self._on.min())
        self._min_frames = [max(1, round(p.min_duration_s / frame_seconds)) for p in chosen]
        self._gap_frames = [max(1, round(p.min_gap_s / frame_seconds)) for p in chosen]
        self._max_frames = [
            round(p.max_duration_s / frame_seconds) if p.max_duration_s is not None else None for p in chosen
        ]
        self._patience = [p.patience_frames for p in chosen]
        self.reset_states()

    def describe(self) -> str:
        """Every setting in one string: what events depend on besides the scores (archive tagging keeps it with
        a file's outputs, so a rerun with other settings tags the file again instead of keeping stale events)."""
        per_class = zip(self.labels, self._on, self._off, self._min_frames, self._gap_frames, self._max_frames)
        rows = [f"{k}:{on:g}/{off:g}/{a}/{b}/{c}" for k, on, off, a, b, c in per_class]
        return f"{self.frame_seconds:g};{self._patience};" + ";".join(rows)

    def fresh(self) -> EventDetector:
        """A detector with these settings and no events yet, the settings shared rather than worked out again
        (they are not changed after ``__init__``): how a server makes one per stream, hundreds joining at once."""
        new = copy.copy(self)
        new.__dict__.pop("_taken", None)  # an engine's mark (engine._detector): the new one is nobody's yet
        new.reset_states()
        return new

    def reset_states(self) -> None:
        # a class's track is made when it first goes above its threshold (an idle track holds nothing): a new
        # stream's detector is made at every join, and most of its classes never start an event
        self._tracks: list[_Track | None] = [None] * len(self.labels)
        self._busy: set[int] = set()  # classes not idle: the only ones looked at below threshold

    def update(self, frame_index: int, probs: np.ndarray) -> list[Event]:
        if not self._busy and probs.max() < self._lowest_on:  # the common quiet frame: one reduction
            return []
        return self._update_row(frame_index, probs, (probs >= self._on).nonzero()[0].tolist())

    def update_block(self, first_frame: int, probs: np.ndarray) -> dict[int, list[Event]]:
        """:meth:`update` for ``probs`` ``(k, classes)``, frames ``first_frame..``: ``{row: events}`` for the rows
        that have any. Stretches where no class is busy or above its threshold are skipped in one pass; the
        thresholds are compared for the whole block at once and the rows walked as Python floats."""
        out: dict[int, list[Event]] = {}
        rows, cols = (probs >= self._on).nonzero()
        k = probs.shape[0]
        if not rows.size and not self._busy:
            return out
        steady = self._steady(probs) if self._busy else set()
        if steady:  # open events that stay at or above their threshold all block long: no row to walk for them
            walked = np.ones(probs.shape[1], dtype=bool)
            walked[list(steady)] = False
            keep = walked[cols]
            rows, cols = rows[keep], cols[keep]
            self._busy -= steady
        try:
            edges = np.searchsorted(rows, np.arange(k + 1))  # row i's columns: cols[edges[i]:edges[i+1]]
            above = np.flatnonzero(edges[1:] != edges[:-1]).tolist()  # rows with a score at or above threshold
            bounds, cols, values = edges.tolist(), cols.tolist(), probs.tolist()
            i, a = 0, 0
            while i < k:
                if not self._busy:  # jump to the next row with a score at or above its threshold
                    a = bisect.bisect_left(above, i, a)
                    if a == len(above):
                        break
                    i = above[a]
                events = self._update_row(first_frame + i, values[i], cols[bounds[i] : bounds[i + 1]])
                if events:
                    out[i] = events
                i += 1
        finally:
            self._busy |= steady
        return out

    def _steady(self, probs: np.ndarray) -> set[int]:
        """Classes with an open event whose scores stay at or above the on threshold through ``probs`` and that
        no maximum duration can close: each row would only add to their statistics, so that is done here, in the
        same order and arithmetic as row by row."""
        steady = set()
        k = probs.shape[0]
        for i in self._busy:
            tr = self._tracks[i]
            if tr.state != _ACTIVE or self._max_frames[i] is not None:
                continue
            column = probs[:, i]
            if column.min() < self._on[i]:
                continue
            total = tr.score_sum
            for p in column.tolist():
                total += p
            tr.score_sum = total
            tr.score_max = max(tr.score_max, float(column.max()))
            tr.run += k
            tr.best_run = max(tr.best_run, tr.run)
            tr.n += k
            steady.add(i)
        return steady

    def _update_row(self, frame_index: int, probs, starting: list[int]) -> list[Event]:
        """One frame, given the classes at or above their threshold in it (``probs``: an array or a list)."""
        events: list[Event] = []
        busy = self._busy
        for i in busy.union(starting) if busy else starting:
            event = self._advance(i, frame_index, float(probs[i]))
            if event is not None:
                events.append(event)
        return events

    def _advance(self, i: int, f: int, p: float) -> Event | None:
        tr = self._tracks[i]
        if tr is None:
            tr = self._tracks[i] = _Track()
        on, off = self._on[i], self._off[i]
        if tr.state == _IDLE:  # p >= on here
            tr.state, tr.onset, tr.run, tr.best_run, tr.n = _PENDING, f, 0, 0, 0
            tr.score_max = tr.score_sum = 0.0
            self._busy.add(i)
        if tr.state == _PENDING:
            if p < off:
                tr.state = _IDLE
                self._busy.discard(i)
                return None
            self._accumulate(tr, p, on)
            if f - tr.onset + 1 >= self._min_frames[i] and tr.best_run >= self._patience[i]:
                tr.state = _ACTIVE
                return self._event("open", i, None)
            return None
        if tr.state == _ACTIVE:
            if p < off:
                tr.state, tr.below_since = _GAP, f
            else:
                self._accumulate(tr, p, on)
                limit = self._max_frames[i]
                if limit is not None and f + 1 - tr.onset >= limit:
                    return self._close(i, f + 1, "max_duration")  # the next frame above starts a new one
            return None
        # _GAP
        if p >= on:
            tr.state = _ACTIVE
            self._accumulate(tr, p, on)
        elif f - tr.below_since + 1 >= self._gap_frames[i]:
            return self._close(i, tr.below_since, "ended")
        return None

    @staticmethod
    def _accumulate(tr: _Track, p: float, on: float) -> None:
        tr.run = tr.run + 1 if p >= on else 0
        tr.best_run = max(tr.best_run, tr.run)
        tr.score_max = max(tr.score_max, p)
        tr.score_sum += p
        tr.n += 1

    def _event(self, kind: str, i: int, offset_frame: int | None, reason: str | None = None) -> Event:
        tr = self._tracks[i]
        offset = None if offset_frame is None else offset_frame * self.frame_seconds
        return Event(
            kind, self.labels[i], tr.onset * self.frame_seconds, offset, tr.score_max, tr.score_sum / tr.n, reason
        )

    def _close(self, i: int, offset_frame: int, reason: str) -> Event:
        event = self._event("close", i, offset_frame, reason)
        self._tracks[i].state = _IDLE
        self._busy.discard(i)
        return event

    def take_over(self, old: EventDetector, end_frame: int, reason: str = "settings") -> list[Event]:
        """Go on from ``old`` (the same labels) with these settings: a class whose settings are the same here
        keeps its open event (a change to one label does not split the others' events); the rest are closed as
        :meth:`flush` closes them."""
        if old.labels != self.labels:
            return old.flush(end_frame, reason)
        changed = {i for i in old._busy if old._class_settings(i) != self._class_settings(i)}
        events = old.flush(end_frame, reason, classes=changed)
        for i in old._busy:
            self._tracks[i] = old._tracks[i]
        self._busy = set(old._busy)
        return events

    def _class_settings(self, i: int) -> tuple:
        return (
            float(self._on[i]),
            float(self._off[i]),
            self._min_frames[i],
            self._gap_frames[i],
            self._max_frames[i],
            self._patience[i],
        )

    def flush(self, end_frame: int, reason: str = "stream_end", classes: set[int] | None = None) -> list[Event]:
        """Close every open event (at ``end_frame``, or where it fell below); drop unconfirmed ones.

        ``reason`` is why the stream stops (see :class:`Event`); an event whose sound had already
        ended, waiting out its gap, closes as ``ended``. ``classes``: only these (by index)."""
        check_close_reason(reason)
        events = []
        for i in sorted(self._busy if classes is None else self._busy & classes):
            tr = self._tracks[i]
            if tr.state == _ACTIVE:
                events.append(self._close(i, end_frame, reason))
            elif tr.state == _GAP:
                events.append(self._close(i, tr.below_since, "ended"))
            else:
                tr.state = _IDLE
        self._busy -= self._busy if classes is None else classes
        return events


MODEL_EVENTS_NAME = "events.toml"  # a model folder's own event settings, applied unless overridden


def read_event_table(path: str | os.PathLike) -> dict[str, dict[str, Any]]:
    """``{"default": {...}, "<label>": {...}}`` from a ``.json`` or ``.toml`` file, keys checked."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in (".json", ".toml"):
        raise ConfigError(f"event settings {path}: give a .json or .toml file ({suffix or 'no suffix'} is not read)")
    try:
        text = path.read_text()
        data = tomllib.loads(text) if suffix == ".toml" else json.loads(text)
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise ConfigError(f"cannot read event settings {path}: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"event settings {path} must map class names to settings")
    fields = sorted(f.name for f in dataclasses.fields(EventParams))
    for key, value in data.items():
        if not isinstance(value, dict):
            raise ConfigError(f"event settings {path}: '{key}' must be a table with keys among {fields}")
        wrong = sorted(set(value) - set(fields))
        if wrong:
            close = difflib.get_close_matches(wrong[0], fields, n=1)
            hint = f"did you mean {close[0]}?" if close else f"keys are among {fields}"
            raise ConfigError(f"event settings {path}: [{key}] has an unknown key '{wrong[0]}' ({hint})")
    return data


def model_event_table(folder: str | os.PathLike | None) -> dict[str, dict[str, Any]]:
    """The event settings a model folder ships (``events.toml``), or none."""
    if folder is None:
        return {}
    path = Path(folder) / MODEL_EVENTS_NAME
    return read_event_table(path) if path.is_file() else {}


def build_event_settings(*tables: dict[str, dict[str, Any]]) -> tuple[EventParams | None, dict[str, EventParams]]:
    """Later tables override earlier ones key by key (a model's settings, then the user's file, then flags); a
    table's ``default`` is every class's, so it overrides the earlier tables' class entries too (a calibrated
    per-class threshold of the model gives way to a user's ``on_threshold`` for all), and a class entry of the
    same table or a later one overrides it. Every class entry is completed from the merged default."""
    merged: dict[str, dict[str, Any]] = {}
    for table in tables:
        merged = merge_event_tables(merged, table)
    base = merged.get("default", {})
    try:
        default = EventParams(**base) if base else None
    except ConfigError as exc:
        raise ConfigError(f"events.default: {exc}") from None
    per_class = {}
    for key, value in merged.items():
        if key != "default":
            try:
                per_class[key] = EventParams(**{**base, **value})
            except ConfigError as exc:  # which class: a file may name dozens
                raise ConfigError(f"events.{key}: {exc}") from None
    return default, per_class


def merge_event_tables(below: dict[str, dict[str, Any]], above: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """``above`` over ``below``, key by key; ``above``'s ``default`` keys clear the same keys from ``below``'s class
    entries (a default is every class's), and its own class entries go over that. Neither table is changed."""
    merged = {key: dict(entry) for key, entry in below.items()}
    for setting in above.get("default", {}):
        for key, entry in merged.items():
            if key != "default":
                entry.pop(setting, None)
    for key, value in above.items():
        merged[key] = {**merged.get(key, {}), **value}
    return merged


def load_event_settings(path: str | os.PathLike) -> tuple[EventParams | None, dict[str, EventParams]]:
    """Read ``{"default": {...}, "<label>": {...}}`` from a ``.json`` or ``.toml`` file."""
    return build_event_settings(read_event_table(path))


def model_detector(folder: str | os.PathLike | None, labels: Sequence[str], frame_seconds: float) -> EventDetector:
    """A detector at a model's own event settings (its folder's ``events.toml``, else the defaults): what every
    runner uses when the user gives none, so tag's resume key, eval and the engines cannot drift apart."""
    return EventDetector(labels, frame_seconds, *model_event_settings(folder))


def model_event_settings(folder: str | os.PathLike | None) -> tuple[EventParams | None, dict[str, EventParams]]:
    """:func:`build_event_settings` of a model's own table (its ``events.toml``, else the defaults)."""
    return build_event_settings(model_event_table(folder))
