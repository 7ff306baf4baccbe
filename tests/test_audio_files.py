"""Audio files: refused with one line, odd but valid ones read right, damaged ones tagged as far as they go
(and said so), fuzzed bytes only ever raise the documented error."""

import json
import re

import numpy as np
import pytest
import soundfile as sf
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from streamtag.backends import make_backend
from streamtag.errors import AudioFileError
from streamtag.pipeline import tag_file
from streamtag.sources import read_audio

from .conftest import EXAMPLES, read_clip, run_cli


def _tone(rate, seconds=1.0, freq=1000.0, channels=1):
    t = np.arange(int(rate * seconds)) / rate
    x = 0.5 * np.sin(2 * np.pi * freq * t)
    return np.repeat(x[:, None], channels, axis=1) if channels > 1 else x


def _peak_hz(samples, rate=16000):
    spec = np.abs(np.fft.rfft(samples * np.hanning(samples.size)))
    return np.argmax(spec) * rate / samples.size


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
    assert "source status: 101 NaN/Inf samples replaced by 0" in r.stderr and r.stderr.count("NaN/Inf") == 1
    for row in map(json.loads, out.read_text().splitlines()):
        assert all(np.isfinite(list(row["probs"].values())))


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


@pytest.mark.parametrize("suffix", ["wav", "flac", "mp3"])
def test_a_truncated_file_is_tagged_as_far_as_it_goes_and_said_so(tmp_path, cnn_dir, suffix):
    """A WAV whose data stops early (libsndfile reads on quietly), a FLAC cut mid-stream and an MP3 whose header
    counts its frames (libmpg123 only warns): what is there is tagged, then one line names the damage, exit 1;
    never a silent success."""
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
    tagged = float(re.search(r"audio: ([0-9.]+) s", r.stderr).group(1))
    said = float(re.search(r"the ([0-9.]+) s", errors[0]).group(1))
    assert abs(said - tagged) < 0.02 and tagged > 1.5  # more than the blocks before the broken one
    assert run_cli("replay", whole, "--model", cnn_dir, "--fast", "--quiet").returncode == 0


def test_a_wav_streamed_by_ffmpeg_into_a_file_is_whole(tmp_path):
    """ffmpeg -f wav to a pipe cannot go back to write the sizes: it leaves 0xFFFFFFFF ("until the end"). Such a
    complete file was reported as 100% truncated, failed and tagged again on every run."""
    from streamtag.sources import WavReplaySource

    buf = tmp_path / "plain.wav"
    sf.write(buf, _tone(16000), 16000, subtype="PCM_16")
    data = bytearray(buf.read_bytes())
    data[4:8] = data[40:44] = b"\xff\xff\xff\xff"  # the RIFF and data sizes, as a pipe's header has them
    piped = tmp_path / "piped.wav"
    piped.write_bytes(bytes(data))
    source = WavReplaySource(piped, 16000, speed=0)
    got = np.concatenate(list(source.chunks()))
    assert source.error is None and got.size == 16000


def test_an_mp3_whose_length_libsndfile_guessed_is_not_called_truncated(tmp_path, cnn_dir):
    """Without a Xing/Info frame libsndfile guesses an MP3's length from its size and first bitrate: a whole file
    that opens quietly (low bitrate) was read to its end and then failed as "59% missing"."""
    import shutil
    import subprocess

    if shutil.which("ffmpeg") is None:
        pytest.skip("ffmpeg is not installed (.ci/setup installs it)")
    quiet_then_loud = np.concatenate([np.zeros(2 * 44100), 0.3 * np.random.default_rng(0).standard_normal(3 * 44100)])
    sf.write(tmp_path / "mix.wav", quiet_then_loud.astype(np.float32), 44100)
    mp3 = tmp_path / "guessed.mp3"
    subprocess.run(
        ["ffmpeg", "-loglevel", "error", "-i", tmp_path / "mix.wav", "-c:a", "libmp3lame", "-q:a", "2"]
        + ["-write_xing", "0", mp3],
        check=True,
    )
    assert sf.info(mp3).frames > 1.5 * 5 * 44100  # the guess: far longer than the file
    r = run_cli("replay", mp3, "--model", cnn_dir, "--fast", "--quiet")
    assert r.returncode == 0 and "truncated" not in r.stderr, r.stderr


