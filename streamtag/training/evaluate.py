"""Evaluation through the streaming path, with an offline baseline for honesty.

Every clip is stepped hop by hop through the backend, as the worker steps it in
``streamtag replay --fast`` (the ring and thread only move samples). The frame
probabilities give clip accuracy (last frame, mean over frames), macro mAP,
per-class AP and F1 at the event thresholds, a confusion matrix, the time-to-detect
curve (accuracy using only the first N seconds heard) and a level sweep (the same
clips played quieter). On audio known to hold none of the classes it counts false
alarms per hour; against a teacher it measures agreement on unlabelled audio.
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

DETECT_AFTER_S = (0.25, 0.5, 1.0, 2.0, 5.0)
LEVELS_DB = (0.0, -10.0, -20.0, -30.0, -40.0)
PLOTS = ("time_to_detect.png", "confusion.png")  # what plot_report writes


def stream_probs(backend, samples: np.ndarray, gain_db: float = 0.0) -> np.ndarray:
    """Frame probabilities ``(frames, classes)`` of mono samples at the model rate, through a fresh
    :class:`~streamtag.engine.StreamTagger` (the engine every runner uses)."""
    from ..engine import StreamTagger

    steps = StreamTagger(backend, events=None, gain_db=gain_db).feed(samples)
    if not steps:
        return np.zeros((0, backend.config.num_classes), np.float32)
    return np.stack([s.probs for s in steps])


def stream_scores(
    backend, paths: Sequence[os.PathLike], gain_db: float = 0.0, progress: Callable[[], None] | None = None
) -> list[np.ndarray]:
    """:func:`stream_probs` of each file, decoded at the model rate and scaled by ``gain_db``;
    ``progress()`` is called after each file."""
    from ..sources.file import read_audio

    feats = backend.config.features
    out = []
    for p in paths:
        out.append(stream_probs(backend, read_audio(p, feats.sample_rate, min_samples=feats.hop_length)[0], gain_db))
        if progress is not None:
            progress()
    return out


def dataset_targets(dataset, labels: Sequence[str], label_map) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[str]]:
    """A labelled dataset against a model's classes: ``(targets, hard, allowed, unknown)``: each clip's class
    index (-1 for a class the model lacks), hard multi-label targets (NaN outside the dataset's classes),
    the model classes the dataset has, and the dataset classes the model lacks."""
    index = {label: i for i, label in enumerate(labels)}

    def name(label: str) -> str:  # renamed as train renames it, unless the model has the label itself
        return label if label in index else label_map.canonical(label)

    names = [name(c.label) for c in dataset.clips]
    also = [[name(x) for x in c.also] for c in dataset.clips]  # a multi-label clip's other labels
    targets = np.array([index.get(n, -1) for n in names])
    every = set(names) | {x for row in also for x in row}
    allowed = np.isin(labels, sorted(every))
    hard = np.full((len(names), len(labels)), np.nan, np.float32)
    hard[:, allowed] = 0.0
    hard[targets >= 0, targets[targets >= 0]] = 1.0
    for n, row in enumerate(also):
        hard[n, [index[x] for x in row if x in index]] = 1.0
    return targets, hard, allowed, sorted(every - set(labels))


def grouped_baseline(dataset, targets: np.ndarray, features, cache, k: int, n_classes: int) -> float:
    """The offline baseline's accuracy by ``k``-fold source-grouped CV on these clips (an honesty check)."""
    from .datasets import compute_features, grouped_folds

    stats = clip_statistics(compute_features(dataset, features, cache))
    folds = grouped_folds(dataset, k)
    correct = 0.0
    for f in range(k):  # a class the model lacks is not learned (no index), and its clips count as errors
        tr, te = (folds != f) & (targets >= 0), folds == f
        if te.any() and tr.any():
            correct += baseline_accuracy(stats[tr], targets[tr], stats[te], targets[te], n_classes) * te.sum()
    return correct / len(dataset.clips)


def detected(probs: np.ndarray, detector) -> np.ndarray:
    """Which classes opened an event anywhere in ``probs`` (bool per class), by the event detector."""
    detector.reset_states()
    hit = np.zeros(probs.shape[1], dtype=bool)
    index = {label: i for i, label in enumerate(detector.labels)}
    for f, row in enumerate(probs):
        for event in detector.update(f, row):
            hit[index[event.label]] = True
    for event in detector.flush(len(probs)):
        hit[index[event.label]] = True
    return hit


def event_counts(probs: np.ndarray, detector) -> dict[str, int]:
    """Events opened per label over one stream."""
    detector.reset_states()
    counts: dict[str, int] = {}
    for f, row in enumerate(probs):
        for event in detector.update(f, row):
            if event.kind == "open":
                counts[event.label] = counts.get(event.label, 0) + 1
    detector.flush(len(probs))
    return counts


def f1_scores(hits: np.ndarray, hard: np.ndarray, labels: Sequence[str]) -> dict[str, Any]:
    """Clip-level precision, recall and F1 per class from event decisions, over clips whose truth is known."""
    per_class, tp_all, fp_all, fn_all = {}, 0, 0, 0
    for c, label in enumerate(labels):
        known = ~np.isnan(hard[:, c])
        truth = hard[known, c] >= 0.5
        if not truth.any():
            continue
        pred = hits[known, c]
        tp, fp, fn = int((pred & truth).sum()), int((pred & ~truth).sum()), int((~pred & truth).sum())
        precision = tp / (tp + fp) if tp + fp else 0.0
        recall = tp / (tp + fn)
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        per_class[label] = {"precision": precision, "recall": recall, "f1": f1}
        tp_all, fp_all, fn_all = tp_all + tp, fp_all + fp, fn_all + fn
    micro = 2 * tp_all / (2 * tp_all + fp_all + fn_all) if tp_all else 0.0
    macro = float(np.mean([v["f1"] for v in per_class.values()])) if per_class else float("nan")
    return {"micro_f1": micro, "macro_f1": macro, "per_class": per_class}


def average_precision(scores: np.ndarray, positive: np.ndarray) -> float:
    if positive.sum() == 0:
        return float("nan")
    order = np.argsort(-scores, kind="stable")
    hits = positive[order].astype(np.float64)
    precision = np.cumsum(hits) / np.arange(1, hits.size + 1)
    return float((precision * hits).sum() / hits.sum())


def bootstrap_interval(hits: np.ndarray, resamples: int = 2000, level: float = 0.95, seed: int = 0) -> list[float]:
    """Percentile bootstrap interval of an accuracy over clips (``hits``: 1 right, 0 wrong per clip).

    A held-out set of ~100 clips moves by a few points when two clips flip: the interval says how
    far apart two models must be before the difference means anything."""
    hits = np.asarray(hits, dtype=np.float64)
    if hits.size == 0:
        return [float("nan"), float("nan")]
    rng = np.random.default_rng(seed)
    means = hits[rng.integers(0, hits.size, size=(resamples, hits.size))].mean(1)
    tail = (1 - level) / 2 * 100
    return [float(np.percentile(means, tail)), float(np.percentile(means, 100 - tail))]


def correct(pred: np.ndarray, targets: np.ndarray, hard: np.ndarray | None = None) -> np.ndarray:
    """Per clip, whether its predicted class is right: its label, or with ``hard`` (clips, classes) any of its
    labels (a file listed with two labels is one clip holding both)."""
    return pred == targets if hard is None else hard[np.arange(len(pred)), pred] == 1.0


def _argmax_offset(allowed: np.ndarray | None) -> np.ndarray | float:
    """Added to scores before an argmax: the classes not ``allowed`` never win."""
    return 0.0 if allowed is None else np.where(allowed, 0.0, -np.inf)


def predictions(
    probs: list[np.ndarray], allowed: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per clip: its mean scores over its frames, and the class said by them and by its last frame, argmax among
    the ``allowed`` classes (all when ``None``): ``(mean, pred_mean, pred_last)``."""
    offset = _argmax_offset(allowed)
    mean = np.stack([p.mean(0) for p in probs])
    last = np.stack([p[-1] for p in probs])
    return mean, (mean + offset).argmax(1), (last + offset).argmax(1)


def metrics(
    probs: list[np.ndarray],
    targets: np.ndarray,
    labels: Sequence[str],
    frame_seconds: float,
    allowed: np.ndarray | None = None,
    hard: np.ndarray | None = None,
) -> dict:
    """Clip figures. ``allowed`` (classes,) restricts the argmax to the classes the dataset can name
    (a multi-label model also knows speech or music, which an ESC-50 clip is never labelled as). ``hard``
    (clips, classes), :func:`dataset_targets`': a clip with several labels is right on any of them."""

    n_classes = len(labels)
    offset = _argmax_offset(allowed)
    mean, pred_mean, pred_last = predictions(probs, allowed)
    confusion = np.zeros((n_classes, n_classes), dtype=np.int64)
    known = targets >= 0  # a clip of a class the model lacks has no row
    np.add.at(confusion, (targets[known], pred_last[known]), 1)
    aps = [average_precision(mean[:, c], targets == c) for c in range(n_classes)]
    per_class = {}
    for c, label in enumerate(labels):
        mask = targets == c
        if mask.any():
            per_class[label] = {"n": int(mask.sum()), "acc_last": float((pred_last[mask] == c).mean()), "ap": aps[c]}
    ttd = {}
    for seconds in DETECT_AFTER_S:
        frame = max(1, int(round(seconds / frame_seconds)))
        preds = np.array([(p[min(frame, len(p)) - 1] + offset).argmax() for p in probs])
        ttd[f"{seconds:g}"] = float(correct(preds, targets, hard).mean())
    right_last, right_mean = correct(pred_last, targets, hard), correct(pred_mean, targets, hard)
    return {
        "clips": len(probs),
        "acc_last": float(right_last.mean()),
        "acc_mean": float(right_mean.mean()),
        "acc_last_ci95": bootstrap_interval(right_last),
        "acc_mean_ci95": bootstrap_interval(right_mean),
        "macro_map": float(np.nanmean(aps)),
        "time_to_detect": ttd,
        "per_class": per_class,
        "confusion": confusion.tolist(),
        "labels": list(labels),
    }


def false_alarms(backend, detector, paths: Sequence[os.PathLike], expected: Sequence[str]) -> dict[str, Any]:
    """Events per hour of audio known to hold none of the model's classes except ``expected`` (e.g. music)."""
    frame_s = backend.config.features.frame_seconds
    frames, counts = 0, {}
    for probs in _each_stream(backend, paths):
        frames += len(probs)
        for label, n in event_counts(probs, detector).items():
            if label not in expected:
                counts[label] = counts.get(label, 0) + n
    hours = frames * frame_s / 3600
    per_hour = {k: v / hours for k, v in sorted(counts.items(), key=lambda kv: -kv[1])} if hours else {}
    return {
        "files": len(paths),
        "hours": hours,
        "expected": list(expected),
        "events": int(sum(counts.values())),
        "per_hour": sum(counts.values()) / hours if hours else float("nan"),
        "by_label_per_hour": per_hour,
    }


def teacher_agreement(
    backend,
    teacher,
    label_map,
    paths: Sequence[os.PathLike],
    every_s: float = 0.5,
    min_positives: int = 5,
    groups: Sequence[str] | None = None,
) -> dict[str, Any]:
    """Average precision of the student's frame scores against the teacher's (>= 0.5 is positive).

    Frames are sampled every ``every_s``; a class counts once the teacher finds it at least
    ``min_positives`` times. With ``groups`` (each file's source, e.g. its package) the report also
    holds, per group and counted class, the student's mean score on the teacher's positive frames and
    on the rest: a low AP is either a class heard weakly where it is, or heard where it is not, and
    this says which, and where; and the class's AP within the group, where it has ``min_positives`` frames
    with and without the class."""
    from pathlib import Path as _Path

    feats = backend.config.features
    mapping = teacher.mapping(backend.labels, label_map)
    every = max(1, int(round(every_s / feats.frame_seconds)))
    student, truth, frame_group = [], [], []
    for n, (path, probs) in enumerate(zip(paths, _each_stream(backend, paths))):
        windows = teacher.windows(_Path(path), feats.sample_rate)
        target = teacher.frame_targets(windows, len(probs), feats.frame_seconds, mapping)
        pick = np.arange(every - 1, len(probs), every)
        student.append(probs[pick])
        truth.append(target[pick])
        if groups is not None:
            frame_group += [groups[n]] * len(pick)
    scores, positive = np.concatenate(student), np.concatenate(truth) >= 0.5  # NaN (no mapping): never positive
    counted = [c for c in range(len(backend.labels)) if mapping[c].size and positive[:, c].sum() >= min_positives]
    per_class = {
        backend.labels[c]: {
            "ap": average_precision(scores[:, c], positive[:, c]),
            "positives": int(positive[:, c].sum()),
        }
        for c in counted
    }
    out = {
        "files": len(paths),
        "frames": int(len(scores)),
        "map": float(np.mean([v["ap"] for v in per_class.values()])) if per_class else float("nan"),
        "per_class": per_class,
    }
    if groups is not None:
        names = {c: backend.labels[c] for c in counted}
        out["per_group"] = agreement_by_group(scores, positive, np.array(frame_group), names, min_positives)
    return out


def agreement_by_group(
    scores: np.ndarray, positive: np.ndarray, frame_group: np.ndarray, classes: dict[int, str], min_positives: int
) -> dict[str, dict[str, Any]]:
    """Per source group and class: the teacher's positives, the student's mean score on them and on the rest,
    and the AP within the group (where it has ``min_positives`` frames with and without the class)."""
    out = {}
    for g in dict.fromkeys(frame_group.tolist()):
        rows = frame_group == g
        entry: dict[str, Any] = {"frames": int(rows.sum())}
        for c, name in classes.items():
            heard, on = positive[rows, c], scores[rows, c]
            entry[name] = {
                "positives": int(heard.sum()),
                "mean_on_positives": float(on[heard].mean()) if heard.any() else None,
                "mean_on_rest": float(on[~heard].mean()) if (~heard).any() else None,
                "ap": average_precision(on, heard) if min(heard.sum(), (~heard).sum()) >= min_positives else None,
            }
        out[g] = entry
    return out


def event_stream(
    backend,
    paths: Sequence[os.PathLike],
    labels: Sequence[str],
    floor_db: float = -65.0,
    level_db: float = -20.0,
    gap_s: float = 3.0,
    onset_tolerance_s: float = 0.3,
    heard_within_s: float = 1.0,
    seed: int = 0,
    detector=None,
) -> dict[str, Any]:
    """Isolated sounds one after another over a quiet noise floor, as a microphone would hear them.

    Each clip is trimmed to where it is audible, scaled to ``level_db`` dBFS peak and placed after
    ``gap_s`` of white noise at ``floor_db`` dBFS RMS. A sound is found when an event of its label
    opens with an onset within ``onset_tolerance_s`` of where it was placed (backdating counts, so an
    event that opens late but says when the sound began is found). Other events are false alarms.
    Whether a sound was recognised at all is told apart from when: it is *heard* when an event of its
    label opens with an onset from ``onset_tolerance_s`` before it to ``heard_within_s`` after its end
    (``onset_delay_s``: that onset after the sound's start); ``peak`` is its label's highest score over that span.
    ``detector``: the event detector to use (default thresholds when ``None``).
    """
    from ..events import EventDetector
    from ..sources.file import read_audio

    feats = backend.config.features
    rate = feats.sample_rate
    rng = np.random.default_rng(seed)
    pieces, placed, t = [], [], 0
    for path, label in zip(paths, labels):
        audio = read_audio(path, rate, min_samples=feats.hop_length)[0]
        loud = np.flatnonzero(np.abs(audio) > 0.05 * np.abs(audio).max())
        audio = audio[loud[0] : loud[-1] + 1] if loud.size else audio
        gap = rng.normal(0.0, 10 ** (floor_db / 20), int(gap_s * rate)).astype(np.float32)
        sound = audio / max(np.abs(audio).max(), 1e-9) * 10 ** (level_db / 20)
        sound = sound + rng.normal(0.0, 10 ** (floor_db / 20), sound.size).astype(np.float32)
        pieces += [gap, sound.astype(np.float32)]
        placed.append((label, (t + gap.size) / rate, (t + gap.size + sound.size) / rate))
        t += gap.size + sound.size
    pieces.append(rng.normal(0.0, 10 ** (floor_db / 20), int(gap_s * rate)).astype(np.float32))
    stream = np.concatenate(pieces)
    probs = stream_probs(backend, stream)
    detector = detector or EventDetector(backend.labels, feats.frame_seconds)
    detector.reset_states()
    events = []
    for f, row in enumerate(probs):
        events += [e for e in detector.update(f, row) if e.kind == "open"]
    column = {name: c for c, name in enumerate(backend.labels)}
    frame_s = feats.frame_seconds
    used, late, rows = set(), set(), []  # the events that found a sound in time, and that named one late
    for label, start, end in placed:
        mine = [(n, e.onset - start) for n, e in enumerate(events) if e.label == label]  # offsets from its start
        match = [(abs(d), n) for n, d in mine if n not in used and abs(d) <= onset_tolerance_s]
        if match:
            used.add(min(match)[1])
        named = [(n, d) for n, d in mine if -onset_tolerance_s <= d <= end - start + heard_within_s]
        if named and not match:  # the one event that named it late is not "other"; a second one still is
            late.add(min(named, key=lambda nd: abs(nd[1]))[0])
        heard = [d for _, d in named]
        span = probs[int(start / frame_s) : int((end + heard_within_s) / frame_s), column[label]]
        rows.append(
            {
                "label": label,
                "start": round(start, 2),
                "end": round(end, 2),
                "found": bool(match),
                "heard": bool(heard),
                "onset_delay_s": round(min(heard, key=abs), 2) if heard else None,
                "peak": round(float(span.max()), 3) if span.size else 0.0,
            }
        )
    false = [e for n, e in enumerate(events) if n not in used and n not in late]  # a late one is not "other"
    found = [r for r in rows if r["found"]]
    delays = [r["onset_delay_s"] for r in rows if r["heard"]]
    return {
        "sounds": len(rows),
        "found": len(found),
        "heard": len(delays),
        "median_onset_delay_s": round(float(np.median(delays)), 2) if delays else None,
        "onset_tolerance_s": onset_tolerance_s,
        "heard_within_s": heard_within_s,
        "false_events": len(false),
        "false_labels": sorted({e.label for e in false}),
        "seconds": round(stream.size / rate, 1),
        "placed": rows,
    }


def _each_stream(backend, paths: Sequence[os.PathLike]):
    for path in paths:
        yield stream_scores(backend, [path])[0]


def clip_statistics(feats: list[np.ndarray]) -> np.ndarray:
    """Per-band mean and standard deviation of each clip's log-mel: the baseline's input."""
    return np.stack([np.concatenate([f.mean(0), f.std(0)]) for f in feats]).astype(np.float32)


def baseline_accuracy(
    train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, test_y: np.ndarray, n_classes: int, l2: float = 1e-3
) -> float:
    """Multinomial logistic regression (L-BFGS, L2) on clip statistics; accuracy on the test clips."""
    import torch

    mu, sd = train_x.mean(0), train_x.std(0) + 1e-6
    xt = torch.from_numpy((train_x - mu) / sd)
    yt = torch.from_numpy(train_y)
    w = torch.zeros(xt.shape[1], n_classes, requires_grad=True)
    b = torch.zeros(n_classes, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=300, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(xt @ w + b, yt) + l2 * (w**2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        pred = (torch.from_numpy((test_x - mu) / sd) @ w + b).argmax(1).numpy()
    return float((pred == test_y).mean())


CLIP_COLUMNS = (
    "path",
    "labels",
    "predicted_mean",
    "predicted_last",
    "right_mean",
    "right_last",
    "label_score_mean",
    "label_score_max",
    "in_training",
)


def clip_rows(
    clips: Sequence,
    probs: list[np.ndarray],
    targets: np.ndarray,
    hard: np.ndarray,
    labels: Sequence[str],
    allowed: np.ndarray,
    in_training: Sequence[bool],
) -> list[dict[str, Any]]:
    """One row per clip (``CLIP_COLUMNS``): what the model said, whether that is right (as :func:`metrics` counts
    it) and how high its own label scored, so a user can find the clips it gets wrong (a quiet recorder, a
    class it confuses) and those it learned from."""
    mean, pred_mean, pred_last = predictions(probs, allowed)
    right_mean, right_last = correct(pred_mean, targets, hard), correct(pred_last, targets, hard)
    rows = []
    for i, clip in enumerate(clips):
        own = targets[i]
        rows.append(
            {
                "path": str(clip.path),
                "labels": ";".join(clip.labels),
                "predicted_mean": labels[pred_mean[i]],
                "predicted_last": labels[pred_last[i]],
                "right_mean": int(right_mean[i]),
                "right_last": int(right_last[i]),
                "label_score_mean": f"{mean[i, own]:.4f}" if own >= 0 else "",  # a class the model lacks: none
                "label_score_max": f"{probs[i][:, own].max():.4f}" if own >= 0 else "",
                "in_training": int(in_training[i]),
            }
        )
    return rows


def write_report(
    report: dict[str, Any], out_dir: str | os.PathLike, plot: bool = False, clips: list[dict[str, Any]] | None = None
) -> Path:
    """report.json and report.md (and the plots, and ``clips.csv`` with :func:`clip_rows`' rows) in ``out_dir``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "report.json").write_text(json.dumps(report, indent=1))
    (out_dir / "report.md").write_text(markdown(report))
    if clips is None:  # an earlier report's clips must not sit beside this one
        (out_dir / "clips.csv").unlink(missing_ok=True)
    else:
        with open(out_dir / "clips.csv", "w", newline="", encoding="utf-8", errors="surrogateescape") as f:
            writer = csv.DictWriter(f, CLIP_COLUMNS, lineterminator="\n")
            writer.writeheader()
            writer.writerows(clips)
    if plot:
        plot_report(report, out_dir)
    else:  # plots of an earlier report (another model) must not sit beside this one
        for stale in PLOTS:
            (out_dir / stale).unlink(missing_ok=True)
    return out_dir


def _interval(m: dict, key: str) -> str:
    lo, hi = m.get(key, (float("nan"), float("nan")))
    return "" if np.isnan(lo) else f" (95% interval {lo:.1%}-{hi:.1%}, bootstrap over clips)"


def markdown(report: dict[str, Any]) -> str:
    m = report["metrics"]
    lines = [f"# Evaluation: {report.get('model', '')} on {report.get('dataset', '')}", ""]
    if report.get("warnings"):
        lines += [f"**Warning:** {w}" for w in report["warnings"]] + [""]
    lines += [
        f"- clips: {m['clips']}",
        f"- accuracy, last frame: {m['acc_last']:.1%}{_interval(m, 'acc_last_ci95')}",
        f"- accuracy, mean over frames: {m['acc_mean']:.1%}{_interval(m, 'acc_mean_ci95')}",
        f"- macro mAP: {m['macro_map']:.3f}",
    ]
    if "baseline_acc" in report:
        lines.append(
            f"- baseline (logistic regression on clip mean+std of log-mel, {report['baseline_split']}): "
            f"{report['baseline_acc']:.1%}"
        )
    lines += ["", "## Time to detect", "", "| audio heard (s) | accuracy |", "|---|---|"]
    lines += [f"| {k} | {v:.1%} |" for k, v in m["time_to_detect"].items()]
    if "levels" in report:
        lines += ["", "## Input level (the same clips played quieter)", ""]
        lines += ["| gain (dB) | accuracy, mean over frames | last frame |", "|---|---|---|"]
        lines += [f"| {k} | {v['acc_mean']:.1%} | {v['acc_last']:.1%} |" for k, v in report["levels"].items()]
    f1 = report.get("f1")
    if f1:
        lines += ["", "## Events at the model's thresholds (its events.toml, else the defaults; clip level)", ""]
        lines += [f"- micro F1 {f1['micro_f1']:.3f}, macro F1 {f1['macro_f1']:.3f}"]
    fa = report.get("false_alarms")
    if fa:
        lines += ["", "## False alarms on audio without these classes", ""]
        lines += [
            f"- {fa['hours']:.2f} h in {fa['files']} files ({', '.join(fa['expected']) or 'no class'} expected there): "
            f"{fa['events']} events, {fa['per_hour']:.1f} per hour"
        ]
        lines += [f"  - {k}: {v:.1f} per hour" for k, v in list(fa["by_label_per_hour"].items())[:10]]
    if report.get("event_stream"):
        lines += event_stream_lines(report["event_stream"])
    ag = report.get("teacher_agreement")
    if ag:
        lines += ["", "## Agreement with the teacher on unlabelled audio", ""]
        if not ag["per_class"]:  # no class the teacher heard often enough: nothing to score, not "nan"
            lines += [
                f"- {ag['frames']} frames (every 0.5 s) of {ag['files']} file(s): the teacher hears none of the "
                "model's classes in 5 or more frames, so there is no agreement to measure"
            ]
    if ag and ag["per_class"]:
        lines += [f"- {ag['frames']} frames (every 0.5 s) of {ag['files']} file(s): mAP {ag['map']:.3f}", ""]
        lines += ["| class | teacher positives | AP |", "|---|---|---|"]
        lines += [f"| {k} | {v['positives']} | {v['ap']:.3f} |" for k, v in ag["per_class"].items()]
        if ag.get("per_group"):
            lines += [
                "",
                "The student's mean score per source group, where the teacher hears the class and elsewhere, and "
                "its AP within the group (where it has enough frames with and without the class):",
                "",
            ]
            lines += [
                "| group | frames | class | teacher positives | mean there | mean elsewhere | AP in the group |",
                "|---|---|---|---|---|---|---|",
            ]
            for g, entry in ag["per_group"].items():
                for k in ag["per_class"]:
                    e = entry[k]
                    if not (e["positives"] or (e["mean_on_rest"] or 0.0) >= 0.1):  # shown where heard, or heard wrongly
                        continue
                    there, rest = (
                        f"{x:.2f}" if x is not None else "-" for x in (e["mean_on_positives"], e["mean_on_rest"])
                    )
                    ap = f"{e['ap']:.3f}" if e.get("ap") is not None else "-"
                    lines.append(f"| {g} | {entry['frames']} | {k} | {e['positives']} | {there} | {rest} | {ap} |")
    lines += ["", "## Per class", "", "| class | clips | accuracy (last frame) | AP | F1 |", "|---|---|---|---|---|"]
    f1_rows = (f1 or {}).get("per_class", {})
    for k, v in m["per_class"].items():
        f1_text = f"{f1_rows[k]['f1']:.2f}" if k in f1_rows else "-"
        lines.append(f"| {k} | {v['n']} | {v['acc_last']:.1%} | {v['ap']:.3f} | {f1_text} |")
    return "\n".join(lines) + "\n"


def event_stream_lines(es: dict[str, Any]) -> list[str]:
    """The report's section on :func:`event_stream`'s result."""
    tol, within = es["onset_tolerance_s"], es["heard_within_s"]
    lines = ["", "## Isolated sounds over a quiet floor (one stream)", ""]
    lines += [
        f"- {es['found']} of {es['sounds']} sounds found with the right label and onset within {tol:g} s; "
        f"{es['false_events']} other events ({', '.join(es['false_labels'][:8]) or 'none'}) in {es['seconds']} s"
    ]
    delay = es["median_onset_delay_s"]
    lines += [
        f"- named at all (an event of its label with an onset from {tol:g} s before the sound to {within:g} s after "
        f"its end): {es['heard']} of {es['sounds']}"
        + (f", onset {delay:+.2f} s from the start (median)" if es["heard"] else "")
    ]
    missed = [f"{r['label']} {r['peak']:.2f}" for r in es["placed"] if not r["found"]]
    if missed:
        lines += [
            f"- not found within {tol:g} s (its label's highest score, from the sound's start to {within:g} s after "
            "its end): " + ", ".join(missed)
        ]
    return lines


def plot_report(report: dict[str, Any], out_dir: Path) -> None:
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    m = report["metrics"]
    fig, ax = plt.subplots(figsize=(5, 3.5))
    xs = [float(k) for k in m["time_to_detect"]]
    ax.plot(xs, list(m["time_to_detect"].values()), "o-", label="streaming model")
    if "baseline_acc" in report:
        ax.axhline(report["baseline_acc"], color="grey", ls="--", label="offline baseline (whole clip)")
    ax.set_xscale("log")
    ax.set_xticks(xs, [f"{x:g}" for x in xs])
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())  # the log axis' own labels overlapped ours
    ax.set_xlabel("audio heard (s)")
    ax.set_ylabel("accuracy")
    ax.set_ylim(0, 1)
    ax.legend()
    ax.set_title("time to detect")
    fig.tight_layout()
    fig.savefig(out_dir / "time_to_detect.png", dpi=110)
    plt.close(fig)
    # the dataset's classes only: a 6-class dataset's argmax is among its 6, so the model's other rows and
    # columns are empty
    keep = [i for i, label in enumerate(m["labels"]) if label in m["per_class"]]
    keep = keep if len(keep) >= 2 else list(range(len(m["labels"])))
    names = [m["labels"][i] for i in keep]
    conf = np.array(m["confusion"], dtype=np.float64)[np.ix_(keep, keep)]
    conf = conf / np.maximum(conf.sum(1, keepdims=True), 1)
    size = max(5, 0.18 * len(names))
    fig, ax = plt.subplots(figsize=(size, size))
    ax.imshow(conf, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(len(names)), names, rotation=90, fontsize=6 if len(names) > 20 else 9)
    ax.set_yticks(range(len(names)), names, fontsize=6 if len(names) > 20 else 9)
    ax.set_xlabel("predicted (last frame)")
    ax.set_ylabel("true")
    fig.tight_layout()
    fig.savefig(out_dir / "confusion.png", dpi=110)
    plt.close(fig)
