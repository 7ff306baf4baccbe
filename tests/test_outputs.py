"""File outputs over long runs: rotation (--rotate) and event clips (--save-clips)."""

import os

import numpy as np
import pytest
import soundfile as sf

from streamtag.errors import ConfigError
from streamtag.events import Event
from streamtag.outputs.clips import ClipSaver
from streamtag.outputs.files import EventsJsonl, Rotation, ScoresTsv
from streamtag.steps import Step

from .conftest import EXAMPLES, read_clip, run_cli

LABELS = ("dog", "rain")


def _step(i: int, events=(), audio=None) -> Step:
    probs = np.array([0.1, 0.2], np.float32)
    return Step(i, (i + 1) * 0.01, probs, list(events), LABELS, 0.01, audio)


def test_rotation_values():
    assert Rotation.parse("30m") == Rotation(seconds=1800) and Rotation.parse("1d") == Rotation(seconds=86400)
    assert Rotation.parse("100MB") == Rotation(bytes=100_000_000) and Rotation.parse("1.5kb") == Rotation(bytes=1500)
    for bad in ("1x", "-1h", "0m", "h"):
        with pytest.raises(ConfigError, match="--rotate"):
            Rotation.parse(bad)
    with pytest.raises(ConfigError, match="100m for minutes or 100MB for megabytes"):
        Rotation.parse("100M")


def test_scores_rotate_by_size_losing_no_row_and_keeping_the_header(tmp_path):
    path = tmp_path / "scores.tsv"
    path.write_text("an earlier run's file\n")
    out = ScoresTsv(path, LABELS, rotation=Rotation(bytes=2000))
    for i in range(500):
        out.write(_step(i))
    out.close()
    files = sorted(tmp_path.glob("scores*.tsv"))
    earlier = [f for f in files if f.read_text() == "an earlier run's file\n"]
    assert len(earlier) == 1 and earlier[0] != path  # kept under a dated name, never truncated
    rows = []
    for f in files:
        if f in earlier:
            continue
        lines = f.read_text().splitlines()
        assert lines[0] == "onset\toffset\tdog\train"
        rows += lines[1:]
    assert len(files) > 5 and len(rows) == 500
    # the names sort in time order (cat scores.*.tsv): a "-1" for a second file in one second sorted first
    assert [float(r.split("\t")[0]) for r in rows] == [round(i * 0.01, 3) for i in range(500)]


def test_rotated_files_sort_in_time_order(tmp_path):
    """Pieces closed within one second were named x.<time>Z.tsv, then x.<time>Z-1.tsv, which sorts before it."""
    path = tmp_path / "scores.tsv"
    out = ScoresTsv(path, LABELS, rotation=Rotation(bytes=300))
    for i in range(60):
        out.write(_step(i))
    out.close()
    pieces = sorted(tmp_path.glob("scores.*.tsv")) + [path]  # the current file last
    onsets = [float(line.split("\t")[0]) for f in pieces for line in f.read_text().splitlines()[1:]]
    assert len(pieces) > 3 and onsets == [round(i * 0.01, 3) for i in range(60)]


def test_events_rotate_by_age(tmp_path):
    path = tmp_path / "events.jsonl"
    out = EventsJsonl(path, rotation=Rotation(seconds=1e-9))  # every line is past the age: one file each
    for i in range(3):
        out.write(_step(i, [Event("open", "dog", i * 0.01, None, 0.9, 0.9)]))
    out.close()
    assert len(list(tmp_path.glob("events.*.jsonl"))) == 3 and path.read_text() == ""


def test_clips_hold_pre_roll_event_and_post_roll(tmp_path):
    rate, hop = 16000, 160
    saver = ClipSaver(tmp_path, rate, pre_s=1.0, post_s=0.5)
    audio = np.arange(800 * hop, dtype=np.float32) / (800 * hop)  # 8 s, each sample says where it was
    for i in range(800):
        events = []
        if i == 320:  # confirmed at 3.2 s, onset backdated to 3.0 s
            events = [Event("open", "dog", 3.0, None, 0.9, 0.9)]
        if i == 400:
            events = [Event("close", "dog", 3.0, 4.0, 0.9, 0.8, "ended")]
        saver.write(_step(i, events, audio[i * hop : (i + 1) * hop]))
    saver.close()
    assert saver.saved == 1 and len(list(tmp_path.iterdir())) == 1
    clip = saver.last_saved
    x, got_rate = sf.read(clip, dtype="float32")
    assert got_rate == rate and clip.name.startswith("dog_") and clip.name.endswith("_3.00s.flac")
    assert x.size == int((4.5 - 2.0) * rate)  # from onset - 1 s to offset + 0.5 s
    np.testing.assert_allclose(x, audio[2 * rate : int(4.5 * rate)], atol=1 / 32768)


