"""Bad input, fuzzing, model-file safety, signals, long runs and the reset policy."""

import json
import os
import pickle
import signal

import numpy as np
import pytest
import soundfile as sf
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from streamtag.backends import make_backend
from streamtag.errors import AudioFileError, ConfigError, ModelFileError
from streamtag.pipeline import tag_file
from streamtag.sources import read_audio

from .conftest import EXAMPLES, read_clip, run_cli, start_cli


def _tone(rate, seconds=1.0, freq=1000.0, channels=1):
    t = np.arange(int(rate * seconds)) / rate
    x = 0.5 * np.sin(2 * np.pi * freq * t)
    return np.repeat(x[:, None], channels, axis=1) if channels > 1 else x


def _peak_hz(samples, rate=16000):
    spec = np.abs(np.fft.rfft(samples * np.hanning(samples.size)))
    return np.argmax(spec) * rate / samples.size


# -- files that must be refused with one line ---------------------------------------------------------------
def _bad_files(folder):
    wav = folder / "good.wav"
    sf.write(wav, _tone(16000), 16000)
    data = wav.read_bytes()
    files = {
        "empty.wav": b"",
        "truncated_header.wav": data[:20],
        "corrupt_header.wav": b"RIFF" + b"\xff" * 40 + data[44:],
        "text.wav": b"hello, this is text\n" * 10,
    }
    for name, content in files.items():
        (folder / name).write_bytes(content)
    sf.write(folder / "too_short.wav", np.zeros(100), 16000)  # 6 ms: less than one hop
    sf.write(folder / "no_frames.wav", np.zeros((0, 1)), 16000)
    return [folder / n for n in [*files, "too_short.wav", "no_frames.wav"]] + [folder]


def test_bad_files_give_one_clear_error(cnn_dir, tmp_path):
    for path in _bad_files(tmp_path):
        r = run_cli("replay", path, "--model", cnn_dir, "--fast", "--quiet")
        assert r.returncode == 2, (path, r.stderr)
        assert "Traceback" not in r.stderr and r.stderr.count("\n") == 1, r.stderr
        assert str(path.name) in r.stderr


# -- odd but valid files: correct output --------------------------------------------------------------------
VALID = [
    ("wav", "PCM_U8", 16000, 1),
    ("wav", "PCM_16", 16000, 2),
    ("wav", "PCM_24", 22050, 6),
    ("wav", "PCM_32", 44100, 1),
    ("wav", "FLOAT", 48000, 2),
    ("wav", "DOUBLE", 96000, 1),
    ("wav", "PCM_16", 8000, 1),
    ("flac", "PCM_16", 44100, 1),
    ("flac", "PCM_24", 48000, 2),
    ("ogg", "VORBIS", 44100, 1),
]


@pytest.mark.parametrize("fmt, subtype, rate, channels", VALID)
def test_formats_rates_and_channels_are_read_and_resampled(fmt, subtype, rate, channels, tmp_path):
    path = tmp_path / f"tone.{fmt}"
    sf.write(path, _tone(rate, channels=channels), rate, subtype=subtype)
    samples, nonfinite = read_audio(path, 16000)
    assert nonfinite == 0 and abs(samples.size - 16000) <= 32
    assert abs(_peak_hz(samples) - 1000) <= 5  # a 1 kHz tone stays 1 kHz after resampling


@pytest.mark.parametrize("fmt, subtype, rate, channels", VALID[::3])
def test_replay_of_valid_variants(fmt, subtype, rate, channels, cnn_dir, tmp_path):
    path = tmp_path / f"tone.{fmt}"
    sf.write(path, _tone(rate, channels=channels), rate, subtype=subtype)
    out = tmp_path / "u.jsonl"
    r = run_cli("replay", path, "--model", cnn_dir, "--fast", "--quiet", "--jsonl", out, "--rate", "100")
    assert r.returncode == 0, r.stderr
    assert len(out.read_text().splitlines()) in (99, 100)


@pytest.mark.parametrize("kind", ["silence", "clipping", "dc", "between_hop_and_window"])
def test_extreme_signals_give_finite_probabilities(kind, cnn_dir, tmp_path):
    signals = {
        "silence": np.zeros(16000),
        "clipping": np.sign(_tone(16000)) * 1.0,
        "dc": np.full(16000, 0.7),
        "between_hop_and_window": np.random.default_rng(0).uniform(-0.5, 0.5, 300),
    }
    path = tmp_path / f"{kind}.wav"
    sf.write(path, signals[kind], 16000, subtype="FLOAT")
    result = tag_file(make_backend("onnx", cnn_dir), path)
    assert result.probs.shape[0] == signals[kind].size // 160
    assert np.isfinite(result.probs).all()
    np.testing.assert_allclose(result.probs.sum(1), 1.0, atol=1e-5)


