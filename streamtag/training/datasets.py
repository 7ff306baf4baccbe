"""Labelled clip lists from three layouts, and a feature cache so epochs never decode audio twice.

Layouts:
- ESC-50: ``DATASET/meta/esc50.csv`` (filename, fold, category, src_file, ...) and ``DATASET/audio/``;
- folder per class: ``DATASET/<label>/*.wav|flac|ogg`` (hidden files and folders, such as macOS ``._*``, skipped);
- CSV manifest: a ``.csv`` file with ``path,label[,fold][,group]`` (paths relative to the file); rows naming one
  file again add labels to that clip (a clip with several labels holds each of them).

``group`` names the source recording: clips of one group never sit on both sides of a split.

Several datasets train one model through :func:`combine`: dataset labels are renamed by a
label map's aliases (``dog_bark`` -> ``dog``), and each clip remembers its dataset, whose
label set says which classes the clip is known *not* to hold (a dog clip of ESC-50 is no
rain; whether it holds speech, ESC-50 does not say). Unlabelled audio (label ``""``) knows
nothing and learns from a teacher alone.
"""

from __future__ import annotations

import codecs
import csv
import dataclasses
import hashlib
import io
import os
from pathlib import Path

import numpy as np

from ..config import FeatureConfig
from ..errors import DatasetError, count
from ..sources.file import AUDIO_SUFFIXES

FEATURE_CODE_VERSION = 2  # bump when the feature arithmetic changes: invalidates cached features
TRAINED_ON = "trained_on.txt"  # in a model folder: its training clips, so eval can warn about clips it has seen
# in trained_on.txt, before the clips a model learned from the model it started from (train --init)
INHERITED = "# and, through train --init, the clips of the model it started from:"


def trained_on(folder: str | os.PathLike) -> tuple[list[str], list[str]]:
    """A model folder's training clips (identities): its own run's, and those its ``--init`` model learned from
    (empty lists when it has no ``trained_on.txt``)."""
    path = Path(folder) / TRAINED_ON
    if not path.is_file():
        return [], []
    lines = [line for line in path.read_text().split("\n") if line]
    cut = lines.index(INHERITED) if INHERITED in lines else len(lines)
    return lines[:cut], lines[cut + 1 :]


def learned_clips(folder: str | os.PathLike) -> set[str]:
    """Every clip a model folder's weights learned from (:func:`trained_on`, both parts)."""
    own, inherited = trained_on(folder)
    return {*own, *inherited}


def clip_identity(path: Path) -> str:
    """File name and size: the same clip on another machine or under another folder is still recognised."""
    return f"{path.name}\t{path.stat().st_size}"


@dataclasses.dataclass(frozen=True)
class Clip:
    path: Path
    label: str  # "" for unlabelled audio
    fold: int | None
    group: str
    source: str = ""  # the dataset it came from: its label set are the clip's known classes
    weight: float = 1.0  # unlabelled audio: how often its group is drawn, relative to other groups
    also: tuple[str, ...] = ()  # further labels of a multi-label clip (a manifest naming the file again)

    @property
    def labels(self) -> tuple[str, ...]:
        """Every class the clip is labelled with; none for unlabelled audio."""
        return (self.label, *self.also) if self.label else ()


@dataclasses.dataclass
class Dataset:
    clips: list[Clip]
    labels: list[str]
    name: str
    source_labels: dict[str, tuple[str, ...]] = dataclasses.field(default_factory=dict)
    notes: list[str] = dataclasses.field(default_factory=list)  # what the reader passed over or merged: said once

    def targets(self) -> np.ndarray:
        """Class index per clip, -1 for unlabelled audio."""
        index = {label: i for i, label in enumerate(self.labels)}
        return np.array([index.get(c.label, -1) for c in self.clips], dtype=np.int64)

    def hard_targets(self) -> np.ndarray:
        """``(clips, classes)``: 1 for a clip's label, 0 for the other labels of its dataset, NaN unknown."""
        index = {label: i for i, label in enumerate(self.labels)}
        out = np.full((len(self.clips), len(self.labels)), np.nan, dtype=np.float32)
        for n, clip in enumerate(self.clips):
            known = self.source_labels.get(clip.source, tuple(self.labels) if clip.label else ())
            out[n, [index[k] for k in known if k in index]] = 0.0
            for label in clip.labels:
                out[n, index[label]] = 1.0
        return out

    def subset(self, indices) -> Dataset:
        return Dataset([self.clips[i] for i in indices], self.labels, self.name, self.source_labels, self.notes)


