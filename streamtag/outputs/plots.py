"""``--plot``: a picture of a whole recording, built from what was streamed, in constant memory.

Top: log-mel; middle: the top classes' probabilities; bottom: a timeline of the events
by label. Time is kept in at most ``MAX_COLUMNS`` columns: when a recording outgrows
them, neighbouring columns merge (mel power averaged, probabilities kept at their
maximum so short events stay visible), so an hour or a day draws as fast as a clip
and never holds more than a few MB.
"""

from __future__ import annotations

import os

import numpy as np

from ..config import FeatureConfig
from ..errors import ConfigError
from ..events import Event
from ..steps import Step
from .files import check_output_path, named_error

TOP_CLASSES = 5
MAX_COLUMNS = 3000
TIMELINE_LABELS = 12  # the labels with the most events get a row each
MAX_EVENTS = 20_000  # events kept for the timeline; later ones are counted, not drawn
BLOCK_HOPS = 100  # hops buffered before their display spectra are computed together


def check_plot_path(path: str | os.PathLike, flag: str = "--plot") -> None:
    """A ``.png`` path whose folder exists and is writable, checked before any audio is read."""
    if not str(path).lower().endswith(".png"):
        raise ConfigError(f"{flag} wants a .png path ({path} given)")
    check_output_path(path, flag)