def _zero_sizes(data: bytes, data_size: int = 0) -> bytes:
    """A 44-byte-header WAV with its RIFF size 0 and its data size ``data_size``, as a recorder that stopped
    before going back to write them leaves it."""
    data = bytearray(data)
    assert data[36:40] == b"data"
    data[4:8] = bytes(4)
    data[40:44] = data_size.to_bytes(4, "little")
    return bytes(data)


def test_a_wav_whose_header_was_never_finished_is_read_to_its_end(tmp_path, monkeypatch):
    """A recorder that crashed leaves the sizes 0: libsndfile reads nothing ("holds no audio samples" for 15 s of
    PCM); a data chunk past 4 GiB keeps only the remainder of its size (libsndfile read that much, silently).
    Both are read to the end of the file, by replay and by read_audio, with the samples of the whole file."""
    from streamtag.sources import WavReplaySource
    from streamtag.sources import file as file_source

    whole = tmp_path / "whole.wav"
    stereo = _tone(16000, seconds=2.0, channels=2)
    sf.write(whole, stereo, 16000, subtype="PCM_16")
    want = sf.read(whole, dtype="float32")[0].mean(axis=1)
    crashed = tmp_path / "crashed.wav"
    crashed.write_bytes(_zero_sizes(whole.read_bytes()))
    assert sf.info(crashed).frames == 0  # what libsndfile makes of it
    wrapped = tmp_path / "wrapped.wav"  # a size that lost 4 GiB, scaled down: the wrap is 16 KiB here
    monkeypatch.setattr(file_source, "SIZE_WRAP", 1 << 14)
    wrapped.write_bytes(_zero_sizes(whole.read_bytes(), 4 * 32000 - 5 * (1 << 14)))
    assert sf.info(wrapped).frames < 32000 // 2
    for path in (crashed, wrapped):
        source = WavReplaySource(path, 16000, speed=0)
        got = np.concatenate(list(source.chunks()))
        assert source.error is None and source.warning is None
        np.testing.assert_allclose(got, want, atol=1e-4)
        np.testing.assert_allclose(read_audio(path, 16000)[0], want, atol=1e-4)
    assert WavReplaySource(whole, 16000, speed=0).info.headerless is None  # a whole file goes to libsndfile