def combine(
    datasets: list[Dataset],
    aliases: dict[str, str] | None = None,
    unlabelled: list[Clip] | None = None,
    extra_labels: tuple[str, ...] = (),
) -> Dataset:
    """One training set from several: labels renamed by ``aliases``, each clip tagged with its dataset."""
    aliases = aliases or {}
    clips: list[Clip] = []
    source_labels: dict[str, tuple[str, ...]] = {}
    for n, ds in enumerate(datasets):
        source = f"{n}:{ds.name}"
        source_labels[source] = tuple(sorted({aliases.get(x, x) for x in ds.labels}))
        for c in ds.clips:
            also = tuple(dict.fromkeys(aliases.get(x, x) for x in c.also))
            clips.append(dataclasses.replace(c, label=aliases.get(c.label, c.label), also=also, source=source))
    clips += [dataclasses.replace(c, label="", source="unlabelled") for c in unlabelled or []]
    labels = sorted({x for c in clips for x in c.labels} | set(extra_labels))
    check_labels(labels, " + ".join(ds.name for ds in datasets))
    name = "+".join(ds.name for ds in datasets) + ("+unlabelled" if unlabelled else "")
    return Dataset(clips, labels, name, source_labels, [note for ds in datasets for note in ds.notes])


# a label is a TSV column header (--scores), an MQTT topic level and a key in tag's "label:count;..." cells
UNSAFE_IN_LABELS = "#+/:;"


def check_labels(labels, where: str, trained: bool = True) -> None:
    """'Rain' and 'rain' would be two classes that each teach the other absent: refuse, naming both. A class a
    model is ``trained`` on (after the label map) that cannot be a column, a topic level or a summary key (a
    tab, '#', '/') is refused too: it was trained, then broke serve's MQTT (a traceback) and shifted every score
    column after it in a TSV. A dataset's own labels may hold them (a map renames them; eval only compares)."""
    from ..outputs.mqtt import topic_clash

    for label in labels if trained else ():
        bad = sorted({c for c in label if c in UNSAFE_IN_LABELS or not c.isprintable()})
        if bad:
            raise DatasetError(
                f"{where}: label {label!r} holds {' '.join(repr(c) for c in bad)}: a label names a column, an MQTT "
                f"topic and a summary key, so it may not hold {' '.join(UNSAFE_IN_LABELS)} or tabs; rename it"
            )
    clash = topic_clash(labels) if trained else None  # serve --mqtt refused the model only then
    if clash is not None and clash[1] is None:
        raise DatasetError(f"{where}: a class named {clash[0]!r} would be serve's MQTT topic of the level; rename it")
    if clash is not None:
        raise DatasetError(
            f"{where}: labels {clash[0]!r} and {clash[1]!r} would be one Home Assistant id (serve --mqtt); rename one"
        )
    seen: dict[str, str] = {}
    for label in labels:
        other = seen.setdefault(label.casefold(), label)
        if other != label:
            raise DatasetError(f"{where}: labels {other!r} and {label!r} differ only by case; spell each class one way")


def _visible(path: Path, root: Path) -> bool:
    """Not hidden below ``root`` (macOS ``._x.wav`` AppleDouble files, ``.git``, ``.DS_Store``)."""
    return not any(part.startswith(".") for part in path.relative_to(root).parts)


def read_unlabelled(path: str | os.PathLike) -> list[Clip]:
    """Audio without labels: a folder (searched recursively) or a CSV with ``path`` (and optional ``group``
    and ``weight``: training draws a group, then a file of it, so a package of many short files does not crowd
    out one of a few long ones; ``weight`` makes a group drawn that many times as often as a group of weight 1,
    for a kind of audio that a few groups hold and the model must learn well, such as speech)."""
    path = Path(path)
    if not path.exists():
        raise DatasetError(f"unlabelled audio not found: {path}")
    if path.is_dir():
        files = sorted(f for f in path.rglob("*") if f.suffix.lower() in AUDIO_SUFFIXES and _visible(f, path))
        clips = [Clip(f, "", None, str(f)) for f in files]
    else:
        with csv_text(path) as f:
            reader = csv.DictReader(f)
            if not reader.fieldnames or "path" not in reader.fieldnames:
                raise DatasetError(f"{path}: the header must name a 'path' column")
            clips = []
            for line, row in enumerate(reader, start=2):
                clip_path = Path(row["path"])
                if not clip_path.is_absolute():
                    clip_path = path.parent / clip_path
                weight = _weight(row.get("weight"), f"{path}, line {line}")
                clips.append(Clip(clip_path, "", None, row.get("group") or str(clip_path), weight=weight))
            check_group_weights([(str(path), clips)])
    if not clips:
        raise DatasetError(f"{path}: no audio files found")
    missing = [c.path for c in clips if not c.path.is_file()]
    if missing:
        raise DatasetError(
            f"{path}: {count(len(missing), 'listed file is', 'listed files are')} missing, e.g. {missing[0]}"
        )
    return clips


