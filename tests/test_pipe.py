"""`replay -`: a WAV stream or raw PCM on stdin gives the scores of the same audio from a file."""

import json
import re
import subprocess
import sys
import time

import numpy as np
import pytest
import soundfile as sf

from .conftest import EXAMPLES


def _replay(model, *args, stdin: bytes | None = None):
    return subprocess.run(
        [sys.executable, "-m", "streamtag", "replay", *map(str, args), "--model", str(model), "--fast", "--quiet"],
        input=stdin,
        capture_output=True,
        timeout=120,
    )


def _probs(path):
    return np.array([list(json.loads(line)["probs"].values()) for line in path.read_text().splitlines()])


def test_raw_pcm_on_stdin_equals_the_file(cnn_dir, tmp_path):
    clip = EXAMPLES / "rain.flac"
    samples, _ = sf.read(clip, dtype="int16")
    piped, filed = tmp_path / "piped.jsonl", tmp_path / "file.jsonl"
    r = _replay(cnn_dir, "-", "--raw-rate", 16000, "--raw-format", "s16le", "--jsonl", piped, "--all",
                stdin=samples.astype("<i2").tobytes())  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert b"captured 80000, processed 80000, dropped 0" in r.stderr
    assert _replay(cnn_dir, clip, "--jsonl", filed, "--all").returncode == 0
    np.testing.assert_allclose(_probs(piped), _probs(filed), atol=1e-5)


def test_a_wav_stream_of_another_rate_and_width(cnn_dir, tmp_path):
    """24-bit stereo at 44.1 kHz, as ffmpeg -f wav writes it, read from the pipe without seeking."""
    wav = tmp_path / "rain44.wav"
    audio, _ = sf.read(EXAMPLES / "rain.flac", dtype="float32")
    import soxr

    up = soxr.resample(audio, 16000, 44100)
    sf.write(wav, np.stack([up, up], 1), 44100, subtype="PCM_24")
    piped, filed = tmp_path / "piped.jsonl", tmp_path / "file.jsonl"
    r = _replay(cnn_dir, "-", "--jsonl", piped, "--all", stdin=wav.read_bytes())
    assert r.returncode == 0, r.stderr
    assert _replay(cnn_dir, wav, "--jsonl", filed, "--all").returncode == 0
    a, b = _probs(piped), _probs(filed)
    assert a.shape == b.shape and len(a) >= 49
    np.testing.assert_allclose(a, b, atol=1e-4)


