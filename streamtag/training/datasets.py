"""Labelled clip lists from three layouts, and a feature cache so epochs never decode audio twice.

Layouts:
- ESC-50: ``DATASET/meta/esc50.csv`` (filename, fold, category, src_file, ...) and ``DATASET/audio/``;
- folder per class: ``DATASET/<label>/*.wav|flac|ogg``;
- CSV manifest: a ``.csv`` file with ``path,label[,fold][,group]`` (paths relative to the file).

``group`` names the source recording: clips of one group never sit on both sides of a split.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import os
from pathlib import Path

import numpy as np

from ..config import FeatureConfig
from ..errors import DatasetError

FEATURE_CODE_VERSION = 2  # bump when the feature arithmetic changes: invalidates cached features
AUDIO_SUFFIXES = {".wav", ".flac", ".ogg", ".mp3", ".aiff", ".aif"}


@dataclasses.dataclass(frozen=True)
class Clip:
    path: Path
    label: str
    fold: int | None
    group: str


@dataclasses.dataclass
class Dataset:
    clips: list[Clip]
    labels: list[str]
    name: str

    def targets(self) -> np.ndarray:
        index = {label: i for i, label in enumerate(self.labels)}
        return np.array([index[c.label] for c in self.clips], dtype=np.int64)

    def subset(self, indices) -> Dataset:
        return Dataset([self.clips[i] for i in indices], self.labels, self.name)


def load_dataset(path: str | os.PathLike) -> Dataset:
    path = Path(path)
    if not path.exists():
        raise DatasetError(f"dataset not found: {path}")
    if path.is_file():
        if path.suffix.lower() != ".csv":
            raise DatasetError(f"{path}: a dataset is a folder or a .csv manifest (path,label[,fold])")
        clips = _read_manifest(path)
    elif (path / "meta" / "esc50.csv").is_file():
        clips = _read_esc50(path)
    else:
        clips = _read_class_folders(path)
    if not clips:
        raise DatasetError(f"{path}: no labelled audio clips found")
    missing = [c.path for c in clips if not c.path.is_file()]
    if missing:
        raise DatasetError(f"{path}: {len(missing)} listed clips are missing, e.g. {missing[0]}")
    labels = sorted({c.label for c in clips})
    if len(labels) < 2:
        raise DatasetError(f"{path}: need at least 2 classes to train ({len(labels)} found)")
    return Dataset(clips, labels, path.name)


def _read_esc50(root: Path) -> list[Clip]:
    clips = []
    with open(root / "meta" / "esc50.csv", newline="") as f:
        for row in csv.DictReader(f):
            try:
                clips.append(
                    Clip(
                        root / "audio" / row["filename"],
                        row["category"],
                        int(row["fold"]),
                        f"esc50:{row.get('src_file') or row['filename']}",
                    )
                )
            except (KeyError, ValueError) as exc:
                raise DatasetError(f"{root}/meta/esc50.csv: bad row {row} ({exc})") from None
    return clips


def _read_class_folders(root: Path) -> list[Clip]:
    clips = []
    for folder in sorted(p for p in root.iterdir() if p.is_dir()):
        for f in sorted(folder.rglob("*")):
            if f.suffix.lower() in AUDIO_SUFFIXES:
                clips.append(Clip(f, folder.name, None, f"{folder.name}/{f.stem}"))
    return clips


def _read_manifest(path: Path) -> list[Clip]:
    clips = []
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        if not reader.fieldnames or not {"path", "label"} <= set(reader.fieldnames):
            raise DatasetError(f"{path}: the header must name at least 'path' and 'label' columns")
        for n, row in enumerate(reader, start=2):
            clip_path = Path(row["path"])
            if not clip_path.is_absolute():
                clip_path = path.parent / clip_path
            fold = row.get("fold") or None
            try:
                fold = int(fold) if fold is not None else None
            except ValueError:
                raise DatasetError(f"{path}:{n}: fold must be an integer ({fold!r} given)") from None
            clips.append(Clip(clip_path, row["label"], fold, row.get("group") or str(clip_path)))
    return clips


def grouped_folds(dataset: Dataset, k: int, seed: int = 0) -> np.ndarray:
    """Assign each clip a fold in ``0..k-1``; whole groups move together, classes spread evenly."""
    rng = np.random.default_rng(seed)
    groups: dict[str, list[int]] = {}
    for i, clip in enumerate(dataset.clips):
        groups.setdefault(clip.group, []).append(i)
    by_label: dict[str, list[str]] = {}
    for g, members in groups.items():
        by_label.setdefault(dataset.clips[members[0]].label, []).append(g)
    folds = np.zeros(len(dataset.clips), dtype=np.int64)
    load = np.zeros(k)
    for label in sorted(by_label):
        names = by_label[label]
        rng.shuffle(names)
        per_fold = np.zeros(k)
        for g in sorted(names, key=lambda g: -len(groups[g])):
            target = int(np.lexsort((load, per_fold))[0])  # fewest of this class, then fewest overall
            folds[groups[g]] = target
            per_fold[target] += len(groups[g])
            load[target] += len(groups[g])
    return folds


def compute_features(dataset: Dataset, cfg: FeatureConfig, cache: Path | None) -> list[np.ndarray]:
    """Log-mel ``(frames, n_mels)`` per clip, from the cache when the clip and config are unchanged."""
    import torch

    from ..features import log_mel_offline
    from ..sources.file import read_audio

    out = []
    for clip in dataset.clips:
        stat = clip.path.stat()
        ident = f"{FEATURE_CODE_VERSION}|{clip.path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}|{cfg}"
        key = hashlib.sha1(ident.encode()).hexdigest()
        cached = cache / f"{key}.npy" if cache else None
        if cached is not None and cached.is_file():
            out.append(np.load(cached))
            continue
        samples, _ = read_audio(clip.path, cfg.sample_rate, min_samples=cfg.hop_length)
        feats = log_mel_offline(torch.from_numpy(samples), cfg).numpy().astype(np.float32)
        if cached is not None:  # write then rename: parallel trainers never read a half-written file
            cache.mkdir(parents=True, exist_ok=True)
            tmp = cached.with_name(f"{cached.stem}.{os.getpid()}.tmp.npy")
            np.save(tmp, feats)
            os.replace(tmp, cached)
        out.append(feats)
    return out
