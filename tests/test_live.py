"""Live microphone path through real PortAudio, with the virtual microphones (no sound card)."""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from .conftest import EXAMPLES, REPO, read_clip, run_cli, start_cli
from .virtual_mic import ALSA_DEVICE, alsa_file_mic, pulse_null_sink, wait_for_lines


def _live(model, jsonl, env, *extra):
    return start_cli("live", "--model", model, "--jsonl", jsonl, "--all", "--quiet", *extra, env=env)


def _probs(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_live_equals_replay_sample_exact(cnn_dir, tmp_path):
    """Recipe A delivers the file's samples exactly: live scores equal replay scores."""
    env = alsa_file_mic(tmp_path, read_clip(EXAMPLES / "dog.flac"))
    live_out, replay_out = tmp_path / "live.jsonl", tmp_path / "replay.jsonl"
    proc = _live(cnn_dir, live_out, env, "--device", ALSA_DEVICE, "--buffer-seconds", "8")
    assert wait_for_lines(live_out, 55, proc) >= 55
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "samples: captured" in err
    r = run_cli(
        "replay", EXAMPLES / "dog.flac", "--model", cnn_dir, "--fast", "--jsonl", replay_out, "--all", "--quiet"
    )
    assert r.returncode == 0
    live, replay = _probs(live_out)[:50], _probs(replay_out)
    assert [row["t"] for row in live] == [row["t"] for row in replay]
    for a, b in zip(live, replay):
        np.testing.assert_allclose(list(a["probs"].values()), list(b["probs"].values()), atol=1e-4)


ACCOUNTING_SCRIPT = """
import json, sys, time
from streamtag.backends import make_backend
from streamtag.sources.device import MicrophoneSource
from streamtag.worker import Worker

class Slow:
    def __init__(self, inner):
        self.inner = inner
        self.config, self.labels, self.batch_size = inner.config, inner.labels, 1
    def __call__(self, audio):
        time.sleep(0.002)  # a worker slower than the source: the ring must drop and count
        return self.inner(audio)
    def steps(self, audio):  # a backlog: as slow per hop
        time.sleep(0.002 * audio.shape[1])
        return self.inner.steps(audio)
    def reset_states(self):
        self.inner.reset_states()

w = Worker(MicrophoneSource(16000, sys.argv[2]), Slow(make_backend("onnx", sys.argv[1])))
w.start()
time.sleep(1.5)
w.request_stop()
w.join()
print(json.dumps(w.summary().__dict__))
"""


def test_every_sample_accounted_for_with_a_slow_worker(cnn_dir, tmp_path):
    env = alsa_file_mic(tmp_path, read_clip(EXAMPLES / "rain.flac"))
    r = subprocess.run(
        [sys.executable, "-c", ACCOUNTING_SCRIPT, str(cnn_dir), ALSA_DEVICE],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr
    s = json.loads(r.stdout.splitlines()[-1])
    assert s["dropped"] > 0 and s["frames"] > 0
    assert s["captured"] == s["processed"] + s["dropped"] + s["unread"]
    assert s["processed"] // 160 == s["frames"]  # every processed sample made it into a frame


def test_live_on_clocked_pulseaudio_mic_and_sigterm(cnn_dir, tmp_path):
    """Recipe B: real-time callbacks; SIGTERM drains, flushes whole lines, prints the summary, exits 0."""
    with pulse_null_sink() as (env, play, _, _):
        play(np.tile(read_clip(EXAMPLES / "chainsaw.flac"), 2))
        out = tmp_path / "live.jsonl"
        proc = _live(cnn_dir, out, env, "--device", "pulse")
        assert wait_for_lines(out, 15, proc) >= 15
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    rows = _probs(out)  # every line parses: no partial last line
    times = [row["t"] for row in rows]
    assert np.all(np.diff(times) > 0)
    assert all(abs(sum(row["probs"].values()) - 1) < 1e-3 for row in rows)
    assert "dropped 0" in err and "hop compute" in err


def test_reconnect_survives_a_sound_server_restart(cnn_dir, tmp_path):
    """--reconnect: the PulseAudio daemon is killed and started again mid-run; tagging goes on after the gap,
    and the summary counts it."""
    with pulse_null_sink() as (env, play, stop_daemon, start_daemon):
        play(np.tile(read_clip(EXAMPLES / "rain.flac"), 4))
        out, events = tmp_path / "live.jsonl", tmp_path / "events.jsonl"
        proc = _live(
            cnn_dir, out, env, "--device", "pulse", "--reconnect", "--events", events, "--on-threshold", "0.05"
        )
        assert wait_for_lines(out, 5, proc) >= 5
        stop_daemon()
        time.sleep(3.0)  # longer than the stall timeout: the worker is waiting for the device now
        assert proc.poll() is None  # still running, not ended with exit 1
        before = out.read_text().count("\n")
        start_daemon()
        play(np.tile(read_clip(EXAMPLES / "rain.flac"), 4))
        assert wait_for_lines(out, before + 10, proc, timeout_s=60) >= before + 10  # rows again after the gap
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "device lost and reopened" in err and "Traceback" not in err
    closes = [json.loads(line) for line in events.read_text().splitlines() if '"close"' in line]
    assert "gap" in {row["reason"] for row in closes}  # what was open when the device went closed as a gap
    missed = float(re.search(r"([\d.]+) s of audio missed", err).group(1))
    jump = max(np.diff([row["t"] for row in _probs(out)]))  # the times after the gap keep their place on the
    assert missed > 2 and jump >= missed - 0.05, (missed, jump)  # clock: they closed it up before


def test_device_lost_mid_stream_ends_cleanly(cnn_dir, tmp_path):
    with pulse_null_sink() as (env, play, stop_daemon, _):
        play(read_clip(EXAMPLES / "rain.flac"))
        out = tmp_path / "live.jsonl"
        proc = _live(cnn_dir, out, env, "--device", "pulse")
        assert wait_for_lines(out, 5, proc) >= 5
        stop_daemon()
        _, err = proc.communicate(timeout=60)
    assert proc.returncode == 1, err
    assert "Traceback" not in err
    assert "streamtag live: error:" in err and "samples: captured" in err
    _probs(out)  # whole lines only


@pytest.mark.parametrize("reconnect", [[], ["--reconnect"]])
def test_a_frozen_sound_server_does_not_hold_the_run_or_sigterm(cnn_dir, tmp_path, reconnect):
    """A hung PulseAudio (here: SIGSTOP) made the stop wait for the device for ever: the run never ended and
    SIGTERM was ignored until the daemon was let go (with --reconnect, in PortAudio's re-scan)."""
    with pulse_null_sink() as (env, play, _, _):
        play(np.tile(read_clip(EXAMPLES / "rain.flac"), 4))
        out = tmp_path / "live.jsonl"
        proc = _live(cnn_dir, out, env, "--device", "pulse", *reconnect)
        assert wait_for_lines(out, 5, proc) >= 5
        daemon = int((Path(env["XDG_RUNTIME_DIR"]) / "pulse" / "pid").read_text().split()[0])
        os.kill(daemon, signal.SIGSTOP)
        try:
            time.sleep(5 if reconnect else 0.5)  # with --reconnect: stalled, and trying to reopen it
            proc.send_signal(signal.SIGTERM)
            _, err = proc.communicate(timeout=60)  # before the fix: still running
        finally:
            os.kill(daemon, signal.SIGCONT)
    assert proc.returncode in (0, 1) and "samples: captured" in err and "Traceback" not in err, err
    _probs(out)  # whole lines only


def test_unknown_device_lists_choices(cnn_dir, tmp_path):
    """A --device that names nothing is a usage error (exit 2), by name or by index; a lost device exits 1."""
    env = alsa_file_mic(tmp_path, np.zeros(1600, np.float32))
    for device, shown in (("no-such-mic", "no-such-mic"), ("99", "99"), ("", "''")):  # "" matched every device
        r = run_cli("live", "--model", cnn_dir, "--device", device, env=env)
        assert r.returncode == 2 and "Traceback" not in r.stderr
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(f"streamtag live: error: --device {shown}: "), r.stderr
        assert ALSA_DEVICE in lines[0]
    r = run_cli("devices", env=env)
    assert r.returncode == 0 and ALSA_DEVICE in r.stdout


def test_missing_portaudio_names_the_package(cnn_dir, tmp_path):
    (tmp_path / "sounddevice.py").write_text("raise OSError('PortAudio library not found')\n")
    import os

    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    for args in (["live", "--model", str(cnn_dir)], ["devices"]):
        r = run_cli(*args, env=env)
        assert r.returncode != 0 and "Traceback" not in r.stderr
        assert "apt-get install libportaudio2" in r.stderr
    r = run_cli("replay", EXAMPLES / "dog.flac", "--model", cnn_dir, "--fast", "--quiet", env=env)
    assert r.returncode == 0, "replay must not need PortAudio"


@pytest.mark.parametrize("rate", [8000, 44100, 48000])
def test_stream_resampler_keeps_pitch(rate):
    from streamtag.resample import StreamResampler

    t = np.arange(rate * 2) / rate
    tone = np.sin(2 * np.pi * 1000 * t).astype(np.float32)
    res = StreamResampler(rate, 16000)
    out = np.concatenate([res.process(tone[i : i + 441]) for i in range(0, tone.size, 441)])
    assert 0 <= 32000 - out.size < 800  # only the filter delay (under 50 ms) is held back
    spectrum = np.abs(np.fft.rfft(out[4000:20000]))
    assert abs(np.argmax(spectrum) * 16000 / 16000 - 1000) <= 2


def test_bench_measures_live_end_to_end_latency(cnn_dir):
    """The suite's microphone stage (benchmarks/suite.py) through the PulseAudio virtual microphone."""
    with pulse_null_sink() as (env, play, _, _):
        play(np.tile(read_clip(EXAMPLES / "rain.flac"), 3))
        code = (
            "import json, sys; sys.path.insert(0, sys.argv[1]); import suite; "
            "print(json.dumps(suite.bench_e2e_mic(sys.argv[2], 'pulse', 3.0)))"
        )
        r = subprocess.run(
            [sys.executable, "-c", code, str(REPO / "benchmarks"), str(cnn_dir)],
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
    assert r.returncode == 0, r.stderr
    mic = json.loads(r.stdout.splitlines()[-1])
    assert mic["error"] is None and mic["audio_s"] > 1
    assert 0 < mic["e2e_p50_ms"] <= mic["e2e_p99_ms"]


def test_no_input_device_is_one_line(cnn_dir):
    import os

    env = {k: v for k, v in os.environ.items() if k not in ("ALSA_CONFIG_PATH", "XDG_RUNTIME_DIR", "PULSE_SERVER")}
    listing = run_cli("devices", env=env)
    if "no input devices found" not in listing.stderr:
        pytest.skip("this machine has an input device")
    assert listing.returncode == 1 and "plug in a microphone" in listing.stderr and not listing.stdout
    r = run_cli("live", "--model", cnn_dir, env=env)
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith("streamtag live: error: no input device available")


def test_a_device_name_that_matches_several_says_which(monkeypatch):
    """--device a: "Multiple input devices found for 'a'" and then every device, without the ones it matched."""
    import types

    from streamtag.errors import UnknownDeviceError
    from streamtag.sources import device

    devices = [
        {"name": "USB Audio Mic", "max_input_channels": 1, "default_samplerate": 48000.0},
        {"name": "Webcam Audio", "max_input_channels": 2, "default_samplerate": 16000.0},
    ]

    def query_devices(which=None, kind=None):
        if which is None:
            return devices
        raise ValueError(f"Multiple input devices found for {which!r}:\n[0] USB Audio Mic\n[1] Webcam Audio")

    fake = types.SimpleNamespace(query_devices=query_devices, PortAudioError=OSError)
    monkeypatch.setattr(device, "import_sounddevice", lambda: fake)
    with pytest.raises(UnknownDeviceError) as said:
        device.MicrophoneSource(16000, "audio")
    assert "([0] USB Audio Mic; [1] Webcam Audio): give more of the name, or the index" in str(said.value)