@pytest.mark.parametrize(
    "args, stdin, message",
    [
        (["-"], (EXAMPLES / "rain.flac").read_bytes(), "stdin is not a WAV stream"),
        (["-"], b"", "stdin is empty: nothing was piped in"),  # it said "not a WAV stream"
        (  # a fmt chunk too short: a bare struct.error traceback
            ["-"],
            b"RIFF\x64\0\0\0WAVEfmt \x04\0\0\0\x01\0\x01\0data\0\0\0\0",
            "fmt chunk is 4 bytes, not the 16 it needs",
        ),
        (["-", "--raw-rate", "16000"], b"\0" * 3200, "needs both --raw-rate and --raw-format"),
        (["-", "--raw-rate", "5", "--raw-format", "s16le"], b"\0" * 3200, "--raw-rate must be a whole number of Hz in"),
        (["-", "--raw-rate", "0", "--raw-format", "s16le"], b"\0" * 3200, "--raw-rate must be a whole number of Hz in"),
        (["{dog}", "--raw-rate", "16000", "--raw-format", "s16le"], b"", "describe stdin"),
        (["{dog}", "--raw-channels", "2"], b"", "--raw-channels describes raw PCM"),
        (["-", "--raw-channels", "2"], b"\0" * 3200, "--raw-channels describes raw PCM"),
        (["-", "--raw-rate", "16000", "--raw-format", "s16le", "--raw-channels", "0"], b"\0" * 3200, "1..64"),
    ],
)
def test_bad_pipe_input_is_one_line(cnn_dir, tmp_path, args, stdin, message):
    fill = {"tmp": tmp_path, "dog": EXAMPLES / "dog.flac"}
    r = _replay(cnn_dir, *[a.format(**fill) for a in args], stdin=stdin)
    err = r.stderr.decode()
    assert r.returncode == 2, err
    assert message in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_events_to_stdout_carry_nothing_else(cnn_dir):
    """--events - writes the event lines to stdout (for jq or mosquitto_pub) and nothing else goes there."""
    r = subprocess.run(
        [sys.executable, "-m", "streamtag", "replay", str(EXAMPLES / "rain.flac"), "--model", str(cnn_dir),
         "--fast", "--events", "-", "--on-threshold", "0.05"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    rows = [json.loads(line) for line in r.stdout.splitlines()]
    assert rows and all(row["type"] in ("open", "close") for row in rows)
    assert "samples: captured" in r.stderr  # the summary stays on stderr
    both = _replay(cnn_dir, EXAMPLES / "rain.flac", "--events", "-", "--jsonl", "-")
    assert both.returncode == 2 and b"standard output is already" in both.stderr


def test_stdin_with_no_audio_or_the_wrong_format_is_said_plainly(cnn_dir, tmp_path):
    raw = ["-", "--raw-rate", "16000", "--raw-format", "s16le"]
    for stdin in (b"", b"abc"):  # nothing, or not one whole hop
        r = _replay(cnn_dir, *raw, stdin=stdin)
        assert r.returncode == 1 and "stdin ended with no audio to tag" in r.stderr.decode()
    scores = tmp_path / "s.tsv"
    scores.write_text("an earlier run's scores\n")  # an upstream command that failed: its empty pipe costs nothing
    r = _replay(cnn_dir, *raw, "--scores", scores, stdin=b"")
    assert r.returncode == 1 and scores.read_text() == "an earlier run's scores\n"
    s16 = (np.sin(np.arange(32000) / 5) * 30000).astype("<i2").tobytes()
    r = _replay(cnn_dir, "-", "--raw-rate", "16000", "--raw-format", "f32le", stdin=s16 * 4)  # read as float
    err = r.stderr.decode()
    assert "RuntimeWarning" not in err and "Traceback" not in err
    assert "is the input format right (e.g. int16 read as float)?" in err  # tagged, and the likely cause said


@pytest.mark.parametrize("fmt", ["s16le", "s32le", "f32le"])
def test_pcm_in_pieces_of_any_size_decodes_as_one_piece(fmt):
    """The one decoder of stdin and serve's WebSocket streams: a part-frame at the end of a piece waits."""
    from streamtag.sources.pipe import PcmDecoder, PcmFormat

    rng = np.random.default_rng(1)
    pcm_format = PcmFormat.raw(16000, fmt, channels=2)
    x = rng.uniform(-0.9, 0.9, (500, 2))
    dtype, scale = {"s16le": ("<i2", 2**15), "s32le": ("<i4", 2**31), "f32le": ("<f4", 1.0)}[fmt]
    data = (x * scale).astype(dtype).tobytes()
    whole = PcmDecoder(pcm_format)(data)
    decode = PcmDecoder(pcm_format)
    cuts = sorted(rng.integers(0, len(data), 30))
    pieces = [decode(part.tobytes()) for part in np.split(np.frombuffer(data, np.uint8), cuts)]
    np.testing.assert_array_equal(np.concatenate([p for p in pieces if p.size]), whole)
    np.testing.assert_allclose(whole, x, atol=1e-4)


def test_a_named_pipe_given_as_a_file_is_refused_with_the_way_to_read_it(cnn_dir, tmp_path):
    """A FIFO (or <(...)) has no rewind: probed, then opened again, it waited for a writer for ever, deaf to
    SIGTERM. replay and tag say at once that it is to be fed on stdin; nothing opens the pipe."""
    import os

    fifo = tmp_path / "audio.fifo"
    os.mkfifo(fifo)
    r = _replay(cnn_dir, fifo)
    t = subprocess.run(
        [sys.executable, "-m", "streamtag", "tag", str(fifo), "--model", str(cnn_dir), "--out", str(tmp_path / "t")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    err = r.stderr.decode()
    assert r.returncode == 2 and "is a pipe or a device, not a file: give - as the input" in err, err
    assert len(err.strip().splitlines()) == 1, err
    assert t.returncode == 2 and "is a pipe or a device, not a file: tag it as - --name NAME" in t.stderr, t.stderr


def test_a_run_with_no_audio_reports_no_timing_or_level(cnn_dir):
    """Empty stdin: the summary said p50 nan ms and called the input very quiet before the real error."""
    r = _replay(cnn_dir, "-", "--raw-rate", "16000", "--raw-format", "s16le", stdin=b"")
    err = r.stderr.decode()
    assert r.returncode == 1 and "stdin ended with no audio" in err, err
    assert "nan" not in err and "very quiet" not in err and "processed 0" in err, err


def _until_read(pipe, limit_s: float = 60) -> None:
    """Wait until the reader of ``pipe`` (a writing end, or a process whose stdin it is) has read everything
    written to it: it then waits for more. Not a timed assertion: a slow machine only waits longer."""
    import fcntl
    import termios

    fd = pipe if isinstance(pipe, int) else pipe.stdin.fileno()
    waiting = bytearray(4)
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        fcntl.ioctl(fd, termios.FIONREAD, waiting)  # bytes in the pipe (Linux: either end)
        if int.from_bytes(waiting, sys.byteorder) == 0:
            return
        time.sleep(0.05)


@pytest.mark.parametrize("sig, code", [("SIGTERM", 0), ("SIGINT", 130)])
def test_a_stop_while_stdin_is_stalled_ends_cleanly(cnn_dir, tmp_path, sig, code):
    """A camera's ffmpeg that stops sending without closing the pipe (here a named pipe, as `< fifo` gives),
    then a stop: the reader thread was blocked in a read on sys.stdin's buffer, and the interpreter aborted at
    exit (exit 134, "Fatal Python error: ... could not acquire lock for <_io.BufferedReader name='<stdin>'>")."""
    import os
    import signal

    fifo, scores = tmp_path / "camera", tmp_path / "s.tsv"
    os.mkfifo(fifo)
    writer = os.open(fifo, os.O_RDWR)  # held open and silent, as a stalled ffmpeg holds it
    cmd = [sys.executable, "-m", "streamtag", "replay", "-", "--raw-rate", "16000", "--raw-format", "s16le"]
    cmd += ["--model", str(cnn_dir), "--scores", str(scores), "--quiet"]
    with open(fifo, "rb") as stdin:
        proc = subprocess.Popen(cmd, stdin=stdin, stderr=subprocess.PIPE)
    samples, _ = sf.read(EXAMPLES / "dog.flac", dtype="int16", frames=8000)
    os.write(writer, samples.astype("<i2").tobytes())  # half a second, then nothing
    _until_read(writer)
    time.sleep(1)  # not an assertion: the half second is paced out, and the reader waits in a read
    proc.send_signal(getattr(signal, sig))
    err = proc.communicate(timeout=60)[1].decode()
    os.close(writer)
    assert proc.returncode == code and "Fatal Python error" not in err, err
    frames = int(re.search(r"tagged, (\d+) frames", err).group(1))
    assert frames > 0 and len(scores.read_text().splitlines()) == 1 + frames  # flushed: a row for every hop


def test_a_stop_while_the_wav_header_is_awaited_is_an_interrupt(cnn_dir):
    """SIGTERM before any byte came killed the process with no word (exit 143); now a stop like any other (exit 0,
    as once audio has come)."""
    import signal

    cmd = [sys.executable, "-m", "streamtag", "replay", "-", "--model", str(cnn_dir), "--quiet"]
    proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdin.write(b"RIFF")  # the start of a header, and no more
    proc.stdin.flush()
    _until_read(proc)
    proc.send_signal(signal.SIGTERM)
    err = proc.communicate(timeout=60)[1].decode()
    assert proc.returncode == 0 and err.strip().endswith("streamtag replay: interrupted"), err


def test_what_arrives_short_of_its_format_is_said(cnn_dir):
    """A part-frame at the end of raw PCM was dropped without a word (a wrong --raw-channels shows this way), and a
    WAV stream cut short said "100% missing" however much had come."""
    import io

    samples, _ = sf.read(EXAMPLES / "dog.flac", dtype="int16", frames=16000)
    pcm = samples.astype("<i2").tobytes()
    r = _replay(cnn_dir, "-", "--raw-rate", 16000, "--raw-format", "s16le", stdin=pcm + b"\x01")
    err = r.stderr.decode()
    assert r.returncode == 0 and "captured 16000" in err, err
    assert "warning: stdin ended 1 byte(s) into a frame (2 bytes a frame)" in err and "--raw-channels" in err
    wav = io.BytesIO()
    sf.write(wav, samples, 16000, format="WAV", subtype="PCM_16")  # a header announcing 1 s
    r = _replay(cnn_dir, "-", stdin=wav.getvalue()[: 44 + 8000 * 2])  # and half of it
    assert r.returncode == 1 and "0.50 s of the 1.00 s of audio its WAV header announced arrived" in r.stderr.decode()
