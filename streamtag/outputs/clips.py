"""``--save-clips DIR``: the audio around each event as a FLAC file, pre-roll included.

An event is confirmed a little after it starts and its onset is backdated, so the
last ``pre_s`` seconds (plus slack for that backdating) are always kept; a clip
runs from ``pre_s`` before the onset to ``post_s`` after the close, at most
``max_s`` long. Memory is bounded: one ring of recent audio and the clips in flight.
"""

from __future__ import annotations

import datetime
import os
from pathlib import Path

import numpy as np

from ..errors import ConfigError
from ..steps import Step
from .files import named_error

BACKDATE_SLACK_S = 5.0  # an event's onset lies at most this far before it is reported


class _Clip:
    __slots__ = ("label", "onset", "parts", "samples", "end_t", "name")

    def __init__(self, label: str, onset: float, name: str, pre: np.ndarray) -> None:
        self.label, self.onset, self.name = label, onset, name
        self.parts, self.samples, self.end_t = [pre], pre.size, None


class ClipSaver:
    """An output: one FLAC per event in ``folder`` (``<label>_<UTC start>_<onset>s.flac``), the audio as it came
    in (``gain_db``: the gain the steps' audio carries, taken off again)."""

    def __init__(
        self,
        folder: str | os.PathLike,
        sample_rate: int,
        pre_s: float = 2.0,
        post_s: float = 1.0,
        max_s: float = 30.0,
        gain_db: float = 0.0,
    ) -> None:
        self.folder = Path(folder)
        if not self.folder.is_dir():
            raise ConfigError(f"--save-clips {folder}: no such folder; create it first")
        if not os.access(self.folder, os.W_OK):
            raise ConfigError(f"--save-clips {folder}: folder is not writable")
        self.rate, self.pre_s, self.post_s, self.max_s = sample_rate, pre_s, post_s, max_s
        # the steps' audio carries --gain; a clip is what came in (a quiet microphone's clips, raised 20 dB, had
        # a third of their samples squared off at full scale)
        self.undo_gain = float(10.0 ** (-gain_db / 20.0))
        self._recent = np.zeros(int((pre_s + BACKDATE_SLACK_S) * sample_rate), np.float32)
        self._filled = 0  # samples ever written to the ring
        self._t = 0.0  # stream time at the end of the audio seen
        self._clips: list[_Clip] = []
        self.saved = 0  # clips written; a list of them grew for as long as live ran
        self.last_saved: Path | None = None

    def write(self, step: Step) -> None:
        if step.audio is not None and step.has_scores:
            self._remember(step.audio)
            self._t = step.t
            for clip in self._clips:
                if clip.samples < self.max_s * self.rate:
                    clip.parts.append(step.audio)
                    clip.samples += step.audio.size
        for event in step.events:
            if event.kind == "open":
                self._start(event.label, event.onset)
            else:
                for clip in self._clips:
                    if clip.label == event.label and clip.end_t is None:
                        clip.end_t = (event.offset if event.offset is not None else self._t) + self.post_s
        for clip in [c for c in self._clips if c.end_t is not None and self._t >= c.end_t]:
            self._save(clip)

    def close(self) -> None:
        for clip in list(self._clips):
            self._save(clip)

    def _remember(self, audio: np.ndarray) -> None:
        """Into a circular buffer: position ``_filled % size`` is the oldest sample."""
        size = self._recent.size
        audio = audio[-size:]
        start = self._filled % size
        first = min(audio.size, size - start)
        self._recent[start : start + first] = audio[:first]
        self._recent[: audio.size - first] = audio[first:]
        self._filled += audio.size

    def _last(self, n: int) -> np.ndarray:
        """A copy of the last ``n`` samples remembered, oldest first."""
        end = self._filled % self._recent.size
        idx = (np.arange(end - n, end)) % self._recent.size
        return self._recent[idx]

    def _start(self, label: str, onset: float) -> None:
        want = int(round((self._t - max(0.0, onset - self.pre_s)) * self.rate))
        pre = self._last(max(0, min(want, self._recent.size, self._filled)))
        stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H-%M-%SZ")
        self._clips.append(_Clip(label, onset, f"{label}_{stamp}_{onset:.2f}s.flac", pre))

    def _save(self, clip: _Clip) -> None:
        import soundfile as sf

        self._clips.remove(clip)
        audio = np.concatenate(clip.parts)[: int(self.max_s * self.rate)]
        path = self.folder / clip.name
        try:
            sf.write(str(path), np.clip(audio * self.undo_gain, -1.0, 1.0), self.rate, format="FLAC", subtype="PCM_16")
        except (OSError, RuntimeError) as exc:  # soundfile raises LibsndfileError (a RuntimeError)
            raise named_error(OSError(str(exc)), path) from None
        self.saved += 1
        self.last_saved = path
