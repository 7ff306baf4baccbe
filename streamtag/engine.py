"""One stream's engine: samples in, steps out. No thread, no ring, no transport.

:class:`StreamTagger` is the state machine of one stream, in the shape of silero-vad's
``VADIterator``: ``feed(samples)`` returns a :class:`~streamtag.steps.Step` for every hop
it completes (probabilities and events), ``finish()`` flushes and closes the events still
open, ``reset()`` forgets the past. It owns everything between the samples and the
outputs: the input contract, resampling, hop assembly, the guard that keeps a bad
sample out of the model state, the gain, the level meter, the reset policies and the
event detector. Every runner drives it: the worker thread (``live``, ``replay``),
:func:`~streamtag.pipeline.tag_file` (a plain loop), :class:`~streamtag.multistream.MultiStreamTagger`
(many streams, one batched model call a round), eval and bench; so they cannot disagree.

    tagger = StreamTagger()                   # the bundled model, onnxruntime
    for chunk in chunks:                      # any sizes, float32 mono at 16 kHz
        for step in tagger.feed(chunk):
            print(step.t, step.events)
    tagger.finish()
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import os
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from typing import NamedTuple, Protocol

import numpy as np

from .backends import Backend, make_backend
from .errors import ConfigError, InputError, is_real, is_whole
from .events import Event, EventDetector, EventParams, check_close_reason, model_detector
from .resample import StreamResampler, check_rate
from .steps import Step, StepBlock, as_steps, write_to

FULL_SCALE = 1.0  # float audio is -1..1; a sample beyond it is clipped (counted), as an ADC would
CLIPPED_SHARE = 0.01  # more of a stream's samples than this clipped: its format or level is wrong, not overshoot
OVERSHOOT_PEAK = 10 ** (1.5 / 20)  # a lossy codec's or a resampler's overshoot stays below this (+1.5 dBFS)
ENGINE_OPTIONS = frozenset({"reset_every_s", "reset_on_silence_s", "gain_db"})  # a runner passes these on as given
PENDING_HOPS = 64  # the hop buffer's usual size; a buffer grown past PENDING_KEEP_HOPS shrinks back once empty
PENDING_KEEP_HOPS = 1024
MAX_GAIN_DB = 60.0  # --gain's range too: beyond it a gain is a mistake (a level in dBFS given as a gain?)
SNAPSHOT_KEYS = frozenset({"pending", "frames", "silent_run", "detector", "stats"})  # what restore() needs
MAX_SKIP_S = 1e9  # about 30 years: more is a mistake (a timestamp given as a duration?)
SILENCE_PEAK = 1e-3  # a hop whose peak stays below this (-60 dBFS) counts as silence for reset_on_silence_s
AudioLike = np.ndarray | Sequence[float]  # what feed() takes: see as_mono_float32
_INT_SCALE = {np.dtype(np.int16): 1 / 32768.0, np.dtype(np.int32): 1 / 2147483648.0}


def as_mono_float32(samples: AudioLike) -> np.ndarray:
    """The engines' input contract: a 1-D float32 array of samples in -1..1.

    Documented conversions: float64 and float16 (and lists of floats) are cast; int16 and int32 PCM are scaled to -1..1;
    a ``(n, 1)`` or ``(1, n)`` array is taken as mono. Anything else (several channels, other integer
    types, non-numbers) raises :class:`~streamtag.errors.InputError` naming what was given.
    """
    if samples is None or isinstance(samples, (str, bytes, bytearray)):  # not audio (bytes: decode PCM first)
        raise InputError(f"samples must be a numpy array (or a list of floats); got {type(samples).__name__}")
    try:
        arr = samples if isinstance(samples, np.ndarray) else np.asarray(samples)
    except ValueError as exc:  # a ragged list (rows of different lengths), or an object that is no array
        why = "rows of different lengths" if "inhomogeneous" in str(exc) else str(exc).splitlines()[0]
        raise InputError(f"samples must be a 1-D array of numbers; got {why}") from None
    if arr.ndim == 0 and arr.dtype == object:  # a generator, a dict: numpy wraps it whole
        raise InputError(f"samples must be a numpy array (or a list of floats); got {type(samples).__name__}")
    if arr.size == 0 and arr.ndim == 2:  # no samples in any layout: nothing to do, not a channel question
        return np.zeros(0, np.float32)
    if arr.ndim == 2 and 1 in arr.shape:
        arr = arr.reshape(-1)
    if arr.ndim != 1:
        channels_first = arr.ndim == 2 and arr.shape[0] < arr.shape[1]
        axis, layout = (0, "(channels, frames)") if channels_first else (1, "(frames, channels)")
        raise InputError(
            f"samples must be mono, a 1-D array; got shape {arr.shape}"
            + (f": mix channels down first (samples.mean(axis={axis}) for {layout})" if arr.ndim == 2 else "")
        )
    if arr.dtype == np.float32:
        return arr
    native = arr.dtype.newbyteorder("=")  # big-endian PCM is PCM too
    if native in _INT_SCALE:
        return arr.astype(np.float32) * np.float32(_INT_SCALE[native])
    if arr.dtype.kind == "f":
        if arr.dtype.itemsize > 4:  # a finite sample beyond float32's range became Inf (said as NaN/Inf, with a
            top = np.finfo(np.float32).max  # RuntimeWarning): it is beyond full scale, and clipped as such
            big = np.isfinite(arr) & (np.abs(arr) > top)
            if big.any():
                arr = np.where(big, np.sign(arr) * top, arr)
        return arr.astype(np.float32)
    listed = not isinstance(samples, np.ndarray)
    raise InputError(
        f"samples must be float32 in -1..1 (int16 and int32 PCM are scaled); got dtype {arr.dtype}"
        + (" (a list with non-numbers?)" if arr.dtype == object else "")
        + (  # [0] * 160 is silence or PCM to numpy alike: which one is the caller's to say
            ": a list of whole numbers is floats in -1..1 or PCM, say which (np.array(x, np.float32) or np.int16)"
            if listed and arr.dtype.kind in "iu"
            else ""
        )
    )


@dataclasses.dataclass
class StreamStats:
    """What an engine has seen over its life (``finish()`` and ``reset()`` keep it)."""

    frames: int = 0  # hops stepped
    nonfinite: int = 0  # NaN/Inf samples replaced by 0
    clipped: int = 0  # samples beyond full scale, clipped to it
    clipped_peak: float = 0.0  # the largest of them, before clipping
    samples: int = 0  # samples pushed (at the input's rate): what ``clipped`` is a share of
    power_sum: float = 0.0  # sum of hop mean squares (after the gain): the stream's RMS
    peak: float = 0.0  # after the gain
    recent_power: float = 0.0  # mean square of the last ~0.3 s, for a level meter
    model_ns: int = 0  # time in the model's step calls

    def add(self, level: BlockLevel, hops: int) -> None:
        """Count a block of ``hops`` hops in."""
        self.frames += hops
        self.power_sum += level.power_sum
        self.recent_power = level.carry * self.recent_power + level.recent
        self.peak = max(self.peak, level.peak)

    @property
    def rms_dbfs(self) -> float:
        return _dbfs(self.power_sum / self.frames) if self.frames else float("-inf")

    @property
    def peak_dbfs(self) -> float:
        return 20 * float(np.log10(self.peak)) if self.peak > 0 else float("-inf")

    @property
    def recent_dbfs(self) -> float:
        return _dbfs(self.recent_power)

    def problems(self, overshoot: bool = True) -> str | None:
        """One line about samples that were replaced, or None: what it likely means, and what to do.
        ``overshoot=False`` leaves out a few samples just over full scale (a lossy codec's, a loud mix's)."""
        parts = []
        if self.nonfinite:
            parts.append(f"{self.nonfinite} NaN/Inf samples were replaced by 0")
        if self.clipped:
            peak = 20 * np.log10(max(self.clipped_peak, FULL_SCALE))
            parts.append(f"{self.clipped} samples beyond full scale (|x| > 1) were clipped (peak {peak:+.1f} dBFS)")
        if not parts:
            return None
        if not self.nonfinite and self.clipped <= CLIPPED_SHARE * self.samples and self.clipped_peak < OVERSHOOT_PEAK:
            return parts[0] + ": a loud recording's overshoot, too little to matter" if overshoot else None
        if not self.nonfinite:  # floats that are floats: a mix with headroom loses its peaks here
            return (
                f"{parts[0]}: a float recording louder than full scale? turn it down before tagging "
                f"(ffmpeg -i FILE -af volume=-{np.ceil(peak):.0f}dB -f wav - | streamtag replay -); "
                "or is the input format right (e.g. int16 read as float)?"
            )
        return "; ".join(parts) + ": is the input format right (e.g. int16 read as float)?"


class HopModel(Protocol):
    """The model side of one engine: its own state, stepped a block of hops at a time."""

    def step(self, hops: np.ndarray) -> np.ndarray:
        """``(k, hop)`` float32 -> probabilities ``(k, classes)``, the same as ``k`` single hops."""

    def clear(self) -> None:
        """Back to a new stream's state."""


