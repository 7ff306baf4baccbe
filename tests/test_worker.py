"""The worker thread: settings checked like the CLI's, signals drain and flush, long runs stay bounded, resets on
schedule."""

import json
import os
import signal

import numpy as np
import pytest
import soundfile as sf

from streamtag.backends import make_backend
from streamtag.errors import ConfigError
from streamtag.pipeline import tag_file

from .conftest import EXAMPLES, read_clip, start_cli


def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) / 1024 for line in f if line.startswith("VmRSS:"))


def _tone(rate, seconds=1.0, freq=1000.0, channels=1):
    t = np.arange(int(rate * seconds)) / rate
    x = 0.5 * np.sin(2 * np.pi * freq * t)
    return np.repeat(x[:, None], channels, axis=1) if channels > 1 else x


def test_api_refuses_settings_the_cli_refuses(cnn_dir):
    """The same limits hold without the CLI: nothing allocates 64 TiB, NaN never reaches a schedule."""
    from streamtag.sources import WavReplaySource
    from streamtag.worker import Worker

    backend = make_backend("onnx", cnn_dir)
    for speed in (float("nan"), float("inf"), -1.0):
        with pytest.raises(ConfigError, match="speed must be a finite number >= 0"):
            WavReplaySource(EXAMPLES / "dog.flac", 16000, speed=speed)
    source = WavReplaySource(EXAMPLES / "dog.flac", 16000, speed=0)
    for kwargs in (
        {"buffer_seconds": 1e9},
        {"buffer_seconds": float("nan")},
        {"reset_every_s": 0.0},
        {"reset_on_silence_s": float("nan")},
    ):
        with pytest.raises(ConfigError, match=next(iter(kwargs))):
            Worker(source, backend, **kwargs)
    for device in ("tpu", "cuda:99"):
        with pytest.raises(ConfigError, match=f"--torch-device.*{device}"):
            make_backend("torch", cnn_dir, device=device)
    with pytest.raises(ConfigError, match="block_size"):
        WavReplaySource(EXAMPLES / "dog.flac", 16000, block_size=0)
    with pytest.raises(ConfigError, match="no option bogus"):
        make_backend("onnx", cnn_dir, bogus=1)


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")  # the tracebacks, as meant
def test_a_worker_gives_events_by_default_and_names_a_failing_source_or_output(cnn_dir):
    """Worker's events default to the model's own, as StreamTagger's and tag_file's do (it gave none); a source
    whose thread raises, or an output that raises, ends the run with an error naming it (a crashed source ended
    as a clean run; an output's bug was called the worker's)."""
    from streamtag.events import EventParams
    from streamtag.sources import WavReplaySource
    from streamtag.sources.base import ProducerSource
    from streamtag.steps import Collector
    from streamtag.worker import Worker

    bundled = make_backend("onnx")
    sink = Collector()
    worker = Worker(WavReplaySource(EXAMPLES / "dog.flac", 16000, speed=0), bundled, [sink])
    worker.start()
    worker.join()
    assert worker.summary().error is None
    expected = tag_file(bundled, EXAMPLES / "dog.flac").events
    assert ("open", "dog") in [(e.kind, e.label) for e in expected]
    assert [(e.kind, e.label, e.onset) for e in sink.events] == [(e.kind, e.label, e.onset) for e in expected]
    backend = make_backend("onnx", cnn_dir)
    low = EventParams(on_threshold=0.2, min_duration_s=0.05)

    class Broken(ProducerSource):
        sample_rate, description = 16000, "broken"

        def _push(self, ring):
            ring.write_blocking(np.zeros(1600, np.float32))
            raise RuntimeError("socket reset")

    class Full:
        def __init__(self):
            self.seen = 0

        def write(self, step):
            self.seen += 1
            if self.seen == 50:
                raise RuntimeError("disk full")

        def close(self):
            self.closed = True

    worker = Worker(Broken(), backend, events=low)
    worker.start()
    worker.join()
    assert "Broken failed: RuntimeError('socket reset')" in worker.summary().error
    full = Full()
    worker = Worker(WavReplaySource(EXAMPLES / "dog.flac", 16000, speed=0), backend, [full])
    worker.start()
    worker.join()
    assert worker.summary().error == "the output Full failed: RuntimeError('disk full')" and full.closed


