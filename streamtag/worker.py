"""The worker thread: the only loop. ring -> (resample) -> hops -> backend -> events -> outputs.

Every hop is computed (a decision every 10 ms by default); outputs choose how
often they show it. Per-frame compute time goes into a bounded histogram, so an
hours-long run keeps constant memory.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Sequence
from typing import Protocol

import numpy as np

from .backends import Backend
from .errors import ConfigError
from .events import Event, EventDetector
from .resample import StreamResampler
from .ring import SpscRing
from .sources.base import Source

STALL_TIMEOUT_S = 2.0  # a live source silent this long is treated as lost
RING_SECONDS = 2.0  # the ring holds this much audio at the source rate
MAX_BUFFER_SECONDS = 60.0  # the most ``buffer_seconds`` may ask for (two buffers of it are allocated)


def _write_failed(exc: OSError) -> str:
    """One line for an output that could not be written, naming the file when the error knows it."""
    where = f"{exc.filename}: " if exc.filename else ""
    return f"writing an output failed: {where}{exc.strerror or exc}"


@dataclasses.dataclass
class Step:
    """One hop's result. ``probs`` is owned by the step (outputs may keep it)."""

    frame_index: int
    t: float  # stream time at the end of the hop, seconds
    probs: np.ndarray
    events: list[Event]
    labels: Sequence[str]
    frame_seconds: float = 0.01

    @property
    def onset(self) -> float:
        """Stream time at the start of the hop."""
        return self.t - self.frame_seconds

    @property
    def has_scores(self) -> bool:
        """False for the event-only steps sent when a stream ends or resets."""
        return self.probs.size > 0


class Output(Protocol):
    """Gets every step; decides itself what to show or write."""

    def write(self, step: Step) -> None: ...

    def close(self) -> None: ...