ONE_THREAD = "it belongs to one thread at a time (give each thread its own, or hold one lock around every call)"


def one_thread(method):
    """Refuse a call made while another thread is inside the object (two threads feeding one engine scrambled its
    audio, silently: hops stepped twice, others never). The same thread may call in again (``finish`` feeds).
    The object holds an ``RLock`` as ``_one_thread``; taken without waiting, so a race is an error, not a wait."""

    @functools.wraps(method)
    def guarded(self, *args, **kwargs):
        lock = self._one_thread
        if not lock.acquire(blocking=False):
            raise ConfigError(
                f"{type(self).__name__}.{method.__name__}() was called while another thread is inside it: "
                + getattr(self, "busy", ONE_THREAD)
            )
        try:
            return method(self, *args, **kwargs)
        finally:
            lock.release()

    return guarded


class SingleStream:
    """A :class:`HopModel` over a backend of batch size 1: a backlog goes to the backend in one call."""

    busy = "its backend is stepping another thread's stream (give each thread its own backend: make_backend)"

    def __init__(self, backend: Backend) -> None:
        if backend.batch_size != 1:
            raise ConfigError(f"an engine steps one stream: its backend needs batch_size 1 ({backend.batch_size})")
        self.backend = backend
        # one lock a backend, whichever engine holds it: an engine made on another thread (tag_file twice at once)
        # reset the state under a step still running, and the stepping one's scores went wrong without a word
        self._one_thread = backend.__dict__.setdefault("_one_thread", threading.RLock())

    @one_thread
    def claim(self) -> None:
        """Make the backend's state this stream's, from a new one: an open backend may hold another stream's,
        whose engine is refused from then on."""
        self.backend.reset_states()
        self.backend._stream_owner = self  # the stream whose state the backend holds

    @one_thread
    def step(self, hops: np.ndarray) -> np.ndarray:
        self.check_owner()
        if hops.shape[0] == 1:
            return self.backend(hops[:1])
        return self.backend.steps(hops[None])[0]

    @one_thread
    def clear(self) -> None:
        self.check_owner()  # an older engine's reset or finish would wipe the newer one's state
        self.backend.reset_states()

    def check_owner(self) -> None:
        if getattr(self.backend, "_stream_owner", self) is not self:  # its state is another stream's now
            raise ConfigError(
                "this backend holds one stream's state and a newer StreamTagger took it: give each stream its own "
                "backend (make_backend), or use MultiStreamTagger for many"
            )