def test_stdout_s_reader_gone_before_the_last_event_lines_is_still_a_reader_gone(cnn_dir, monkeypatch):
    """Event lines wait in stdout's buffer: a reader gone after the last score line is found by the console's
    last flush, which named no file, and the run ended with "writing an output failed: Broken pipe"."""
    import io

    from streamtag.events import EventParams
    from streamtag.outputs.console import PlainLines
    from streamtag.outputs.selection import ClassSelection
    from streamtag.sources import WavReplaySource
    from streamtag.worker import Worker

    read, write = os.pipe()
    os.close(read)  # the reader is gone before anything is written
    stdout = io.TextIOWrapper(io.FileIO(write, "w"), write_through=False)
    monkeypatch.setattr("sys.stdout", stdout)
    backend = make_backend("onnx", cnn_dir)
    console = PlainLines(ClassSelection(backend.labels), every_frames=10**9)  # event lines only, never flushed
    source = WavReplaySource(EXAMPLES / "rain.flac", 16000, speed=0)
    worker = Worker(source, backend, [console], events=EventParams(on_threshold=0.05))
    worker.start()
    worker.join()
    assert worker.summary().error is None and worker.reader_gone


def test_a_closed_pipe_of_an_output_of_ones_own_is_an_error_not_stdout_s_reader_leaving(cnn_dir):
    """Only an output writing stdout may be dropped quietly when its reader leaves (| head); a custom output whose
    socket closed (a BrokenPipeError naming no file) is the run's error, with every hop still written to the
    others: it had been dropped without a word and stdout pointed at /dev/null."""
    from streamtag.sources import WavReplaySource
    from streamtag.worker import Worker

    class Socket:
        def write(self, step):
            raise BrokenPipeError(32, "Broken pipe")

        def close(self):
            pass

    class Sink:
        frames = 0

        def write(self, step):
            self.frames += step.has_scores

        def close(self):
            pass

    sink = Sink()
    worker = Worker(
        WavReplaySource(EXAMPLES / "dog.flac", 16000, speed=0), make_backend("onnx", cnn_dir), [Socket(), sink]
    )
    worker.start()
    worker.join()
    assert "Broken pipe" in (worker.summary().error or "") and not worker.stdout_closed and not worker.reader_gone


@pytest.mark.parametrize("sig, code", [(signal.SIGINT, 130), (signal.SIGTERM, 0)])
def test_signals_drain_flush_and_summarise(sig, code, cnn_dir, tmp_path):
    out, events = tmp_path / "u.jsonl", tmp_path / "e.jsonl"
    proc = start_cli(
        "replay",
        EXAMPLES / "rain.flac",
        "--model",
        cnn_dir,
        "--jsonl",
        out,
        "--events",
        events,
        "--quiet",
        "--rate",
        "50",
        "--on-threshold",
        "0.2",
    )
    from .virtual_mic import wait_for_lines

    assert wait_for_lines(out, 20, proc) >= 20
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == code, err
    assert "samples: captured" in err
    rows = [json.loads(line) for line in out.read_text().splitlines()]  # no partial last line
    assert 20 <= len(rows) < 250
    ev_rows = [json.loads(line) for line in events.read_text().splitlines()]
    kinds = [row["type"] for row in ev_rows]
    assert kinds.count("open") == kinds.count("close")  # open events were closed at the stop
    last = [row for row in ev_rows if row["type"] == "close"][-1:]
    assert last and last[0]["reason"] in ("interrupted", "ended")  # an event cut by the signal says so


def test_second_ctrl_c_exits_at_once(cnn_dir, tmp_path):
    out = tmp_path / "u.jsonl"
    proc = start_cli("replay", EXAMPLES / "rain.flac", "--model", cnn_dir, "--jsonl", out, "--quiet")
    from .virtual_mic import wait_for_lines

    assert wait_for_lines(out, 3, proc) >= 3
    proc.send_signal(signal.SIGINT)
    proc.send_signal(signal.SIGINT)
    proc.communicate(timeout=30)
    assert proc.returncode == 130


LONG_SECONDS = float(os.environ.get("STREAMTAG_LONG_SECONDS", "180"))