def check_group_weights(sources: list[tuple[str, list[Clip]]]) -> None:
    """A weight belongs to a group: training draws the group, so two weights for one group (in one manifest,
    or in two manifests that share a group name) would leave it unclear how often to draw it. ``sources``
    pairs each manifest's name with its clips, so the error names the manifests that disagree."""
    seen: dict[str, tuple[float, str]] = {}
    for where, clips in sources:
        for c in clips:
            weight, first = seen.setdefault(c.group, (c.weight, where))
            if weight != c.weight:
                at = where if first == where else f"{first} and {where}"
                raise DatasetError(
                    f"{at}: group '{c.group}' has weights {weight:g} and {c.weight:g}: "
                    "a weight belongs to a group, give all its rows the same"
                )


def _weight(text: str | None, where: str) -> float:
    if text is None or not text.strip():
        return 1.0
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not (value > 0 and np.isfinite(value)):
        raise DatasetError(f"{where}: weight '{text}' must be a positive number (or empty for 1)")
    return value


def load_dataset(path: str | os.PathLike, min_classes: int = 2) -> Dataset:
    """Read one dataset; ``min_classes=1`` for a dataset that is one of several (e.g. only crying babies)."""
    path = Path(path)
    if not path.exists():
        raise DatasetError(f"dataset not found: {path}")
    notes: list[str] = []
    if path.is_file():
        if path.suffix.lower() not in MANIFEST_SUFFIXES:
            raise DatasetError(f"{path}: a dataset is a folder or a .csv manifest (path,label[,fold][,group])")
        clips = _read_manifest(path, notes)
    elif (path / "meta" / "esc50.csv").is_file():
        clips = _read_esc50(path)
    else:
        clips = _read_class_folders(path, notes)
    if not clips:
        loose = path.is_dir() and any(f.suffix.lower() in AUDIO_SUFFIXES for f in path.iterdir() if f.is_file())
        fix = (  # one class's folder given for the dataset's
            " (audio files, but no class folders); give the folder above it (one subfolder of clips per class) "
            "or a .csv manifest"
        )
        raise DatasetError(f"{path}: no labelled audio clips found{fix if loose else ''}")
    missing = [c.path for c in clips if not c.path.is_file()]
    if missing:
        raise DatasetError(
            f"{path}: {count(len(missing), 'listed clip is', 'listed clips are')} missing, e.g. {missing[0]}"
        )
    labels = sorted({x for c in clips for x in c.labels})
    check_labels(labels, str(path), trained=False)
    if len(labels) < min_classes:  # what was left out is why, often (the notes are printed after a dataset loads)
        why = f"; {notes[0]}" if notes else ""
        raise DatasetError(f"{path}: need at least {min_classes} classes to train ({len(labels)} found){why}")
    return Dataset(clips, labels, path.name, notes=notes)