def test_replay_saves_clips_and_refuses_a_missing_folder(tmp_path):
    clips = tmp_path / "clips"
    r = run_cli("replay", EXAMPLES / "rain.flac", "--fast", "--quiet", "--save-clips", clips)
    assert r.returncode == 2 and "--save-clips" in r.stderr and "create it first" in r.stderr
    clips.mkdir()
    for gain in ("0", "20"):  # with --gain, a clip is still what came in (it was the raised audio, squared off)
        folder = clips / gain
        folder.mkdir()
        r = run_cli("replay", EXAMPLES / "rain.flac", "--fast", "--quiet", "--save-clips", folder, "--gain", gain)
        assert r.returncode == 0, r.stderr
        (clip,) = folder.glob("rain_*.flac")  # the bundled model hears the rain
        x, _ = sf.read(clip, dtype="float32")
        onset = float(clip.stem.rsplit("_", 1)[1].removesuffix("s"))  # rain_<time>_<onset>s.flac
        start = max(0, round((onset - 2.0) * 16000))  # 2 s of pre-roll before the onset
        np.testing.assert_allclose(x, read_clip(EXAMPLES / "rain.flac")[start : start + x.size], atol=1 / 32768)
        assert start + x.size == 80000  # the event ran to the end of the clip


def test_plot_keeps_a_bounded_number_of_columns_and_every_peak(tmp_path, monkeypatch):
    """A long stream merges neighbouring columns (time resolution halves) instead of growing; a one-hop spike
    survives every merge as its column's maximum."""
    import streamtag.outputs.plots as plots
    from streamtag.config import FeatureConfig

    monkeypatch.setattr(plots, "MAX_COLUMNS", 64)
    plot = plots.RecordingPlot(tmp_path / "p.png", FeatureConfig(), title="long")
    rng = np.random.default_rng(0)
    spike = 7777
    for i in range(10_000):
        probs = np.array([0.1, 1.0 if i == spike else 0.05], np.float32)
        events = [Event("close", "dog", i * 0.01, i * 0.01 + 0.5, 0.9, 0.8, "ended")] if i % 1000 == 0 else []
        plot.write(Step(i, (i + 1) * 0.01, probs, events, LABELS, 0.01, rng.normal(0, 0.1, 160).astype(np.float32)))
    plot._flush()
    assert plot._bucket == 256 and plot._mel.shape[0] == 64  # 10,000 hops in 40 columns of 256
    assert plot._count.sum() == 10_000
    assert plot._probs[spike // 256, 1] == 1.0 and np.sort(plot._probs[:, 1])[-2] == pytest.approx(0.05)
    plot.close()
    assert (tmp_path / "p.png").stat().st_size > 10_000


def test_plot_of_stdin(tmp_path):
    import subprocess
    import sys

    pcm = (read_clip(EXAMPLES / "rain.flac") * 32767).astype("<i2").tobytes()
    png = tmp_path / "p.png"
    cmd = [sys.executable, "-m", "streamtag", "replay", "-", "--raw-rate", "16000", "--raw-format", "s16le"]
    r = subprocess.run([*cmd, "--fast", "--quiet", "--plot", str(png)], input=pcm, capture_output=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert png.stat().st_size > 10_000


def test_replay_never_writes_over_the_audio_it_reads(tmp_path, cnn_dir):
    """replay - --events X < X left X 0 bytes; cat X | replay - --events X truncated the recording too."""
    import subprocess
    import sys

    wav = tmp_path / "take.wav"
    sf.write(wav, read_clip(EXAMPLES / "dog.flac"), 16000)
    before = wav.read_bytes()
    cmd = [sys.executable, "-m", "streamtag", "replay", "-", "--model", str(cnn_dir), "--fast", "--quiet"]
    with open(wav, "rb") as stdin:  # stdin is the file itself
        r = subprocess.run([*cmd, "--events", str(wav)], stdin=stdin, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "also the file read on stdin" in r.stderr, r.stderr
    r = subprocess.run([*cmd, "--jsonl", str(wav)], input=before, capture_output=True, timeout=120)  # a pipe
    assert r.returncode == 2 and b"is an audio file" in r.stderr, r.stderr
    assert wav.read_bytes() == before
    with pytest.raises(ConfigError, match="is an audio file"):
        EventsJsonl(EXAMPLES / "dog.flac")


def test_a_folder_that_takes_no_files_is_said_so(tmp_path):
    """--save-clips /proc said "cannot write in /proc (No such file or directory)" of a folder that exists."""
    from streamtag.errors import ConfigError
    from streamtag.outputs.files import check_output_folder

    if not os.path.isdir("/proc/self"):
        pytest.skip("needs Linux's /proc")
    with pytest.raises(ConfigError, match=r"cannot write in /proc \(it takes no new files\)"):
        check_output_folder("/proc", "--save-clips")