def test_nan_and_inf_samples_are_replaced_and_reported(cnn_dir, tmp_path):
    x = _tone(16000).astype(np.float32)
    x[100:200] = np.nan
    x[5000] = np.inf
    path = tmp_path / "nan.wav"
    sf.write(path, x, 16000, subtype="FLOAT")
    out = tmp_path / "u.jsonl"
    r = run_cli("replay", path, "--model", cnn_dir, "--fast", "--quiet", "--jsonl", out, "--all")
    assert r.returncode == 0
    assert "101 NaN/Inf samples" in r.stderr and "nonfinite samples 101" in r.stderr
    for row in map(json.loads, out.read_text().splitlines()):
        assert all(np.isfinite(list(row["probs"].values())))


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


# -- fuzzing --------------------------------------------------------------------------------------------------
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    data=st.binary(max_size=2000),
    header=st.sampled_from([b"", b"RIFF", b"RIFF\x24\x00\x00\x00WAVEfmt ", b"fLaC", b"OggS"]),
)
def test_random_bytes_only_raise_the_documented_error(tmp_path, data, header):
    path = tmp_path / "fuzz.wav"
    path.write_bytes(header + data)
    try:
        samples, _ = read_audio(path, 16000)
    except AudioFileError:
        return
    assert samples.dtype == np.float32 and samples.ndim == 1


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    rate=st.sampled_from([8000, 11025, 16000, 22050, 32000, 44100, 48000, 96000]),
    channels=st.integers(1, 8),
    frames=st.integers(0, 3000),
    subtype=st.sampled_from(["PCM_U8", "PCM_16", "PCM_24", "PCM_32", "FLOAT", "DOUBLE"]),
    scale=st.sampled_from([0.0, 1e-6, 0.5, 1.0, 4.0]),
)
def test_odd_valid_wavs_replay_or_fail_cleanly(cnn_backend_fixture, tmp_path, rate, channels, frames, subtype, scale):
    path = tmp_path / "odd.wav"
    x = np.random.default_rng(frames).uniform(-scale, scale, (frames, channels))
    sf.write(path, x, rate, subtype=subtype)
    try:
        result = tag_file(cnn_backend_fixture, path)
    except AudioFileError as exc:
        assert "no audio samples" in str(exc) or "shorter than one hop" in str(exc)
        return
    assert result.probs.shape[0] >= 1 and np.isfinite(result.probs).all()
    assert result.stats.frames == result.probs.shape[0] and result.error is None


@pytest.fixture(scope="module")
def cnn_backend_fixture(cnn_dir):
    return make_backend("onnx", cnn_dir)


# -- model files ----------------------------------------------------------------------------------------------
class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_pickled_code_is_never_run_as_weights(cnn_dir, tmp_path):
    import shutil

    bad = tmp_path / "evil_model"
    shutil.copytree(cnn_dir, bad)
    marker = tmp_path / "pwned"
    (bad / "model.safetensors").write_bytes(pickle.dumps({"w": _Payload(marker)}))
    for backend in ("torch", "onnx"):
        r = run_cli("replay", EXAMPLES / "dog.flac", "--model", bad, "--backend", backend, "--fast", "--quiet")
        assert r.returncode == 2 and "Traceback" not in r.stderr
        assert "not a safetensors file" in r.stderr or "not a loadable" in r.stderr or "safetensors" in r.stderr
    assert not marker.exists()


def test_pickled_code_is_never_run_as_checkpoint(tmp_path):
    import torch

    from streamtag.training.trainer import _load_checkpoint

    marker = tmp_path / "pwned"
    ckpt = tmp_path / "checkpoint.pt"
    torch.save({"epoch": 1, "model": _Payload(marker)}, ckpt)
    with pytest.raises(ModelFileError, match="not a checkpoint"):
        _load_checkpoint(ckpt, torch.nn.Linear(1, 1), None, None, None, 1)
    assert not marker.exists()


