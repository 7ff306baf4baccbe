"""The worker thread: ring -> :class:`~streamtag.engine.StreamTagger` -> outputs.

The thread owns only transport: it drains the ring the source fills, feeds the
stream's engine (which does everything per stream: hops, guard, model, events)
and hands every step to the outputs. Every hop is computed (a decision every
10 ms by default); outputs choose how often they show it. Per-hop time goes into
a bounded histogram, so an hours-long run keeps constant memory.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Callable, Sequence

import numpy as np

from .backends import Backend
from .engine import StreamTagger
from .errors import ConfigError, StreamtagError
from .events import EventDetector, EventParams
from .outputs.files import STDOUT
from .ring import SpscRing
from .sources.base import Source
from .steps import Output, Step

STALL_TIMEOUT_S = 2.0  # a live source silent this long is treated as lost
RECONNECT_MAX_DELAY_S = 5.0  # --reconnect retries at 0.25 s, doubling up to this
RING_SECONDS = 2.0  # the ring holds this much audio at the source rate
MAX_BUFFER_SECONDS = 60.0  # the most ``buffer_seconds`` may ask for (two buffers of it are allocated)


def _write_failed(exc: OSError) -> str:
    """One line for an output that could not be written, naming the file when the error knows it."""
    where = f"{exc.filename}: " if exc.filename else ""
    return f"writing an output failed: {where}{exc.strerror or exc}"


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
        return min((idx + 1) / 1000.0, self.max_ns / 1e6)  # the bin's upper edge, never above the max

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
    model_mean_ms: float = float("nan")  # the model's step alone, per hop
    input_problems: str | None = None  # samples the engine replaced (NaN, beyond full scale)
    reconnects: int = 0  # times a lost live source was reopened (--reconnect)
    gap_seconds: float = 0.0  # audio missed while it was gone
    e2e_p50_ms: float = float("nan")
    e2e_p99_ms: float = float("nan")
    error: str | None = None
    interrupted: bool = False
    level_rms_dbfs: float = float("-inf")  # over the whole stream, after the gain
    level_peak_dbfs: float = float("-inf")
    gain_db: float = 0.0
    live: bool = True  # a device (its gain can be turned up), not a file or a pipe

    def lines(self) -> list[str]:
        out = [
            f"source: {self.source}",
            f"audio: {self.audio_seconds:.2f} s tagged, {self.frames} frames",
            f"samples: captured {self.captured}, processed {self.processed}, dropped {self.dropped}, "
            f"unread {self.unread}",
        ]
        if self.compute_p50_ms == self.compute_p50_ms:  # NaN: no hop was timed or its level measured (no audio,
            # or the first write failed): no figures, and no "very quiet input" for audio that was never looked at
            out += self._hop_lines()
        problems = {k: v for k, v in self.source_status.items() if v}
        if problems:
            said = {"nonfinite_samples": "{} NaN/Inf samples replaced by 0"}
            parts = [said.get(k, k.replace("_", " ") + " {}").format(v) for k, v in problems.items()]
            out.append("source status: " + ", ".join(parts))
        if self.input_problems:
            out.append(f"input: {self.input_problems}")
        if self.reconnects:
            out.append(f"device lost and reopened {self.reconnects} time(s); {self.gap_seconds:.1f} s of audio missed")
        elif self.gap_seconds:
            out.append(f"device lost and not back before the stop; {self.gap_seconds:.1f} s of audio missed")
        return out

    def _hop_lines(self) -> list[str]:
        return [
            f"hop compute (model, events, outputs): p50 {self.compute_p50_ms:.3f} ms, "
            f"p99 {self.compute_p99_ms:.3f} ms, "
            f"max {self.compute_max_ms:.3f} ms (budget {self.budget_ms:.1f} ms, {self.deadline_misses} over); "
            f"model alone {self.model_mean_ms:.3f} ms a hop on average",
            f"level: RMS {self.level_rms_dbfs:.1f} dBFS, peak {self.level_peak_dbfs:.1f} dBFS"
            + (f" (after --gain {self.gain_db:+g} dB)" if self.gain_db else "")
            + ("; very quiet input: " + self._quiet_hint() if self.level_peak_dbfs < -50 else ""),
        ]

    def _quiet_hint(self) -> str:
        if self.live:
            return "check the microphone or its gain"
        return "the input is silent or far below full scale (--gain DB raises it)"  # a file, or a pipe's source


class _OutputFailed(Exception):
    """An output raised something other than an OSError while writing a step."""


class Worker(threading.Thread):
    """Runs one stream. ``start()``, then ``join()``; ``request_stop()`` drains and ends it.

    Args:
        source: where audio comes from (any :class:`~streamtag.sources.Source`).
        backend: the model runtime, batch size 1.
        outputs: each gets every :class:`~streamtag.steps.Step`.
        events: as :class:`~streamtag.engine.StreamTagger`'s: ``True`` for the model's own event settings,
            ``None`` for probabilities only. (Default: ``True``)
        reset_every_s, reset_on_silence_s, gain_db: the engine's (see :class:`~streamtag.engine.StreamTagger`).
        buffer_seconds (float): audio the ring holds before a live source starts dropping, at most
            ``MAX_BUFFER_SECONDS``. (Default: ``2``)
        reconnect (bool): a live source that is lost (unplugged, sound server restarted) is reopened with
            backoff instead of ending the run; open events close (reason ``gap``), the model state is
            cleared, and the gap is counted. (Default: ``False``)
    """

    def __init__(
        self,
        source: Source,
        backend: Backend,
        outputs: Sequence[Output] = (),
        events: bool | EventParams | EventDetector | Callable[[], EventDetector] | None = True,
        reset_every_s: float | None = None,
        reset_on_silence_s: float | None = None,
        buffer_seconds: float = RING_SECONDS,
        gain_db: float = 0.0,
        reconnect: bool = False,
    ) -> None:
        """See the class's docstring."""
        super().__init__(name="streamtag-worker", daemon=True)
        self.reconnect = reconnect and source.is_live and hasattr(source, "restart")
        self.reconnects = 0
        self.gap_seconds = 0.0
        # a reopened device's gap runs until its first samples (perf_counter seconds it began), not until its
        # reopen: PulseAudio's ALSA device delivers its first block about 1.5 s after start, and events after a
        # reconnect came that much early
        self._gap_from: float | None = None
        self._gap_at: int | None = None  # where in the ring the reopened device's samples start
        if not 0 < buffer_seconds <= MAX_BUFFER_SECONDS:  # NaN fails too; before the engine takes the backend
            raise ConfigError(f"buffer_seconds must be in (0, {MAX_BUFFER_SECONDS:g}] ({buffer_seconds} given)")
        self.tagger = StreamTagger(
            backend,
            sample_rate=source.sample_rate,
            events=events,
            reset_every_s=reset_every_s,
            reset_on_silence_s=reset_on_silence_s,
            gain_db=gain_db,
        )
        self.source, self.backend, self.outputs = source, backend, list(outputs)
        self._open_outputs: Callable[[], Sequence[Output]] | None = None
        self.frame_seconds = self.tagger.frame_seconds
        self.labels = self.tagger.labels
        hop_at_source = max(1, round(self.tagger.hop * source.sample_rate / self.tagger.model_rate))
        capacity = 1 << int(np.ceil(np.log2(max(buffer_seconds * source.sample_rate, 4 * hop_at_source))))
        self.ring = SpscRing(capacity)
        self.timer = FrameTimer()  # per hop: engine (model, events) and outputs
        self.latency = FrameTimer()  # last sample of a hop written into the ring -> its step handed out
        self.processed = 0
        self.error: str | None = None
        self.interrupted = False
        self.reader_gone = False  # standard output was closed by its reader (| head): the run stopped there
        self.stdout_closed = False  # stdout's reader left: its output dropped (the run stopped if it was the only one)
        self._stop_requested = threading.Event()
        self._read_buf = np.zeros(capacity, dtype=np.float32)

    @property
    def frames(self) -> int:
        return self.tagger.stats.frames

    # -- control -------------------------------------------------------------
    def request_stop(self) -> None:
        """Stop the source, process what is in the ring, flush outputs. Safe from a signal handler."""
        self.interrupted = True
        self._stop_requested.set()
        self.ring.doorbell.ring()

    def reset(self) -> None:
        """Forget the past (model state, audio context) and close open events.
        Call from the worker thread or before ``start()``."""
        self._write(self.tagger.reset())

    def start(self, open_outputs: Callable[[], Sequence[Output]] | None = None) -> None:
        """Start the source, then the thread. ``open_outputs``: the outputs, opened once the source is (a device
        that cannot be opened must not cost the files of an earlier run)."""
        self.source.start(self.ring)
        if open_outputs is not None and getattr(self.source, "outputs_wait_for_audio", False):
            self._open_outputs = open_outputs  # a pipe: opened by the thread at its first audio (see run)
        elif open_outputs is not None:
            try:
                self.outputs = list(open_outputs())
            except BaseException:
                self.source.stop()
                raise
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
                first = self.ring.read
                got = self.ring.read_into(self._read_buf)
                if got:
                    if self._open_outputs is not None:  # an empty pipe leaves an earlier run's files as they were
                        self.outputs, self._open_outputs = list(self._open_outputs()), None
                    self.processed += got
                    last_data = time.monotonic()
                    cut = got
                    if self._gap_at is not None and first + got > self._gap_at:  # the reopened device's first audio
                        cut = max(0, self._gap_at - first)  # (what the lost one left in the ring comes before it)
                    if cut:
                        self._consume_across_gaps(self._read_buf[:cut], first, written_ns)
                    if cut < got:
                        self._end_gap(got - cut)
                        self._consume_across_gaps(self._read_buf[cut:got], first + cut, written_ns)
                    continue
                if source_stopped:
                    break
                if self.source.finished:
                    if self.source.error and self.reconnect and not self._stop_requested.is_set():
                        last_data = self._reopen(last_data)
                        continue
                    if self.source.error:
                        self.error = self.source.error
                    if self.ring.read_available == 0:
                        break
                    continue
                self.ring.doorbell.wait(0.05)
                if self.source.is_live and time.monotonic() - last_data > STALL_TIMEOUT_S:
                    if self.reconnect and not self._stop_requested.is_set():
                        last_data = self._reopen(last_data)
                        continue
                    self.error = f"no audio from {self.source.description} for {STALL_TIMEOUT_S:.0f} s: device lost?"
                    break
        except OSError as exc:  # an output could not be written (disk full), or its reader is gone
            self._write_error(exc)
        except StreamtagError as exc:  # an output opened at a pipe's first audio could not be
            self.error = str(exc)
        except _OutputFailed as exc:  # the traceback follows on stderr
            self.error = str(exc)
            raise
        except Exception as exc:  # a bug: end the run with an error (the traceback follows on stderr)
            self.error = f"internal error in the worker: {exc!r}"
            raise
        finally:
            self.source.stop()
            self._finish()

    def _reopen(self, last_data: float) -> float:
        """The live source is gone: close events (reason ``gap``), clear the state, reopen with backoff until
        it is back or a stop is asked for. Returns the time audio may be expected from again."""
        self._write(self.tagger.reset("gap"))
        if self._gap_from is None:  # (a reopened device that never delivered is the same gap)
            self._gap_from = time.perf_counter() - (time.monotonic() - last_data)
        delay = 0.25
        while not self._stop_requested.is_set():
            try:
                self.source.restart()
                self.reconnects += 1  # only a reopen that worked: a stop while it is away is no reconnect
                self._gap_at = self.ring.written  # the reopened device's samples start here (the old one stopped)
                break
            except StreamtagError as exc:
                if getattr(self.source, "abandoned", False):  # a hung sound server: it will not come back
                    self.error = str(exc)
                    self._stop_requested.set()
                    break
                self._stop_requested.wait(delay)
                delay = min(2 * delay, RECONNECT_MAX_DELAY_S)
        return time.monotonic()

    def _end_gap(self, new: int) -> None:
        """The reopened device's first ``new`` samples are in: the gap, from the last audio before the loss to
        where these began (the ring's stamp of their write, less their length), is counted, and stream time
        moves on by it, so what comes next is stamped where it was heard, not closing up the gap."""
        began = self.ring.last_write_ns / 1e9 - new / self.tagger.sample_rate
        if began < self._gap_from:  # the stamp not yet updated for this write (it follows the count): now, then
            began = time.perf_counter() - new / self.tagger.sample_rate
        seconds = max(0.0, began - self._gap_from)
        self.gap_seconds += seconds
        self.tagger.skip(seconds)
        self._gap_from = self._gap_at = None

    def _consume_across_gaps(self, samples: np.ndarray, first: int, written_ns: int) -> None:
        """:meth:`_consume`, with stream time moved on where the ring dropped samples (a worker that fell
        behind): what follows a drop keeps its place on the clock, as after a reconnect. Events stay open and the
        state is kept: a few blocks missing are not a new stream."""
        gaps = self.ring.gaps
        while gaps and gaps[0][0] <= first + samples.shape[0]:
            where, lost = gaps.popleft()
            cut = max(0, where - first)
            if cut:
                self._consume(samples[:cut], written_ns)
            samples, first = samples[cut:], first + cut
            self.tagger.skip(lost / self.tagger.sample_rate)
        if samples.shape[0]:
            self._consume(samples, written_ns)

    def _consume(self, samples: np.ndarray, written_ns: int) -> None:
        t0 = time.perf_counter_ns()
        steps = self.tagger.feed(samples)
        try:
            self._write(steps)
        finally:  # counted even when the write stopped the run (| head): the summary reports those hops too
            self._count(steps, t0, written_ns)

    def _count(self, steps: list[Step], t0: int, written_ns: int) -> None:
        """The hop compute times (since ``t0``) and the latency of ``steps`` into the summary's figures."""
        if steps:
            done = time.perf_counter_ns()
            hops = sum(1 for s in steps if s.has_scores) or 1
            per_hop = (done - t0) // hops
            for _ in range(hops):
                self.timer.add(per_hop)
            if self.tagger.pending_samples == 0:  # the chunk ended on a hop edge
                self.latency.add(done - written_ns)

    def _write(self, steps: list[Step]) -> None:
        for step in steps:
            for out in self.outputs:
                try:
                    out.write(step)
                except BrokenPipeError as exc:
                    if exc.filename != STDOUT or not self._left_by_reader(out):  # another pipe's reader: an error
                        raise
                except OSError:
                    raise
                except Exception as exc:  # a custom output's own bug: named as such, not as the worker's
                    raise _OutputFailed(f"the output {type(out).__name__} failed: {exc!r}") from exc

    def _finish(self) -> None:
        if self._gap_from is not None:  # away (or reopened but silent) until the stop
            self.gap_seconds += time.perf_counter() - self._gap_from
            self._gap_from = self._gap_at = None
        ended = "interrupted" if self.interrupted or self.error or self.reader_gone else "stream_end"
        try:
            self._write(self.tagger.finish(ended))
        except OSError as exc:
            self._write_error(exc)
        except _OutputFailed as exc:  # the outputs are closed all the same
            self.error = self.error or str(exc)
        for out in self.outputs:  # close every output, even when one of them fails
            try:
                out.close()
            except OSError as exc:
                self._write_error(exc)

    def _left_by_reader(self, out: Output) -> bool:
        """Standard output's reader is gone (``| head``): ``out`` (writing there) is dropped and the others go on
        to the end, as they would have without it (``tee -p``). False when it was the last one: the run stops."""
        self.outputs = [o for o in self.outputs if o is not out]  # a new list: a loop over the old one goes on
        self.stdout_closed = True
        return bool(self.outputs)

    def _write_error(self, exc: OSError) -> None:
        """Standard output closed by its reader (``| head``) stops the run quietly; any other failed write
        (a full disk, the reader of an --events pipe gone) is the run's error."""
        if isinstance(exc, BrokenPipeError) and exc.filename == STDOUT:
            self.reader_gone = self.stdout_closed = True
        else:
            self.error = self.error or _write_failed(exc)

    @property
    def level_dbfs(self) -> float:
        """RMS level of the last ~0.3 s (read by the live view a few times a second, not every hop)."""
        return self.tagger.stats.recent_dbfs

    def summary(self) -> Summary:
        budget_ns = int(self.frame_seconds * 1e9)
        stats = self.tagger.stats
        return Summary(
            source=self.source.description,
            audio_seconds=stats.frames * self.frame_seconds,
            frames=stats.frames,
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
            model_mean_ms=stats.model_ns / stats.frames / 1e6 if stats.frames else float("nan"),
            input_problems=stats.problems(),
            reconnects=self.reconnects,
            gap_seconds=self.gap_seconds,
            e2e_p50_ms=self.latency.percentile_ms(50),
            e2e_p99_ms=self.latency.percentile_ms(99),
            error=self.error,
            interrupted=self.interrupted,
            level_rms_dbfs=stats.rms_dbfs,
            level_peak_dbfs=stats.peak_dbfs,
            gain_db=self.tagger.gain_db,
            live=self.source.is_live,
        )
