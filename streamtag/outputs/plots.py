"""``--plot``: a picture of a whole recording: log-mel on top, top-class probabilities below, events shaded."""

from __future__ import annotations

import os

import numpy as np

from ..config import FeatureConfig
from ..errors import ConfigError
from ..events import Event
from ..steps import Step
from .files import check_output_path, named_error

TOP_CLASSES = 5


def check_plot_path(path: str | os.PathLike, flag: str = "--plot") -> None:
    """A ``.png`` path whose folder exists and is writable, checked before any audio is read."""
    if not str(path).lower().endswith(".png"):
        raise ConfigError(f"{flag} wants a .png path ({path} given)")
    check_output_path(path, flag)


class RecordingPlot:
    """Collects every step of one stream; on ``close()`` reads the audio file again and draws the PNG."""

    def __init__(
        self, path: str | os.PathLike, audio_path: str | os.PathLike, features: FeatureConfig, title: str = ""
    ) -> None:
        check_plot_path(path)
        import matplotlib  # noqa: F401  (missing: one line naming the extra, before any audio is read)

        self.path, self.audio_path, self.features, self.title = path, audio_path, features, title
        self._probs: list[np.ndarray] = []
        self._events: list[Event] = []
        self._labels: list[str] = []

    def write(self, step: Step) -> None:
        if step.has_scores:
            self._probs.append(step.probs)
            self._labels = list(step.labels)
        self._events.extend(e for e in step.events if e.kind == "close")

    def close(self) -> None:
        if not self._probs:
            return
        from ..sources import read_audio

        samples = read_audio(self.audio_path, self.features.sample_rate)[0]
        try:
            draw_recording(
                self.path, samples, self.features, np.stack(self._probs), self._labels, self._events, self.title
            )
        except OSError as exc:
            raise named_error(exc, self.path) from None


def display_log_mel(samples: np.ndarray, cfg: FeatureConfig) -> np.ndarray:
    """Log-mel ``(n_mels, frames)`` for the picture, in numpy: causal frames, periodic Hann, HTK triangles.

    Display only (the model's features come from its own graph), so a plot needs no torch.
    """
    n = len(samples) // cfg.hop_length
    padded = np.concatenate([np.zeros(cfg.context_length, np.float32), samples[: n * cfg.hop_length]])
    frames = np.lib.stride_tricks.sliding_window_view(padded, cfg.win_length)[:: cfg.hop_length][:n]
    power = np.abs(np.fft.rfft(frames * np.hanning(cfg.win_length + 1)[:-1], axis=1)) ** 2

    def to_mel(f):
        return 2595.0 * np.log10(1.0 + f / 700.0)

    edges = 700.0 * (10 ** (np.linspace(0.0, to_mel(cfg.sample_rate / 2), cfg.n_mels + 2) / 2595.0) - 1.0)
    freqs = np.linspace(0.0, cfg.sample_rate / 2, cfg.n_freqs)[:, None]
    rising = (freqs - edges[:-2]) / (edges[1:-1] - edges[:-2])
    falling = (edges[2:] - freqs) / (edges[2:] - edges[1:-1])
    return np.log(power @ np.maximum(0.0, np.minimum(rising, falling)) + cfg.log_floor).T.astype(np.float32)


def draw_recording(
    path,
    samples: np.ndarray,
    features: FeatureConfig,
    probs: np.ndarray,
    labels: list[str],
    events: list[Event],
    title: str = "",
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    mel = display_log_mel(samples, features)  # (n_mels, frames)
    hop_s = features.frame_seconds
    end = probs.shape[0] * hop_s
    order = np.argsort(-probs.max(axis=0))[:TOP_CLASSES]
    fig, (ax_mel, ax_p) = plt.subplots(2, 1, figsize=(11, 6), sharex=True, gridspec_kw={"height_ratios": [1, 1.2]})
    ax_mel.imshow(
        mel,
        origin="lower",
        aspect="auto",
        extent=(0, mel.shape[1] * hop_s, 0, features.n_mels),
        cmap="magma",
        vmin=np.percentile(mel, 5),
        vmax=mel.max(),
    )
    ax_mel.set_ylabel("mel band")
    ax_mel.set_title(title or "recording")
    t = (np.arange(probs.shape[0]) + 1) * hop_s
    colours = plt.get_cmap("tab10")
    for rank, idx in enumerate(order):
        ax_p.plot(t, probs[:, idx], color=colours(rank), lw=1.4, label=labels[idx])
    for event in events:
        colour = colours(list(order).index(labels.index(event.label))) if labels.index(event.label) in order else "grey"
        for ax in (ax_mel, ax_p):
            ax.axvspan(event.onset, event.offset, color=colour, alpha=0.18, lw=0)
        ax_p.text(event.onset, 1.02, event.label, fontsize=8, color=colour, va="bottom")
    ax_p.set_ylim(0, 1.1)
    ax_p.set_xlim(0, end)
    ax_p.set_xlabel("time (s)")
    ax_p.set_ylabel("probability")
    ax_p.legend(loc="upper right", fontsize=8, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