def test_config_and_weights_mismatch_is_named(cnn_dir, tmp_path):
    import shutil

    bad = tmp_path / "mismatch"
    shutil.copytree(cnn_dir, bad)
    cfg = json.loads((bad / "config.json").read_text())
    cfg["labels"].append("extra_class")
    (bad / "config.json").write_text(json.dumps(cfg))
    r = run_cli("replay", EXAMPLES / "dog.flac", "--model", bad, "--fast", "--quiet")
    assert r.returncode == 2 and "head.proj.weight" in r.stderr and "(6, " in r.stderr
    cfg["features"]["n_mels"] = 40
    cfg["labels"].pop()
    (bad / "config.json").write_text(json.dumps(cfg))
    r = run_cli("replay", EXAMPLES / "dog.flac", "--model", bad, "--fast", "--quiet")
    assert r.returncode == 2 and "disagree" in r.stderr
    (bad / "config.json").write_text("{not json")
    r = run_cli("replay", EXAMPLES / "dog.flac", "--model", bad, "--fast", "--quiet")
    assert r.returncode == 2 and "not valid JSON" in r.stderr


# -- signals --------------------------------------------------------------------------------------------------
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


# -- long runs ------------------------------------------------------------------------------------------------
LONG_SECONDS = float(os.environ.get("STREAMTAG_LONG_SECONDS", "180"))


def test_long_run_state_bounded_memory_flat_and_reset_equals_fresh(model_dir):
    """Looping real audio: state norms stay bounded, RSS flat, and after reset_states() == a fresh run."""
    from streamtag.bench import _rss_mb

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


def test_replay_streams_long_files_in_blocks_with_the_same_scores(cnn_dir, tmp_path):
    """A 48 kHz stereo file is decoded block by block: same frames as one-shot reading, resampled alike."""
    audio = np.concatenate([read_clip(EXAMPLES / n) for n in ("dog.flac", "rain.flac", "chainsaw.flac")])
    import soxr

    up = soxr.resample(audio, 16000, 48000)
    path = tmp_path / "long48k.wav"
    sf.write(path, np.stack([up, up], 1), 48000, subtype="FLOAT")
    streamed = tag_file(make_backend("onnx", cnn_dir), path).probs
    assert streamed.shape[0] == up.size // 3 // 160
    from streamtag.backends import make_backend as mb

    whole = read_audio(path, 16000)[0]
    b = mb("onnx", cnn_dir)
    ref = np.stack([b(whole[i * 160 : (i + 1) * 160])[0].copy() for i in range(whole.size // 160)])
    np.testing.assert_allclose(streamed, ref, atol=1e-3)  # block-wise vs one-shot resampling only


def test_file_cut_short_mid_replay_ends_with_an_error(cnn_dir, tmp_path):
    from streamtag.sources import WavReplaySource

    path = tmp_path / "ok.wav"
    sf.write(path, _tone(16000, seconds=3.0), 16000)
    source = WavReplaySource(path, 16000, speed=0)

    def broken_chunks():
        yield np.zeros(16000, np.float32)
        raise sf.LibsndfileError(0, "Internal psf_fseek() failed")

    source._file_chunks = broken_chunks
    from streamtag.steps import Collector
    from streamtag.worker import Worker

    worker = Worker(source, make_backend("onnx", cnn_dir), [Collector()])
    worker.start()
    worker.join()
    assert worker.error is not None and "could not be read to the end" in worker.error
    assert worker.frames == 100


@pytest.mark.parametrize("suffix", ["wav", "flac"])
def test_a_truncated_file_is_tagged_as_far_as_it_goes_and_said_so(tmp_path, cnn_dir, suffix):
    """A WAV whose data stops early (libsndfile reads on quietly) and a FLAC cut mid-stream: what is
    there is tagged, then one line names the damage, exit 1; never a silent success."""
    import soundfile as sf

    whole = tmp_path / f"whole.{suffix}"
    sf.write(whole, read_clip(EXAMPLES / "chainsaw.flac"), 16000)
    data = whole.read_bytes()
    cut = tmp_path / f"cut.{suffix}"
    cut.write_bytes(data[: len(data) // 2])
    r = run_cli("replay", cut, "--model", cnn_dir, "--fast", "--quiet")
    assert r.returncode == 1, r.stderr
    errors = [line for line in r.stderr.splitlines() if "error" in line]
    assert len(errors) == 1 and str(cut) in errors[0] and ("truncated" in errors[0] or "to the end" in errors[0])
    assert "Traceback" not in r.stderr and "nan" not in r.stderr
    assert run_cli("replay", whole, "--model", cnn_dir, "--fast", "--quiet").returncode == 0