def test_a_cut_ogg_and_cancelling_channels_are_said(tmp_path):
    """An Ogg cut mid-stream (no end-of-stream mark: how much is lost is not known) and stereo whose channels
    cancel in the mono mix (a phase-inverted one) were tagged without a word, the latter as digital silence."""
    from streamtag.sources import WavReplaySource

    tone = _tone(16000, seconds=4.0).astype(np.float32)
    ogg = tmp_path / "whole.ogg"
    sf.write(ogg, read_clip(EXAMPLES / "rain.flac"), 16000)
    cut = tmp_path / "cut.ogg"
    cut.write_bytes(ogg.read_bytes()[: ogg.stat().st_size // 2])
    inverted = tmp_path / "inverted.wav"
    sf.write(inverted, np.stack([tone, -tone], axis=1), 16000)
    stereo = tmp_path / "stereo.wav"
    sf.write(stereo, np.stack([tone, 0.5 * tone], axis=1), 16000)

    def warning(path):
        source = WavReplaySource(path, 16000, speed=0)
        assert sum(c.size for c in source.chunks()) > 0 and source.error is None
        return source.warning

    assert "ends without its end-of-stream mark" in warning(cut)
    assert "channels cancel out" in warning(inverted) and "pan=mono|c0=c0" in warning(inverted)
    assert warning(ogg) is None and warning(stereo) is None


def test_a_url_is_not_taken_for_a_path(tmp_path, cnn_dir):
    """http://host/x.wav became http:/host/x.wav ("no such file"); it is named as given, with the pipe that reads it."""
    for command in (["replay", "http://127.0.0.1:9/x.wav", "--model", cnn_dir], ["tag", "rtsp://cam/live"]):
        r = run_cli(*command, "--out", tmp_path / "out") if command[0] == "tag" else run_cli(*command)
        assert r.returncode == 2 and "Traceback" not in r.stderr
        assert f"{command[1]}: a URL, not a file" in r.stderr and "ffmpeg -i" in r.stderr
    manifest = tmp_path / "list.txt"
    manifest.write_text("http://host/a.wav\n")
    r = run_cli("tag", manifest, "--out", tmp_path / "out")
    assert r.returncode == 2 and "lists http://host/a.wav: a URL" in r.stderr


def test_clipped_samples_are_told_apart_from_overshoot():
    """A few samples over full scale (a lossy codec's overshoot) are not a wrong format; many are a float mix
    louder than full scale, clipped here, and the way to turn it down comes with its peak."""
    from streamtag.engine import StreamStats

    few = StreamStats(clipped=1, clipped_peak=1.05, samples=16000)
    assert "too little to matter" in few.problems() and few.problems(overshoot=False) is None
    many = StreamStats(clipped=3000, clipped_peak=3.9, samples=16000)
    assert "peak +11.8 dBFS" in many.problems() and "volume=-12dB" in many.problems()
    peaks = StreamStats(clipped=30, clipped_peak=4.0, samples=16000)  # a loud mix's peaks: few, but far over
    assert "turn it down" in peaks.problems(overshoot=False)
    garbage = StreamStats(nonfinite=5, clipped=1, clipped_peak=2.0, samples=16000)
    assert "is the input format right" in garbage.problems(overshoot=False)


def test_empty_files_and_containers_ffmpeg_reads_say_what_to_do(tmp_path):
    from streamtag.sources.file import probe_audio

    (tmp_path / "empty.wav").write_bytes(b"")
    with pytest.raises(AudioFileError, match=r"empty\.wav is empty \(0 bytes\)"):
        probe_audio(tmp_path / "empty.wav")
    from streamtag.errors import ConfigError

    with pytest.raises(ConfigError, match=r"given by its path, a str or Path \(NoneType given\)"):
        read_audio(None, 16000)
    for name in ("talk.m4a", "clip.mp4", "film.mkv", "radio.aac"):
        (tmp_path / name).write_bytes(b"\x00\x00\x00\x20ftypM4A " + bytes(200))
        with pytest.raises(AudioFileError, match=r"ffmpeg -i .* -f wav - \| streamtag replay -"):
            probe_audio(tmp_path / name)
    # the command is quoted for a shell ('it's.m4a' broke it), and a WAV of an encoding only ffmpeg reads (G.726)
    # is sent there too, where it was told to "use WAV"
    (tmp_path / "it's.m4a").write_bytes(b"\x00\x00\x00\x20ftypM4A " + bytes(200))
    with pytest.raises(AudioFileError) as said:
        probe_audio(tmp_path / "it's.m4a")
    assert f"ffmpeg -i '{tmp_path}/it'\"'\"'s.m4a' -f wav -" in str(said.value)
    fmt = (0x64).to_bytes(2, "little") + (1).to_bytes(2, "little") + (8000).to_bytes(4, "little")
    fmt += (4000).to_bytes(4, "little") + (1).to_bytes(2, "little") + (4).to_bytes(2, "little")
    body = b"WAVE" + b"fmt " + len(fmt).to_bytes(4, "little") + fmt + b"data" + (4000).to_bytes(4, "little")
    (tmp_path / "g726.wav").write_bytes(b"RIFF" + (len(body) + 4000).to_bytes(4, "little") + body + bytes(4000))
    with pytest.raises(AudioFileError, match=r"g726\.wav cannot be read .*only ffmpeg decodes; try ffmpeg -i"):
        probe_audio(tmp_path / "g726.wav")


def test_replay_of_telephone_audio_says_what_the_model_cannot_hear(tmp_path, cnn_dir):
    """An 8 kHz recording has nothing above 4 kHz: its weaker labels came with no word of why."""
    sf.write(tmp_path / "phone.wav", _tone(8000, seconds=1.0), 8000)
    r = run_cli("replay", tmp_path / "phone.wav", "--model", cnn_dir, "--fast", "--quiet")
    assert r.returncode == 0 and "note: the input is 8000 Hz: nothing above 4 kHz reaches the model" in r.stderr
    sf.write(tmp_path / "wide.wav", _tone(16000, seconds=1.0), 16000)
    r = run_cli("replay", tmp_path / "wide.wav", "--model", cnn_dir, "--fast", "--quiet")
    assert r.returncode == 0 and "note:" not in r.stderr, r.stderr