def _snapshot_checks(snapshot: dict) -> list[tuple[str, bool]]:
    """Each part of an engine snapshot, and whether it is what :meth:`StreamTagger.snapshot` makes (a restore
    that failed part-way had lost the engine's pending audio)."""
    pending, detector = snapshot["pending"], snapshot["detector"]
    return [
        ("pending", isinstance(pending, np.ndarray) and pending.ndim == 1 and pending.dtype == np.float32),
        ("frames", is_whole(snapshot["frames"]) and snapshot["frames"] >= 0),
        ("silent_run", is_whole(snapshot["silent_run"]) and snapshot["silent_run"] >= 0),
        ("skipped", is_real(snapshot.get("skipped", 0.0)) and 0 <= snapshot.get("skipped", 0.0) < MAX_SKIP_S),
        ("detector", detector is None or isinstance(detector, EventDetector)),
        ("stats", isinstance(snapshot["stats"], StreamStats)),
    ]


class StreamTagger:
    """One stream: ``feed(samples) -> list[Step]``, ``finish() -> list[Step]``, ``reset() -> list[Step]``.

    Args:
        model: a model folder (the bundled one when ``None``) or an open backend of batch size 1 (its state
            is cleared: a new engine starts a new stream).
        backend (str): ``onnx`` or ``torch``, when ``model`` is a folder. (Default: ``onnx``)
        sample_rate (int): rate of the samples fed; resampled to the model's. (Default: the model's rate)
        events: ``True`` for events at the model's settings (its folder's ``events.toml``, else the
            defaults), an :class:`EventParams` for every class, an
            :class:`EventDetector` (or a function making one), or ``None`` for probabilities only.
            (Default: ``True``)
        reset_every_s (float): forget the past every this many seconds of stream. (Default: never)
        reset_on_silence_s (float): forget it after this much silence (peak below -60 dBFS). (Default: never)
        gain_db (float): applied to every sample after the guard. (Default: ``0``)
        hop_model: the model side, when several engines share a batched backend (a
            :class:`MultiStreamTagger` gives each its slot). (Default: ``model`` stepped alone)

    A sample that is NaN or Inf is replaced by 0, one beyond full scale is clipped to it; both are
    counted in :attr:`stats` and never reach the model state. The time of a step is stream time:
    hops since the stream started (``finish()`` starts the next stream at 0).
    """

    def __init__(
        self,
        model: str | os.PathLike | Backend | None = None,
        *,
        backend: str = "onnx",
        sample_rate: int | None = None,
        events: bool | EventParams | EventDetector | Callable[[], EventDetector] | None = True,
        reset_every_s: float | None = None,
        reset_on_silence_s: float | None = None,
        gain_db: float = 0.0,
        hop_model: HopModel | None = None,
    ) -> None:
        if model is None or isinstance(model, (str, os.PathLike)):
            model = make_backend(backend, model)
        elif not hasattr(model, "config") or not hasattr(model, "labels"):
            raise ConfigError(
                f"model must be a model folder or an open backend (make_backend), not {type(model).__name__}"
            )
        self.backend = model
        feats = model.config.features
        self.labels = model.labels
        self.hop = feats.hop_length
        self.frame_seconds = feats.frame_seconds
        self.model_rate = feats.sample_rate
        self.sample_rate = self.model_rate if sample_rate is None else check_rate(sample_rate)
        if not (is_real(gain_db) and abs(gain_db) <= MAX_GAIN_DB):
            raise ConfigError(f"gain_db must be a number in -{MAX_GAIN_DB:g}..{MAX_GAIN_DB:g} ({gain_db!r} given)")
        for name, value in (("reset_every_s", reset_every_s), ("reset_on_silence_s", reset_on_silence_s)):
            if value is not None and not (is_real(value) and 0 < value < float("inf")):
                raise ConfigError(f"{name} must be a finite number > 0 ({value!r} given)")
        self.detector = _detector(events, self.labels, self.frame_seconds, getattr(model, "folder", None))
        if hop_model is None:  # an open backend may hold another stream's state: start from a new one (once the
            hop_model = SingleStream(model)  # arguments are checked: a refused engine takes no one's backend)
            hop_model.claim()
        self.hop_model = hop_model
        self.gain_db = float(gain_db)
        self._gain = np.float32(10 ** (gain_db / 20))
        self._reset_every = None if reset_every_s is None else max(1, round(reset_every_s / self.frame_seconds))
        self._silence_frames = (
            None if reset_on_silence_s is None else max(1, round(reset_on_silence_s / self.frame_seconds))
        )
        self.stats = StreamStats()
        self._one_thread = threading.RLock()  # a call from a second thread while one is inside: refused
        self._resampler = (
            StreamResampler(self.sample_rate, self.model_rate) if self.sample_rate != self.model_rate else None
        )
        self._pending = np.zeros(self.hop * PENDING_HOPS, np.float32)  # samples not yet stepped (grows for big chunks)
        self._fill = 0
        self._start = 0  # first pending sample not yet stepped
        self.frames = 0  # hops of this stream so far
        self._skipped = 0.0  # samples of a gap not yet a whole hop (skip)
        self._silent_run = 0

    # -- the three calls -------------------------------------------------------------
    def feed(self, samples: AudioLike) -> list[Step]:
        """Take samples (any count); return a step for every hop they complete, in order. Each step owns its
        scores and audio (about 1 KB at 16 kHz): for a long recording, feed blocks of a few seconds and hand
        the steps on, or use :meth:`feed_blocks`, rather than one call for the whole file."""
        return as_steps(self.feed_blocks(samples))

    @one_thread
    def feed_blocks(self, samples: AudioLike) -> list[Step | StepBlock]:
        """:meth:`feed` with the hops of each model call as one :class:`StepBlock` (the event-only steps of a
        reset as they are): what a runner that moves many hops reads, without a Python object per hop."""
        self.push(samples)
        out: list[Step | StepBlock] = []
        while self.ready:
            out += self.before_hop()
            k = self.block_length()
            hops = self.take(k)
            t0 = time.perf_counter_ns()
            probs = self.hop_model.step(hops)
            self.stats.model_ns += time.perf_counter_ns() - t0
            out.append(self.complete_block(hops, probs))
        return out

    @one_thread
    def finish(self, reason: str = "stream_end") -> list[Step]:
        """End of the stream: step what the resampler still holds, close open events (``reason``) and start
        a new stream (state, time and hop buffer cleared; a last part-hop is not tagged)."""
        check_close_reason(reason)  # before anything changes
        getattr(self.hop_model, "check_owner", lambda: None)()  # (a backend a newer engine took: refused here)
        out: list[Step] = []
        if self._resampler is not None:
            self._append(self._resampler.process(np.zeros(0, np.float32), last=True))
            out += self.feed(np.zeros(0, np.float32))
            self._resampler.reset_states()
        self.hop_model.clear()  # first: refused (nothing changed) when another engine has taken the backend
        out += self._close_events(reason)
        self._fill = self._start = 0
        self.frames = 0
        self._skipped = 0.0
        self._silent_run = 0
        return out

    @one_thread
    def reset(self, reason: str = "reset") -> list[Step]:
        """Forget the past (model state, audio context); open events close with ``reason``. Stream time
        goes on; samples not yet a whole hop are kept, and so is the resampler's few ms of filter delay."""
        check_close_reason(reason)  # before anything changes
        self.hop_model.clear()  # first: refused (nothing changed) when another engine has taken the backend
        return self._close_events(reason)

    @one_thread
    def skip(self, seconds: float) -> None:
        """Move stream time on over audio that never came (a microphone away, then back, after a :meth:`reset`;
        samples a slow reader dropped): the steps after it keep their place on the recording's clock instead of
        closing up the gap. Whole hops (the rest is carried to the next gap); a part-hop of samples from before
        the gap is stepped with the first ones after it, so every sample taken is still tagged."""
        if not (is_real(seconds) and 0 <= seconds < MAX_SKIP_S):
            raise ConfigError(f"skip takes seconds, 0 <= seconds < {MAX_SKIP_S:g} ({seconds!r} given)")
        # in samples at the model rate, a part-hop carried to the next skip: many small drops add up exactly
        self._skipped += seconds * self.model_rate
        hops = int(self._skipped // self.hop)
        self._skipped -= hops * self.hop
        self.frames += hops

    @one_thread
    def set_events(self, events, reason: str = "settings") -> list[Step]:
        """New event settings (as the ``events`` argument) from the next hop on; events still open close first
        with ``reason``, so every open keeps its close, unless its class's settings are the same in the new ones.
        The model state is untouched."""
        new = _detector(events, self.labels, self.frame_seconds, getattr(self.backend, "folder", None))
        if self.detector is None or new is None:
            out = self._close_events(reason)
        else:
            out = self._event_step(new.take_over(self.detector, self.frames, reason))
        self.detector = new
        return out

    def snapshot(self) -> dict:
        """This engine's state outside the model (hop buffer, stream time, event tracks, counters), to
        :meth:`restore` on another engine of the same model (``serve --ray`` moving a stream). The model's state
        is not in it: :meth:`MultiStreamTagger.snapshot` takes both, the way to move a stream whole; an engine
        restored from this one alone goes on with a fresh model state. The resampler's few ms of filter state
        are not kept: a restored resampling stream restarts its filter."""
        return {
            "pending": self._pending[self._start : self._fill].copy(),
            "frames": self.frames,
            "silent_run": self._silent_run,
            "skipped": self._skipped,  # a part-hop of skipped time: many small drops add up exactly
            "detector": None if self.detector is None else copy.deepcopy(self.detector),
            "stats": dataclasses.replace(self.stats),
        }

    @one_thread
    def restore(self, snapshot: dict) -> None:
        """Take the state :meth:`snapshot` took (checked whole first: nothing changes when it is not one)."""
        missing = SNAPSHOT_KEYS - set(snapshot) if isinstance(snapshot, dict) else SNAPSHOT_KEYS
        wrong = sorted(missing) or [key for key, ok in _snapshot_checks(snapshot) if not ok]
        if wrong:
            what = "missing" if missing else "wrong"
            raise ConfigError(
                f"not an engine snapshot ({what}: {', '.join(wrong)}): restore what StreamTagger.snapshot() returned"
            )
        pending = snapshot["pending"]
        self._start, self._fill = 0, 0
        self._append(pending)
        self.frames, self._silent_run = snapshot["frames"], snapshot["silent_run"]
        self._skipped = snapshot.get("skipped", 0.0)
        self.detector = copy.deepcopy(snapshot["detector"])  # a snapshot may be restored more than once
        self.stats = dataclasses.replace(snapshot["stats"])

    # -- pieces a batching runner drives (MultiStreamTagger) ----------------------------
    def push(self, samples: AudioLike) -> None:
        """Check, guard, resample and queue samples; :attr:`ready` hops can then be taken."""
        x = as_mono_float32(samples)
        if x.size == 0:
            return
        x = self._guard(x)
        if self._resampler is not None:
            x = self._resampler.process(x)
        self._append(x)

    @property
    def ready(self) -> int:
        """Whole hops queued and not yet taken."""
        return (self._fill - self._start) // self.hop

    @property
    def pending_samples(self) -> int:
        """Samples queued and not yet taken (whole hops and the part-hop after them)."""
        return self._fill - self._start

    def before_hop(self) -> list[Step]:
        """Apply the reset policies due before the next hop (call before :meth:`take`); returns the steps
        of the events they closed."""
        out: list[Step] = []
        if self._reset_every and self.frames and self.frames % self._reset_every == 0:
            out += self.reset()
        if self._silence_frames is not None:
            nxt = self._pending[self._start : self._start + self.hop]
            peak = float(np.abs(nxt).max()) * (self._gain if self.gain_db else 1.0)  # as the model will hear it
            self._silent_run = self._silent_run + 1 if peak < SILENCE_PEAK else 0
            if self._silent_run == self._silence_frames:
                out += self.reset()
        return out

    def take(self, k: int = 1) -> np.ndarray:
        """The next ``k`` hops ``(k, hop)``, gain applied (a view valid until the next :meth:`push`)."""
        if not 0 < k <= self.ready:
            raise ValueError(f"take({k}): {self.ready} hops ready")
        start = self._start
        self._start += k * self.hop
        hops = self._pending[start : self._start].reshape(k, self.hop)
        if self.gain_db:
            hops *= self._gain
        return hops

    def complete_block(self, hops: np.ndarray, probs: np.ndarray) -> StepBlock:
        """The block for hops taken and stepped: level meter, events, stream time."""
        k = hops.shape[0]
        probs = np.array(probs[:k], dtype=np.float32)  # the steps own their rows
        audio = np.array(hops, dtype=np.float32)  # and their samples (clip saving)
        s = self.stats
        if k == 1:  # the live case: scalars, no temporaries
            power = float(np.dot(audio[0], audio[0])) / self.hop
            s.power_sum += power
            s.recent_power = 0.97 * s.recent_power + 0.03 * power
            s.peak = max(s.peak, float(np.abs(audio).max()))
            s.frames += 1
        else:
            (level,) = block_levels(audio[None], np.array([k]))
            s.add(level, k)
        return self._finish_block(audio, probs)

    def complete_round_block(self, audio: np.ndarray, probs: np.ndarray, level: BlockLevel) -> StepBlock:
        """:meth:`complete_block` for a block of a round whose level figures were computed for all its streams at
        once (:func:`block_levels`); ``audio`` and ``probs`` (``(k, hop)``, ``(k, classes)``) are the block's own
        rows, kept as they are."""
        self.stats.add(level, audio.shape[0])
        return self._finish_block(audio, probs)

    def _finish_block(self, audio: np.ndarray, probs: np.ndarray) -> StepBlock:
        k, first = probs.shape[0], self.frames
        if self.detector is None:
            found = {}
        elif k == 1:
            events = self.detector.update(first, probs[0])
            found = {0: events} if events else {}
        else:
            found = self.detector.update_block(first, probs)
        self.frames += k
        if self._start == self._fill:
            self._start = self._fill = 0
            if self._pending.shape[0] > PENDING_KEEP_HOPS * self.hop:  # one huge feed() is not kept for life
                self._pending = np.zeros(PENDING_HOPS * self.hop, np.float32)
        return StepBlock(first, probs, found, self.labels, self.frame_seconds, audio)

    # -- internals ----------------------------------------------------------------
    def block_length(self) -> int:
        """How many ready hops can be stepped as one block (after :meth:`before_hop`): up to the next scheduled
        reset; one at a time when silence resets are on (each hop's silence is judged before it is stepped)."""
        k = self.ready
        if self._silence_frames is not None:
            return 1
        if self._reset_every:
            k = min(k, self._reset_every - self.frames % self._reset_every)
        return k

    def _guard(self, x: np.ndarray) -> np.ndarray:
        self.stats.samples += x.size
        peak = float(np.max(np.abs(x)))
        if peak <= FULL_SCALE:  # the usual chunk: one reduction
            return x
        x = np.array(x, dtype=np.float32)  # never modify the caller's array
        bad = ~np.isfinite(x)
        n_bad = int(bad.sum())
        if n_bad:
            self.stats.nonfinite += n_bad
            x[bad] = 0.0
        over = np.abs(x) > FULL_SCALE
        n_over = int(over.sum())
        if n_over:
            self.stats.clipped += n_over
            self.stats.clipped_peak = max(self.stats.clipped_peak, float(np.abs(x).max()))
            np.clip(x, -FULL_SCALE, FULL_SCALE, out=x)
        return x

    def _append(self, x: np.ndarray) -> None:
        n = x.shape[0]
        if self._start and self._fill + n > self._pending.shape[0]:  # move the unstepped tail to the front
            tail = self._fill - self._start
            self._pending[:tail] = self._pending[self._start : self._fill]
            self._start, self._fill = 0, tail
        if self._fill + n > self._pending.shape[0]:
            grown = np.zeros(max(2 * self._pending.shape[0], self._fill + n), np.float32)
            grown[: self._fill] = self._pending[: self._fill]
            self._pending = grown
        self._pending[self._fill : self._fill + n] = x
        self._fill += n

    def _close_events(self, reason: str) -> list[Step]:
        if self.detector is None:
            return []
        return self._event_step(self.detector.flush(self.frames, reason))

    def _event_step(self, events: list[Event]) -> list[Step]:
        if not events:
            return []
        empty = np.zeros(0, np.float32)
        return [Step(self.frames - 1, self.frames * self.frame_seconds, empty, events, self.labels, self.frame_seconds)]


def drive(
    tagger: StreamTagger, chunks: Iterable[np.ndarray], outputs: Sequence, broke_off: Callable[[], bool] | None = None
) -> None:
    """Feed every chunk of one stream to ``tagger``, hand each step to every output (``write``), then finish
    the stream: a file in a plain loop, no thread (tag_file, tag of a single file). ``broke_off()``, asked at the
    end: the input ended in an error (a truncated file), so open events close as ``interrupted``, as replay's."""
    for chunk in chunks:
        for item in tagger.feed_blocks(chunk):
            for out in outputs:
                write_to(out, item)
    for step in tagger.finish("interrupted" if broke_off is not None and broke_off() else "stream_end"):
        for out in outputs:
            out.write(step)


def _detector(events, labels, frame_seconds: float, folder=None) -> EventDetector | None:
    if events is None or events is False:
        return None
    if isinstance(events, EventDetector):
        if list(events.labels) != list(labels):
            raise ConfigError(
                f"the EventDetector's {len(events.labels)} labels are not the model's {len(labels)}: "
                "make it with the model's labels (backend.labels), in the same order"
            )
        if getattr(events, "_taken", False):  # another engine's already: one detector fed by two would mix them
            events = copy.deepcopy(events)
        events._taken = True  # a fresh one (a factory's) is taken as it is: a copy costs most of a join
        events.reset_states()
        return events
    if events is True:  # the model folder's own settings (events.toml), else the defaults
        return model_detector(folder, labels, frame_seconds)
    if isinstance(events, EventParams):
        return EventDetector(labels, frame_seconds, events)
    if callable(events):  # a factory: one detector per stream (MultiStreamTagger, tag)
        return _detector(events(), labels, frame_seconds, folder)
    raise ConfigError(
        f"events must be True, None, EventParams, an EventDetector or a function making one "
        f"({type(events).__name__} given)"
    )


class BlockLevel(NamedTuple):
    """What a block of hops adds to its stream's level meter (:class:`StreamStats`)."""

    power_sum: float  # the sum of its hops' mean squares
    carry: float  # 0.97 ** k: the share of the meter's last value that stays
    recent: float  # 0.03 * its hops' mean squares, the newest weighing most
    peak: float


def block_levels(audio: np.ndarray, lengths: np.ndarray) -> list[BlockLevel]:
    """The level figures of ``n`` blocks in a few array operations, not a few per block (a server's round has
    hundreds): ``audio`` ``(n, rows, hop)``, block ``i`` in rows ``:lengths[i]`` and zeros after them."""
    _, rows, hop = audio.shape
    powers = np.einsum("srh,srh->sr", audio, audio) / hop
    age = lengths[:, None] - 1 - np.arange(rows)  # hops after each row in its block; < 0 past the block's end
    weights = np.where(age >= 0, 0.97 ** np.maximum(age, 0), 0.0)
    return list(
        map(
            BlockLevel,
            powers.sum(axis=1).tolist(),
            (0.97 ** lengths.astype(np.float64)).tolist(),
            (0.03 * (powers * weights).sum(axis=1)).tolist(),
            np.abs(audio).max(axis=(1, 2), initial=0.0).tolist(),
        )
    )


def _dbfs(power: float) -> float:
    """Mean-square level -> dB relative to full scale (a full-scale square wave is 0 dBFS)."""
    return 10 * float(np.log10(power)) if power > 0 else float("-inf")