class RecordingPlot:
    """An output: takes every step (its audio, probabilities and events) and draws the PNG on ``close()``."""

    def __init__(self, path: str | os.PathLike, features: FeatureConfig, title: str = "") -> None:
        check_plot_path(path)
        import matplotlib  # noqa: F401  (missing: one line naming the extra, before any audio is read)

        self.path, self.features, self.title = path, features, title
        self._mel = np.zeros((MAX_COLUMNS, features.n_mels), np.float64)  # summed mel power per column
        self._probs: np.ndarray | None = None  # (MAX_COLUMNS, classes) max per column
        self._count = np.zeros(MAX_COLUMNS, np.int64)
        self._bucket = 1  # hops per column
        self._frames = 0
        self._context = np.zeros(features.context_length, np.float32)
        self._pending_audio: list[np.ndarray] = []
        self._pending_probs: list[np.ndarray] = []
        self._events: list[Event] = []
        self._events_dropped = 0
        self._labels: list[str] = []

    def write(self, step: Step) -> None:
        if step.has_scores:
            self._labels = list(step.labels)
            audio = step.audio if step.audio is not None else np.zeros(self.features.hop_length, np.float32)
            self._pending_audio.append(audio)
            self._pending_probs.append(step.probs)
            if len(self._pending_audio) >= BLOCK_HOPS:
                self._flush()
        for event in step.events:
            if event.kind != "close":
                continue
            if len(self._events) < MAX_EVENTS:
                self._events.append(event)
            else:
                self._events_dropped += 1

    def close(self) -> None:
        self._flush()
        if not self._frames:
            return
        n = -(-self._frames // self._bucket)
        mel = np.log(self._mel[:n] / np.maximum(self._count[:n], 1)[:, None] + self.features.log_floor).T
        try:
            draw_recording(
                self.path,
                mel.astype(np.float32),
                self._probs[:n],
                self._bucket * self.features.frame_seconds,
                self._frames * self.features.frame_seconds,
                self._labels,
                self._events,
                self.title,
                self._events_dropped,
            )
        except OSError as exc:
            raise named_error(exc, self.path) from None

    def _flush(self) -> None:
        if not self._pending_audio:
            return
        audio = np.concatenate([self._context, *self._pending_audio])
        probs = np.stack(self._pending_probs)
        self._pending_audio, self._pending_probs = [], []
        self._context = audio[-self.features.context_length :].copy()
        power = display_mel_power(audio, self.features)  # (k, n_mels)
        k = power.shape[0]
        if self._probs is None:
            self._probs = np.zeros((MAX_COLUMNS, probs.shape[1]), np.float32)
        while (self._frames + k - 1) // self._bucket >= MAX_COLUMNS:
            self._merge_pairs()
        cols = (self._frames + np.arange(k)) // self._bucket
        np.add.at(self._mel, cols, power)
        np.maximum.at(self._probs, cols, probs)
        np.add.at(self._count, cols, 1)
        self._frames += k

    def _merge_pairs(self) -> None:
        """Halve the time resolution: column ``i`` becomes columns ``2i`` and ``2i + 1`` together."""
        half = MAX_COLUMNS // 2
        self._mel[:half] = self._mel[0::2] + self._mel[1::2]
        self._count[:half] = self._count[0::2] + self._count[1::2]
        self._probs[:half] = np.maximum(self._probs[0::2], self._probs[1::2])
        for arr in (self._mel, self._count, self._probs):
            arr[half:] = 0
        self._bucket *= 2


def display_mel_power(samples: np.ndarray, cfg: FeatureConfig) -> np.ndarray:
    """Mel power ``(frames, n_mels)`` of samples that start with ``context_length`` samples of left context:
    causal frames, periodic Hann, HTK triangles, in numpy. Display only (the model's features come from its
    own graph), so a plot needs no torch."""
    n = (len(samples) - cfg.context_length) // cfg.hop_length
    frames = np.lib.stride_tricks.sliding_window_view(samples, cfg.win_length)[:: cfg.hop_length][:n]
    power = np.abs(np.fft.rfft(frames * np.hanning(cfg.win_length + 1)[:-1], axis=1)) ** 2

    def to_mel(f):
        return 2595.0 * np.log10(1.0 + f / 700.0)

    edges = 700.0 * (10 ** (np.linspace(0.0, to_mel(cfg.sample_rate / 2), cfg.n_mels + 2) / 2595.0) - 1.0)
    freqs = np.linspace(0.0, cfg.sample_rate / 2, cfg.n_freqs)[:, None]
    rising = (freqs - edges[:-2]) / (edges[1:-1] - edges[:-2])
    falling = (edges[2:] - freqs) / (edges[2:] - edges[1:-1])
    return power @ np.maximum(0.0, np.minimum(rising, falling))


def draw_recording(
    path,
    mel: np.ndarray,
    probs: np.ndarray,
    column_s: float,
    end: float,
    labels: list[str],
    events: list[Event],
    title: str = "",
    events_dropped: int = 0,
) -> None:
    """``mel`` ``(n_mels, columns)`` and ``probs`` ``(columns, classes)``, each column ``column_s`` long."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    counts: dict[str, int] = {}
    for event in events:
        counts[event.label] = counts.get(event.label, 0) + 1
    rows = sorted(counts, key=lambda label: -counts[label])[:TIMELINE_LABELS]
    order = np.argsort(-probs.max(axis=0))[:TOP_CLASSES]
    fig, (ax_mel, ax_p, ax_ev) = plt.subplots(
        3, 1, figsize=(11, 7), sharex=True, gridspec_kw={"height_ratios": [1, 1.1, 0.25 + 0.12 * max(1, len(rows))]}
    )
    ax_mel.imshow(
        mel,
        origin="lower",
        aspect="auto",
        extent=(0, mel.shape[1] * column_s, 0, mel.shape[0]),
        cmap="magma",
        vmin=np.percentile(mel, 5),
        vmax=mel.max(),
        interpolation="nearest",
    )
    ax_mel.set_ylabel("mel band")
    ax_mel.set_title(title or "recording")
    t = (np.arange(probs.shape[0]) + 1) * column_s
    colours = plt.get_cmap("tab10")
    for rank, idx in enumerate(order):
        ax_p.plot(t, probs[:, idx], color=colours(rank), lw=1.2, label=labels[idx])
    ax_p.set_ylim(0, 1.05)
    ax_p.set_ylabel("probability" + (" (max per column)" if column_s > 0.0101 else ""))
    ax_p.legend(loc="upper right", fontsize=8, ncol=2)
    for y, label in enumerate(rows):  # the event timeline: one row per label, a bar per event
        spans = [(e.onset, max(e.offset - e.onset, column_s)) for e in events if e.label == label]
        ax_ev.broken_barh(spans, (y - 0.4, 0.8), color=colours(y % 10))
    ax_ev.set_yticks(range(len(rows)), rows, fontsize=8)
    ax_ev.set_ylim(-0.6, max(1, len(rows)) - 0.4)
    ax_ev.invert_yaxis()
    note = f" ({events_dropped} more not drawn)" if events_dropped else ""
    ax_ev.set_title(f"events{note}" if rows else "no events", fontsize=9, loc="left")
    ax_ev.set_xlim(0, end)
    ax_ev.set_xlabel("time (s)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