class FrameTimer:
    """Histogram of per-frame compute times: 1 us bins up to ``limit_us``, exact max, constant memory."""

    def __init__(self, limit_us: int = 100_000) -> None:
        self.counts = np.zeros(limit_us + 1, dtype=np.int64)
        self.max_ns = 0
        self.total_ns = 0
        self.n = 0

    def add(self, ns: int) -> None:
        self.counts[min(ns // 1000, self.counts.shape[0] - 1)] += 1
        self.max_ns = max(self.max_ns, ns)
        self.total_ns += ns
        self.n += 1

    def percentile_ms(self, q: float) -> float:
        if self.n == 0:
            return float("nan")
        rank = int(np.ceil(q / 100.0 * self.n))
        idx = int(np.searchsorted(np.cumsum(self.counts), max(rank, 1)))
        return (idx + 1) / 1000.0  # upper edge of the bin

    def over(self, budget_ns: int) -> int:
        return int(self.counts[budget_ns // 1000 :].sum())


@dataclasses.dataclass
class Summary:
    source: str
    audio_seconds: float
    frames: int
    captured: int  # samples the source offered to the ring
    processed: int  # samples the worker took out of the ring
    dropped: int  # samples refused by a full ring
    unread: int  # samples left in the ring at the end
    source_status: dict
    compute_p50_ms: float
    compute_p99_ms: float
    compute_max_ms: float
    budget_ms: float
    deadline_misses: int
    e2e_p50_ms: float = float("nan")
    e2e_p99_ms: float = float("nan")
    error: str | None = None
    interrupted: bool = False
    level_rms_dbfs: float = float("-inf")  # over the whole stream, after the gain
    level_peak_dbfs: float = float("-inf")
    gain_db: float = 0.0

    def lines(self) -> list[str]:
        out = [
            f"source: {self.source}",
            f"audio: {self.audio_seconds:.2f} s, {self.frames} frames",
            f"samples: captured {self.captured}, processed {self.processed}, dropped {self.dropped}, "
            f"unread {self.unread}",
            f"frame compute: p50 {self.compute_p50_ms:.3f} ms, p99 {self.compute_p99_ms:.3f} ms, "
            f"max {self.compute_max_ms:.3f} ms (budget {self.budget_ms:.1f} ms, {self.deadline_misses} over)",
            f"level: RMS {self.level_rms_dbfs:.1f} dBFS, peak {self.level_peak_dbfs:.1f} dBFS"
            + (f" (after --gain {self.gain_db:+g} dB)" if self.gain_db else "")
            + ("; very quiet input: check the microphone or its gain" if self.level_peak_dbfs < -50 else ""),
        ]
        problems = {k: v for k, v in self.source_status.items() if v}
        if problems:
            out.append("source status: " + ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in problems.items()))
        return out


class Worker(threading.Thread):
    """Runs one stream. ``start()``, then ``join()``; ``request_stop()`` drains and ends it.

    Args:
        source: where audio comes from (any :class:`~streamtag.sources.Source`).
        backend: the model runtime, batch size 1.
        outputs: each gets every :class:`Step`.
        detector: optional :class:`~streamtag.events.EventDetector`.
        reset_every_s (float): reset model and detector state every this many seconds. (Default: never)
        reset_on_silence_s (float): reset after this much silence (all samples below -60 dBFS). (Default: never)
        buffer_seconds (float): audio the ring holds before a live source starts dropping, at most
            ``MAX_BUFFER_SECONDS``. (Default: ``2``)
        gain_db (float): gain applied to every sample before the model and the level meter. (Default: ``0``)
    """

    def __init__(
        self,
        source: Source,
        backend: Backend,
        outputs: Sequence[Output] = (),
        detector: EventDetector | None = None,
        reset_every_s: float | None = None,
        reset_on_silence_s: float | None = None,
        buffer_seconds: float = RING_SECONDS,
        gain_db: float = 0.0,
    ) -> None:
        super().__init__(name="streamtag-worker", daemon=True)
        if not -120.0 <= gain_db <= 120.0:  # NaN fails too
            raise ConfigError(f"gain_db must be in -120..120 ({gain_db} given)")
        self.gain_db = float(gain_db)
        self._gain = np.float32(10 ** (gain_db / 20))
        self._power_sum = 0.0  # sum of hop mean-square levels, for the stream's RMS
        self._peak = 0.0
        self._recent_power = 0.0  # mean square of the last ~0.3 s, for the live view
        self.source, self.backend, self.outputs, self.detector = source, backend, list(outputs), detector
        feats = backend.config.features
        self.hop = feats.hop_length
        self.frame_seconds = feats.frame_seconds
        self.labels = backend.labels
        if not 0 < buffer_seconds <= MAX_BUFFER_SECONDS:  # NaN fails too
            raise ConfigError(f"buffer_seconds must be in (0, {MAX_BUFFER_SECONDS:g}] ({buffer_seconds} given)")
        for name, value in (("reset_every_s", reset_every_s), ("reset_on_silence_s", reset_on_silence_s)):
            if value is not None and not 0 < value < float("inf"):
                raise ConfigError(f"{name} must be a finite number > 0 ({value} given)")
        capacity = 1 << int(np.ceil(np.log2(max(buffer_seconds * source.sample_rate, 4 * self.hop))))
        self.ring = SpscRing(capacity)
        self.resampler = (
            StreamResampler(source.sample_rate, feats.sample_rate) if source.sample_rate != feats.sample_rate else None
        )
        self.timer = FrameTimer()
        self.latency = FrameTimer()  # last sample of a hop written into the ring -> its step emitted
        self.frames = 0
        self.processed = 0
        self.error: str | None = None
        self.interrupted = False
        self._reset_every = None if reset_every_s is None else max(1, round(reset_every_s / self.frame_seconds))
        self._silence_frames = (
            None if reset_on_silence_s is None else max(1, round(reset_on_silence_s / self.frame_seconds))
        )
        self._silent_run = 0
        self._stop_requested = threading.Event()
        self._hop_buf = np.zeros(self.hop, dtype=np.float32)
        self._hop_fill = 0
        self._read_buf = np.zeros(capacity, dtype=np.float32)

    # -- control -------------------------------------------------------------
    def request_stop(self) -> None:
        """Stop the source, process what is in the ring, flush outputs. Safe from a signal handler."""
        self.interrupted = True
        self._stop_requested.set()
        self.ring.doorbell.ring()

    def reset(self) -> None:
        """Forget the past: model state (audio context included), then close open events.

        The resampler keeps its few milliseconds of filter delay: resetting it would drop audio.
        Call from the worker thread (the reset policy does) or before ``start()``.
        """
        self.backend.reset_states()
        if self.detector is not None:
            self._emit_events(self.detector.flush(self.frames, "reset"))

    def start(self) -> None:
        self.source.start(self.ring)
        super().start()

    # -- the loop ------------------------------------------------------------
    def run(self) -> None:
        last_data = time.monotonic()
        source_stopped = False
        try:
            while True:
                if self._stop_requested.is_set() and not source_stopped:
                    self.source.stop()  # first silence the producer, then drain what it left
                    source_stopped = True
                written_ns = self.ring.last_write_ns  # read before the data: never later than our samples
                got = self.ring.read_into(self._read_buf)
                if got:
                    self.processed += got
                    last_data = time.monotonic()
                    frames_before = self.frames
                    self._consume(self._read_buf[:got])
                    if self.frames > frames_before and self._hop_fill == 0:  # chunk ended on a hop edge
                        self.latency.add(time.perf_counter_ns() - written_ns)
                    continue
                if source_stopped:
                    break
                if self.source.finished:
                    if self.source.error:
                        self.error = self.source.error
                    if self.ring.read_available == 0:
                        break
                    continue
                self.ring.doorbell.wait(0.05)
                if self.source.is_live and time.monotonic() - last_data > STALL_TIMEOUT_S:
                    self.error = f"no audio from {self.source.description} for {STALL_TIMEOUT_S:.0f} s: device lost?"
                    break
        except OSError as exc:  # an output could not be written (disk full, pipe closed)
            self.error = _write_failed(exc)
        except Exception as exc:  # a bug: end the run with an error (the traceback follows on stderr)
            self.error = f"internal error in the worker: {exc!r}"
            raise
        finally:
            self.source.stop()
            self._finish()

    def _consume(self, samples: np.ndarray) -> None:
        if not np.isfinite(samples).all():  # a broken driver or file: never let NaN reach the model state
            bad = ~np.isfinite(samples)
            self.source.status.nonfinite_samples += int(bad.sum())
            samples[bad] = 0.0
        if self.resampler is not None:
            samples = self.resampler.process(samples)
        pos = 0
        n = samples.shape[0]
        while pos < n:
            take = min(self.hop - self._hop_fill, n - pos)
            self._hop_buf[self._hop_fill : self._hop_fill + take] = samples[pos : pos + take]
            self._hop_fill += take
            pos += take
            if self._hop_fill == self.hop:
                self._hop_fill = 0
                self._frame(self._hop_buf)

    def _frame(self, hop: np.ndarray) -> None:
        if self._reset_every and self.frames and self.frames % self._reset_every == 0:
            self.reset()
        peak = float(np.abs(hop).max())  # before the gain: silence is judged on the input itself
        if self._silence_frames is not None:
            self._silent_run = self._silent_run + 1 if peak < 1e-3 else 0
            if self._silent_run == self._silence_frames:
                self.reset()
        if self.gain_db:
            hop *= self._gain
        power = float(np.dot(hop, hop)) / hop.size
        self._power_sum += power
        self._peak = max(self._peak, peak * float(self._gain))
        self._recent_power = 0.97 * self._recent_power + 0.03 * power
        t0 = time.perf_counter_ns()
        probs = self.backend(hop)[0].copy()
        events = self.detector.update(self.frames, probs) if self.detector is not None else []
        self.timer.add(time.perf_counter_ns() - t0)
        self.frames += 1
        step = Step(self.frames - 1, self.frames * self.frame_seconds, probs, events, self.labels, self.frame_seconds)
        for out in self.outputs:
            out.write(step)

    def _emit_events(self, events: list[Event]) -> None:
        if events:
            step = Step(
                self.frames - 1,
                self.frames * self.frame_seconds,
                np.zeros(0, np.float32),
                events,
                self.labels,
                self.frame_seconds,
            )
            for out in self.outputs:
                out.write(step)

    def _finish(self) -> None:
        try:
            if self.detector is not None:
                why = "interrupted" if self.interrupted or self.error else "stream_end"
                self._emit_events(self.detector.flush(self.frames, why))
        except OSError as exc:
            self.error = self.error or _write_failed(exc)
        for out in self.outputs:  # close every output, even when one of them fails
            try:
                out.close()
            except OSError as exc:
                self.error = self.error or _write_failed(exc)

    @property
    def level_dbfs(self) -> float:
        """RMS level of the last ~0.3 s (read by the live view a few times a second, not every hop)."""
        return _dbfs(self._recent_power)

    def summary(self) -> Summary:
        budget_ns = int(self.frame_seconds * 1e9)
        return Summary(
            source=self.source.description,
            audio_seconds=self.frames * self.frame_seconds,
            frames=self.frames,
            captured=self.ring.written + self.ring.dropped,
            processed=self.processed,
            dropped=self.ring.dropped,
            unread=self.ring.read_available,
            source_status=self.source.status.as_dict(),
            compute_p50_ms=self.timer.percentile_ms(50),
            compute_p99_ms=self.timer.percentile_ms(99),
            compute_max_ms=self.timer.max_ns / 1e6,
            budget_ms=self.frame_seconds * 1000,
            deadline_misses=self.timer.over(budget_ns),
            e2e_p50_ms=self.latency.percentile_ms(50),
            e2e_p99_ms=self.latency.percentile_ms(99),
            error=self.error,
            interrupted=self.interrupted,
            level_rms_dbfs=_dbfs(self._power_sum / self.frames) if self.frames else float("-inf"),
            level_peak_dbfs=20 * float(np.log10(self._peak)) if self._peak > 0 else float("-inf"),
            gain_db=self.gain_db,
        )


def _dbfs(power: float) -> float:
    """Mean-square level -> dB relative to full scale (a full-scale square wave is 0 dBFS)."""
    return 10 * float(np.log10(power)) if power > 0 else float("-inf")