def _read_esc50(root: Path) -> list[Clip]:
    clips = []
    with open(root / "meta" / "esc50.csv", newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        absent = [c for c in ("filename", "category", "fold") if c not in (reader.fieldnames or ())]
        if absent:
            raise DatasetError(
                f"{root}/meta/esc50.csv has no {', '.join(absent)} column: ESC-50's own meta file has "
                "filename, fold, target, category, esc10, src_file and take"
            )
        for row in reader:
            try:
                clips.append(
                    Clip(
                        root / "audio" / row["filename"],
                        row["category"],
                        int(row["fold"]),
                        f"freesound:{row['src_file']}" if row.get("src_file") else f"esc50:{row['filename']}",
                    )
                )
            except (KeyError, ValueError) as exc:
                raise DatasetError(f"{root}/meta/esc50.csv: bad row {row} ({exc})") from None
    return clips


def _read_class_folders(root: Path, notes: list[str]) -> list[Clip]:
    clips, passed_over, empty = [], [], []
    for folder in sorted(p for p in root.iterdir() if p.is_dir() and _visible(p, root)):
        found = 0
        for f in sorted(folder.rglob("*")):
            if not f.is_file() or not _visible(f, root):  # hidden: macOS ._x.wav metadata, .DS_Store
                continue
            if f.suffix.lower() in AUDIO_SUFFIXES:
                clips.append(Clip(f, folder.name, None, f"{folder.name}/{f.stem}"))
                found += 1
            else:
                passed_over.append(f)
        if not found:
            empty.append(folder.name)
    # a class whose files the reader cannot take would vanish from the label list without a word
    if passed_over:
        kinds = ", ".join(sorted({f.suffix.lower() or "no extension" for f in passed_over}))
        notes.append(
            f"{root}: {count(len(passed_over), 'file', 'files')} skipped, the reader does not take {kinds} (e.g. "
            f"{passed_over[0]}); convert to WAV or FLAC to use"
        )
    if empty:
        notes.append(f"{root}: no audio in {', '.join(empty[:8])}: not a class of this dataset")
    audio = (p for p in sorted(root.iterdir()) if p.suffix.lower() in AUDIO_SUFFIXES)
    loose = [p for p in audio if p.is_file() and _visible(p, root)]
    if loose:  # a class is a folder: audio beside the folders has none
        notes.append(
            f"{root}: {count(len(loose), 'audio file')} beside the class folders (e.g. {loose[0].name}) left out: "
            "a clip's class is the folder it is in; move them into one"
        )
    return clips


MANIFEST_SUFFIXES = (".csv", ".tsv", ".txt")  # Excel's "Unicode text" is a tab-separated .txt


def csv_text(path: Path) -> io.StringIO:
    """A CSV's text: UTF-8 (Excel's "CSV UTF-8" starts with a byte-order mark), or UTF-16 with its mark (Excel's
    "Unicode text"); anything else (Excel's plain "CSV" in a Windows code page) is refused with the line it fails
    on, not a traceback, and not read as other characters than were meant."""
    data = Path(path).read_bytes()
    utf16 = data[:2] in (codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)
    if not utf16 and b"\0" in data[:200]:  # UTF-16 without its mark: read as UTF-8, a header of NULs
        raise DatasetError(f'{path}: UTF-16 text without a byte-order mark; save it as "CSV UTF-8" (Excel) or UTF-8')
    try:
        text = data.decode("utf-16" if utf16 else "utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        what = "UTF-16 text (it starts like it)" if utf16 else f"UTF-8 text (byte 0x{data[exc.start]:02x})"
        raise DatasetError(f'{path}:{line}: not {what}; save it as "CSV UTF-8" (Excel) or UTF-8') from None
    header = text.split("\n", 1)[0]
    if "\t" in header and "," not in header:  # tab-separated (Excel's "Unicode text"): as CSV, quoted where needed
        out = io.StringIO(newline="")
        csv.writer(out).writerows(csv.reader(io.StringIO(text, newline=""), delimiter="\t"))
        text = out.getvalue()
    return io.StringIO(text, newline="")


def _read_manifest(path: Path, notes: list[str]) -> list[Clip]:
    clips: dict[Path, Clip] = {}  # by resolved path: a file listed again adds a label to its clip
    repeated = 0
    with csv_text(path) as f:
        reader = csv.DictReader(f)
        if not reader.fieldnames or not {"path", "label"} <= {x.strip() for x in reader.fieldnames}:
            raise DatasetError(f"{path}: the header must name at least 'path' and 'label' columns")
        reader.fieldnames = [x.strip() for x in reader.fieldnames]
        for n, row in enumerate(reader, start=2):
            row = {k: (v or "").strip() for k, v in row.items() if k is not None}  # 'rain ' is rain
            if not row.get("path") or not row.get("label"):
                raise DatasetError(f"{path}:{n}: every row needs a path and a label ({row.get('path')!r} given)")
            clip_path = Path(row["path"])
            if not clip_path.is_absolute():
                clip_path = path.parent / clip_path
            fold = row.get("fold") or None
            try:
                fold = int(fold) if fold is not None else None
            except ValueError:
                raise DatasetError(f"{path}:{n}: fold must be an integer ({fold!r} given)") from None
            key = clip_path.resolve()  # one file however it is named (../, a link)
            clip = Clip(clip_path, row["label"], fold, row.get("group") or str(key))
            first = clips.get(key)
            if first is None:
                clips[key] = clip
                continue
            repeated += 1
            if (first.fold, first.group) != (clip.fold, clip.group):
                raise DatasetError(
                    f"{path}:{n}: {row['path']} is listed before with another fold or group; one file is one clip"
                )
            if clip.label != first.label and clip.label not in first.also:
                clips[key] = dataclasses.replace(first, also=(*first.also, clip.label))
    if repeated:
        notes.append(
            f"{path}: {count(repeated, 'row names a file', 'rows name files')} listed before: one clip each, "
            "holding every label its rows give"
        )
    return list(clips.values())


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


def content_digest(path: Path) -> str:
    """SHA-1 of a file's bytes: what the training caches are keyed on, so a dataset that is copied, moved or
    provisioned again (new paths and times, the same audio) keeps its cached features and teacher scores."""
    digest = hashlib.sha1()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def compute_features(dataset: Dataset, cfg: FeatureConfig, cache: Path | None) -> list[np.ndarray]:
    """Log-mel ``(frames, n_mels)`` per clip, from the cache when the clip and config are unchanged."""
    import torch

    from ..features import log_mel_offline
    from ..sources.file import read_audio

    out = []
    for clip in dataset.clips:
        ident = f"{FEATURE_CODE_VERSION}|{content_digest(clip.path)}|{cfg}"
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
