#!/usr/bin/env python3
"""Per-class event thresholds for a model, set on audio that holds none of its sound classes.

usage: python recipes/calibrate_events.py MODEL CALIBRATION.csv [--keep speech,music] [--events-only [--budget 0.5]]
       [--write]

A class whose score drifts up on speech or music opens events there: a kitchen microphone reporting
coughing whenever someone talks. This runs the model over the calibration audio (a manifest with a
``path`` column: speech and music it never trained on; recipes/default_model.py writes one from the
training packages' unused files, so no test package is looked at) and gives each class the lowest threshold
of a grid that none of its scores there reaches (the highest of the grid if one does), so it opens no event
there at all. ``--events-only`` instead replays the event detector over those scores at each threshold and
takes the lowest at which the class's events stay within ``--budget`` per hour. The classes in ``--keep``
(expected on that audio) are left as they are. ``--write`` stores the thresholds as ``on_threshold`` in
MODEL/events.toml, keeping every other setting; without it the table is only printed.

Why the highest score rather than a count: a few hours hold too few events to tell a class that never fires
from one that fires now and then. A model whose drinking_sipping score peaked at 0.82 on the calibration
speech, in peaks too short to open an event, kept the default 0.5 by the count and then fired 22 times an
hour on held-out spoken letters; above its peak it fired on none of them.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from streamtag.backends import make_backend
from streamtag.errors import StreamtagError
from streamtag.events import (
    MODEL_EVENTS_NAME,
    EventDetector,
    build_event_settings,
    model_event_table,
    read_event_table,
)
from streamtag.training.datasets import read_unlabelled
from streamtag.training.evaluate import stream_scores

GRID = (0.5, 0.55, 0.6, 0.65, 0.7, 0.75, 0.8, 0.85, 0.9, 0.93, 0.95, 0.97, 0.98, 0.99)


def events_per_hour(
    scores: list[np.ndarray], labels, frame_seconds: float, table: dict, threshold: float
) -> np.ndarray:
    """Events opened per hour of ``scores``, per class, with every class's on_threshold at ``threshold`` (its
    off threshold following) and the rest of each class's settings from ``table``."""
    table = {
        key: {k: v for k, v in value.items() if k not in ("on_threshold", "off_threshold")}
        for key, value in table.items()
    }
    table.setdefault("default", {})["on_threshold"] = threshold
    default, per_class = build_event_settings(table)
    counts = np.zeros(len(labels))
    for probs in scores:
        detector = EventDetector(labels, frame_seconds, default, per_class)
        for events in detector.update_block(0, probs).values():
            for event in events:
                if event.kind == "open":
                    counts[labels.index(event.label)] += 1
    hours = sum(len(s) for s in scores) * frame_seconds / 3600
    return counts / hours


def choose_thresholds(
    rates: np.ndarray, peaks: np.ndarray, labels, budget: float, keep=(), events_only: bool = False
) -> dict[str, float]:
    """Per class (``keep`` left out): the lowest :data:`GRID` value above the class's highest score ``peaks``,
    or with ``events_only`` the lowest whose events per hour (``rates``, grid by class) are within ``budget``;
    the top of the grid when none is."""
    chosen = {}
    for c, label in enumerate(labels):
        if label in keep:
            continue
        fits = rates[:, c] <= budget if events_only else np.asarray(GRID) > peaks[c]
        within = np.flatnonzero(fits)
        chosen[label] = GRID[int(within[0]) if within.size else -1]
    return chosen


def write_thresholds(path: Path, thresholds: dict[str, float], note: str) -> None:
    """Set ``on_threshold`` per class in an events.toml, keeping its other keys and its opening comments; a class
    at the default threshold loses an ``on_threshold`` an earlier calibration gave it."""
    text = path.read_text() if path.is_file() else ""
    table = read_event_table(path) if text else {}
    header = [line for line in text.splitlines() if line.startswith("#")]
    header = header[: next((i for i, line in enumerate(text.splitlines()) if not line.startswith("#")), len(header))]
    default = table.get("default", {}).get("on_threshold", 0.5)
    for label, value in thresholds.items():  # a class at the default needs no entry: an earlier one goes
        if value > default:
            table.setdefault(label, {})["on_threshold"] = value
        elif label in table:
            table[label].pop("on_threshold", None)
            if not table[label]:
                del table[label]
    noted = [f"# {line}" for line in note.splitlines()]
    lines = header + [""] + noted if header else noted
    for key in ["default"] + sorted(k for k in table if k != "default"):
        if key not in table:
            continue
        lines += ["", f"[{key}]"] + [f"{k} = {v!r}" for k, v in table[key].items()]
    path.write_text("\n".join(lines) + "\n")


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("model", help="model folder")
    p.add_argument("calibration", help="CSV manifest (a path column) of audio without the model's sound classes")
    p.add_argument(
        "--budget",
        type=float,
        default=0.5,
        help="with --events-only: events per hour a class may open there (default 0.5)",
    )
    p.add_argument("--keep", default="speech,music", help="classes expected there, left as they are")
    p.add_argument(
        "--events-only",
        action="store_true",
        help="choose by events per hour (within --budget), letting a class's short peaks reach its threshold",
    )
    p.add_argument("--write", action="store_true", help="store the thresholds in MODEL/events.toml")
    args = p.parse_args(argv)

    paths = [clip.path for clip in read_unlabelled(args.calibration)]  # checked: a path column, files there
    backend = make_backend("onnx", args.model)
    labels = list(backend.labels)
    fs = backend.config.features.frame_seconds
    scores = stream_scores(backend, paths)
    hours = sum(len(s) for s in scores) * fs / 3600
    table = model_event_table(args.model)
    rates = np.stack([events_per_hour(scores, labels, fs, table, t) for t in GRID])  # (grid, classes)
    peaks = np.max([s.max(axis=0) for s in scores], axis=0)
    keep = {k for k in args.keep.split(",") if k}
    chosen = choose_thresholds(rates, peaks, labels, args.budget, keep, args.events_only)
    print(f"{len(paths)} files, {hours:.2f} h; events per hour at 0.5, highest score -> the threshold chosen")
    for c, label in enumerate(labels):
        if chosen.get(label, GRID[0]) > GRID[0]:
            i = GRID.index(chosen[label])
            print(f"  {label:18s} {rates[0, c]:7.1f} {peaks[c]:6.3f} -> {GRID[i]:.2f} ({rates[i, c]:.1f} per hour)")
    if args.write:
        rule = f"at most {args.budget:g} events per hour" if args.events_only else "above every score of the class"
        note = (
            f"on_threshold per class: recipes/calibrate_events.py, {rule} on\n"
            f"{hours:.1f} h of speech and music the model never trained on ({Path(args.calibration).name})"
        )
        write_thresholds(Path(args.model) / MODEL_EVENTS_NAME, chosen, note)
        print(f"written to {Path(args.model) / MODEL_EVENTS_NAME}")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main(sys.argv[1:]))
    except (StreamtagError, OSError) as exc:  # a wrong model folder or manifest: one line, not a traceback
        sys.exit(f"calibrate_events: error: {exc}")
