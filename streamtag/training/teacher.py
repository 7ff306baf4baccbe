"""Soft frame targets from a pretrained AudioSet tagger (knowledge distillation, training time only).

The teacher is an ONNX graph ``wav32k (batch, samples) -> scores (batch, K)`` (sigmoid
probabilities) with ``audioset_labels.csv`` (``index,mid,display_name``) beside it, such as
EfficientAT ``mn04_as``. It scores whole windows, so each clip is cut into windows of
``window_s`` every ``hop_s``; a frame takes the scores of the first window that ends at or
after it, so targets follow what has been heard (the student is causal) up to ``hop_s``
ahead. Windows before ``window_s`` start at the clip start and are at least ``min_s`` long.

Raw window scores are cached per clip (any label mapping can be applied later without
running the teacher again); a label map (:func:`read_label_map`) turns them into the
student's classes: the max over the AudioSet classes each student class is mapped to.
The teacher never ships with a model and is never needed at run time.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ..errors import AudioFileError, ConfigError
from .datasets import content_digest

TEACHER_RATE = 32000
DEFAULT_MAP = Path(__file__).with_name("teacher_map.tsv")


@dataclasses.dataclass(frozen=True)
class LabelMap:
    """Student label -> AudioSet display names, and dataset label aliases (``dog_bark`` -> ``dog``)."""

    targets: dict[str, tuple[str, ...]]
    aliases: dict[str, str]

    def canonical(self, label: str) -> str:
        return self.aliases.get(label, label)


def read_label_map(path: str | os.PathLike | None = None) -> LabelMap:
    """Read ``label<TAB>display names separated by |<TAB>aliases separated by |``; a first line whose first
    cell is ``label`` is a header (the packaged map has one; a user's may not)."""
    path = Path(path) if path else DEFAULT_MAP
    if not path.is_file():
        raise ConfigError(f"label map not found: {path}")
    targets: dict[str, tuple[str, ...]] = {}
    aliases: dict[str, str] = {}
    with open(path, newline="") as f:
        rows = list(csv.reader(f, delimiter="\t"))
    first = 2 if rows and rows[0] and rows[0][0].strip().lower() == "label" else 1
    for line, row in enumerate(rows[first - 1 :], start=first):
        if not row or not row[0].strip():
            continue
        if len(row) < 2:  # a comma-separated or space-separated file would be read as labels that rename nothing
            raise ConfigError(
                f"{path}, line {line}: {row[0]!r} has no tab; each row is label<TAB>AudioSet names separated "
                "by |<TAB>aliases separated by | (e.g. dog<TAB>Dog|Bark<TAB>dog_bark)"
            )
        label = row[0].strip()
        names = tuple(x.strip() for x in (row[1] if len(row) > 1 else "").split("|") if x.strip())
        targets[label] = names
        for alias in (row[2] if len(row) > 2 else "").split("|"):
            if alias.strip():
                aliases[alias.strip()] = label
    if not targets:
        raise ConfigError(f"{path}: no labels (expected label<TAB>audioset names<TAB>aliases rows)")
    return LabelMap(targets, aliases)


class Teacher:
    """Runs the teacher over clips: cached raw window scores, mapped to student classes on demand."""

    def __init__(
        self,
        path: str | os.PathLike,
        window_s: float = 2.0,
        hop_s: float = 0.5,
        min_s: float = 1.0,
        cache: Path | None = None,
    ) -> None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"--teacher {path}: no such file (an ONNX AudioSet tagger, e.g. mn04_as.onnx)")
        names_csv = path.with_name("audioset_labels.csv")
        if not names_csv.is_file():
            raise ConfigError(f"--teacher {path}: {names_csv.name} (index,mid,display_name) must sit beside it")
        with open(names_csv, newline="") as f:
            self.class_names = [row["display_name"] for row in csv.DictReader(f)]
        if not 0 < min_s <= window_s or hop_s <= 0:
            raise ConfigError(f"teacher windows: need 0 < min ({min_s}) <= window ({window_s}) and hop > 0 ({hop_s})")
        self.path, self.window_s, self.hop_s, self.min_s = path, window_s, hop_s, min_s
        self.ident = f"{content_digest(path)}|{window_s}|{hop_s}|{min_s}"
        self.cache = cache
        self._session = None

    # -- mapping -----------------------------------------------------------------
    def mapping(self, labels: Sequence[str], label_map: LabelMap) -> list[np.ndarray]:
        """For each student label, the teacher class indices it takes the max over (empty: no soft target)."""
        index = {name: i for i, name in enumerate(self.class_names)}
        out = []
        for label in labels:
            names = label_map.targets.get(label, ())
            unknown = [n for n in names if n not in index]
            if unknown:
                raise ConfigError(f"label map: '{label}' names teacher classes it does not have: {unknown[:3]}")
            out.append(np.array([index[n] for n in names], dtype=np.int64))
        return out

    @staticmethod
    def frame_targets(
        windows: dict[str, np.ndarray], n_frames: int, frame_s: float, mapping, first: int = 0
    ) -> np.ndarray:
        """Window scores -> ``(n_frames, classes)`` float32 targets for frames ``first..first + n_frames - 1``,
        NaN for classes without a mapping."""
        return Teacher.frames(windows["ends"], Teacher.map_windows(windows, mapping), n_frames, frame_s, first)

    @staticmethod
    def map_windows(windows: dict[str, np.ndarray], mapping) -> np.ndarray:
        """``(windows, classes)`` float32: each class's maximum over its teacher classes, NaN without any.
        Done once per clip, not per crop: class by class it was a fifth of a training batch's time."""
        scores = windows["scores"]
        out = np.full((scores.shape[0], len(mapping)), np.nan, dtype=np.float32)
        for c, idx in enumerate(mapping):
            if idx.size:
                out[:, c] = scores[:, idx].max(axis=1)
        return out

    @staticmethod
    def frames(ends: np.ndarray, mapped: np.ndarray, n_frames: int, frame_s: float, first: int = 0) -> np.ndarray:
        """Each frame takes the window that has just ended at its end (the last one after the clip)."""
        frame_end = (np.arange(first, first + n_frames) + 1) * frame_s
        which = np.minimum(np.searchsorted(ends, frame_end - 1e-9), len(ends) - 1)
        return mapped[which]

    # -- running it ----------------------------------------------------------------
    def window_ends(self, seconds: float) -> np.ndarray:
        ends = np.arange(self.min_s, seconds + 1e-9, self.hop_s)
        if ends.size == 0 or seconds - ends[-1] > 1e-6:
            ends = np.append(ends, max(seconds, self.min_s))
        return ends

    def score_samples(self, samples16k: np.ndarray, rate: int = 16000) -> dict[str, np.ndarray]:
        """Raw window scores of one clip: ``{"ends": (W,), "scores": (W, K) float16}``."""
        import soxr

        wav = soxr.resample(samples16k.astype(np.float32), rate, TEACHER_RATE).astype(np.float32)
        seconds = len(samples16k) / rate
        ends = self.window_ends(seconds)
        need = int(round(ends[-1] * TEACHER_RATE))
        if wav.size < need:
            wav = np.pad(wav, (0, need - wav.size))
        spans = []
        for e in ends:
            stop = int(round(e * TEACHER_RATE))
            start = max(0, stop - int(round(self.window_s * TEACHER_RATE)))
            spans.append((start, stop))
        scores = np.zeros((len(spans), len(self.class_names)), dtype=np.float32)
        by_length: dict[int, list[int]] = {}
        for i, (a, b) in enumerate(spans):
            by_length.setdefault(b - a, []).append(i)
        session = self._open()
        for members in by_length.values():  # windows of one length go through in one call
            for part in range(0, len(members), 16):
                chunk = members[part : part + 16]
                batch = np.stack([wav[spans[i][0] : spans[i][1]] for i in chunk])
                out = session.run(None, {session.get_inputs()[0].name: batch})[0]
                scores[chunk] = np.asarray(out).reshape(len(chunk), -1)  # mn04 returns (1, batch, K)
        return {"ends": ends.astype(np.float64), "scores": scores.astype(np.float16)}

    def windows(self, path: Path, rate: int) -> dict[str, np.ndarray]:
        """Cached :meth:`score_samples` of an audio file, decoded at ``rate``."""
        from ..sources.file import read_audio

        key = hashlib.sha1(f"{self.ident}|{content_digest(path)}|{rate}".encode())
        cached = self.cache / f"{key.hexdigest()}.npz" if self.cache else None
        if cached is not None and cached.is_file():
            with np.load(cached) as data:
                return {"ends": data["ends"], "scores": data["scores"]}
        samples, _ = read_audio(path, rate, min_samples=1)
        result = self.score_samples(samples, rate)
        if cached is not None:  # write then rename: parallel workers never read half a file
            cached.parent.mkdir(parents=True, exist_ok=True)
            tmp = cached.with_name(f"{cached.stem}.{os.getpid()}.tmp.npz")
            np.savez(tmp, **result)
            os.replace(tmp, cached)
        return result

    def _open(self):
        if self._session is None:
            import onnxruntime as ort

            opts = ort.SessionOptions()
            opts.intra_op_num_threads = 1
            opts.inter_op_num_threads = 1
            opts.log_severity_level = 3  # mn04 declares (batch, K) and returns (1, batch, K): a warning per call
            try:
                self._session = ort.InferenceSession(str(self.path), opts, providers=["CPUExecutionProvider"])
            except Exception as exc:  # onnxruntime raises its own exception types
                raise ConfigError(f"--teacher {self.path}: not an ONNX model onnxruntime can run ({exc})") from None
        return self._session

    def __getstate__(self):  # sessions do not pickle; each process of a --cv run opens its own
        state = dict(self.__dict__)
        state["_session"] = None
        return state


def fill_cache(teacher: Teacher, paths: Sequence[Path], rate: int) -> None:
    """Score every clip not cached yet (the teacher costs about 1% of real time); an unreadable clip is
    skipped here and reported by the trainer when it reads the clip's features."""
    if teacher.cache is None:
        return
    for path in paths:
        try:
            teacher.windows(Path(path), rate)
        except AudioFileError:
            pass