def test_long_run_state_bounded_memory_flat_and_reset_equals_fresh(model_dir):
    """Looping real audio: state norms stay bounded, RSS flat, and after reset_states() == a fresh run."""

    audio = np.concatenate([read_clip(EXAMPLES / n) for n in ("dog.flac", "rain.flac", "chainsaw.flac")])
    backend = make_backend("onnx", model_dir)
    hops = audio.size // 160
    loops = max(2, int(LONG_SECONDS * 100 // hops))
    norms = np.zeros((loops, len(backend.get_state())))
    rss0 = _rss_mb()
    for loop in range(loops):
        for i in range(hops):
            probs = backend(audio[i * 160 : (i + 1) * 160])
            if i % 250 == 0:
                norms[loop] = np.maximum(norms[loop], [np.abs(s).max() for s in backend.get_state()])
        assert np.isfinite(probs).all()
    rss_growth = _rss_mb() - rss0
    assert rss_growth < 30, f"RSS grew {rss_growth:.1f} MB"
    assert (norms[-1] <= 1.5 * norms[0] + 1e-3).all(), "state drifts: last loop's norms exceed the first's"
    tail = audio[-16000 * 3 :]
    backend.reset_states()
    after_reset = np.stack([backend(tail[i * 160 : (i + 1) * 160])[0].copy() for i in range(tail.size // 160)])
    fresh = make_backend("onnx", model_dir)
    ref = np.stack([fresh(tail[i * 160 : (i + 1) * 160])[0].copy() for i in range(tail.size // 160)])
    np.testing.assert_array_equal(after_reset, ref)


def test_reset_every_restarts_state_on_schedule(cnn_dir, tmp_path):
    """--reset-every 1: scores from second 1 on equal a fresh run that starts at second 1."""
    from streamtag.sources import WavReplaySource
    from streamtag.steps import Collector
    from streamtag.worker import Worker

    audio = read_clip(EXAMPLES / "chainsaw.flac")
    backend = make_backend("onnx", cnn_dir)
    sink = Collector()
    worker = Worker(WavReplaySource(EXAMPLES / "chainsaw.flac", 16000, speed=0), backend, [sink], reset_every_s=1.0)
    worker.start()
    worker.join()
    with_resets = np.stack(sink.rows)
    part = tmp_path / "from1s.wav"
    sf.write(part, audio[16000:32000], 16000, subtype="FLOAT")
    fresh = tag_file(make_backend("onnx", cnn_dir), part).probs
    np.testing.assert_allclose(with_resets[100:200], fresh[:100], atol=1e-6)
    assert not np.allclose(
        with_resets[100:110], tag_file(backend, EXAMPLES / "chainsaw.flac").probs[100:110], atol=1e-4
    )


class _LostDevice:
    """A live source that is gone: it cannot be opened (``fails_to_open``), or it was lost and never comes back."""

    is_live = True
    description = "test device"
    sample_rate = 16000

    def __init__(self, fails_to_open=False):
        from streamtag.sources.base import SourceStatus

        self.status, self.fails_to_open, self.stopped = SourceStatus(), fails_to_open, 0
        self.error = "device lost" if not fails_to_open else None

    def start(self, ring):
        from streamtag.errors import DeviceError

        if self.fails_to_open:
            raise DeviceError("could not open input device 'test device': Device unavailable")

    def restart(self):
        from streamtag.errors import DeviceError

        raise DeviceError("input device 'test device' not back yet")

    def stop(self):
        self.stopped += 1

    @property
    def finished(self):
        return self.error is not None


def test_a_device_that_cannot_be_opened_opens_no_output(cnn_dir):
    """The outputs were opened (an earlier run's --events file truncated) before the device failed to open."""
    from streamtag.errors import DeviceError
    from streamtag.worker import Worker

    opened = []
    worker = Worker(_LostDevice(fails_to_open=True), make_backend("onnx", cnn_dir))
    with pytest.raises(DeviceError):
        worker.start(lambda: opened.append("outputs") or [])
    assert opened == []


def test_a_device_still_away_at_the_stop_is_not_counted_as_reopened(cnn_dir):
    import threading

    from streamtag.worker import Worker

    worker = Worker(_LostDevice(), make_backend("onnx", cnn_dir), reconnect=True)
    worker.start()
    threading.Timer(0.5, worker.request_stop).start()
    worker.join(30)
    summary = worker.summary()
    assert summary.reconnects == 0 and summary.gap_seconds > 0
    assert any("not back before the stop" in line for line in summary.lines())


class _StepTimes:
    """An output that keeps each scored step's stream time."""

    def __init__(self):
        self.t = []

    def write(self, step):
        if step.has_scores:
            self.t.append(step.t)

    def close(self):
        pass


def test_audio_after_samples_the_ring_dropped_keeps_its_place_on_the_clock(cnn_dir):
    """A worker that fell behind: the ring drops what does not fit. The steps after the drop were stamped as if
    the dropped audio had never been, so events drifted earlier than the sound, by every drop so far."""
    import threading
    import time

    from streamtag.sources.base import SourceStatus
    from streamtag.worker import Worker

    audio = read_clip(EXAMPLES / "dog.flac")

    class Dropping:  # a live source whose reader is late: fills the ring, loses 0.5 s, then goes on
        sample_rate, description, is_live, error = 16000, "test", False, None

        def __init__(self):
            self.status, self.done = SourceStatus(), threading.Event()

        def start(self, ring):
            # filled and overfilled here, before the worker's thread starts: a thread of our own could be
            # scheduled after the worker had read some, and then nothing would drop
            full = ring.capacity
            ring.push(audio[:full])
            assert ring.push(audio[full : full + 8000]) == 0  # 0.5 s dropped: the ring is full

            def run():
                while ring.read_available:  # until the worker has read what was before the drop
                    time.sleep(0.01)
                ring.push(audio[full + 8000 : full + 24000])  # 1 s more
                self.done.set()
                ring.doorbell.ring()

            threading.Thread(target=run, daemon=True).start()

        def stop(self):
            pass

        @property
        def finished(self):
            return self.done.is_set()

    times = _StepTimes()
    worker = Worker(Dropping(), make_backend("onnx", cnn_dir), [times], buffer_seconds=1.0)
    worker.start()
    worker.join(timeout=60)
    full = worker.ring.capacity
    summary = worker.summary()
    assert summary.dropped == 8000 and summary.processed == full + 16000
    jumps = np.diff(times.t)
    (at,) = np.flatnonzero(jumps > 0.011)  # one jump, where the dropped half second was
    assert abs(jumps[at] - 0.5) <= 0.011 and abs(times.t[-1] - (full + 24000) / 16000) <= 0.011


def test_a_reopened_device_s_gap_runs_until_its_first_samples(cnn_dir):
    """live --reconnect moved stream time on by the time until the device was reopened; PulseAudio's ALSA device
    then delivers its first block about 1.5 s later, and every event after a reconnect came that much early
    (two plays of one clip 14.58 s apart were 13.33 s apart in the events)."""
    import threading
    import time

    from streamtag.sources.base import SourceStatus
    from streamtag.worker import Worker

    audio = read_clip(EXAMPLES / "dog.flac")[:16000]

    class Late:  # 1 s of audio, lost; reopened at once, but its first samples come 1.2 s after the reopen
        sample_rate, description, is_live = 16000, "late device", True

        def __init__(self):
            self.status, self.error, self.ring, self.heard, self.tail = SourceStatus(), None, None, [], False

        def _play(self, wait):
            def run():
                time.sleep(wait)
                for i in range(0, audio.size, 1600):  # in real time, as a device delivers
                    self.heard.append(time.perf_counter())
                    self.ring.push(audio[i : i + 1600])
                    self.ring.doorbell.ring()
                    time.sleep(0.1)
                if len(self.heard) == 10:  # its callback's last block lands as the loss is seen (below)
                    self.tail, self.error = True, "device lost"

            threading.Thread(target=run, daemon=True).start()

        def start(self, ring):
            self.ring = ring
            self._play(0.0)

        def restart(self):
            self.error = None
            self._play(1.2)

        def stop(self):
            pass

        @property
        def finished(self):
            if self.tail:  # still in the ring when the reopen starts: it ended the gap at 0 s in a first fix
                self.tail = False
                self.ring.push(audio[:1600])
            return self.error is not None

    source, times = Late(), _StepTimes()
    worker = Worker(source, make_backend("onnx", cnn_dir), [times], reconnect=True)
    worker.start()
    deadline = time.monotonic() + 30
    while len(source.heard) < 20 and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.3)
    worker.request_stop()
    worker.join(30)
    heard = np.array(source.heard)
    jumps = np.flatnonzero(np.diff(times.t) > 0.011)
    assert len(jumps) == 1 and worker.summary().reconnects == 1, (jumps, worker.summary())
    on_the_clock = heard[10] - heard[0] + 0.1  # the second block's first sample, from the first's (and the tail)
    in_stream = times.t[jumps[0] + 1] - times.t[0]
    assert abs(in_stream - on_the_clock) < 0.5, (in_stream, on_the_clock)  # 1.1 s off before; wide: a busy CI
    assert worker.summary().gap_seconds > 1.2
