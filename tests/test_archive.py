"""streamtag tag: whole folders and manifests, results equal to replay, resumable, bad files recorded."""

import csv
import json
import shutil

import numpy as np
import pytest

from .conftest import EXAMPLES, run_cli

CLIPS = ("dog.flac", "rain.flac", "chainsaw.flac")


@pytest.fixture()
def archive(tmp_path):
    root = tmp_path / "recordings"
    (root / "garden" / "north").mkdir(parents=True)
    for name in CLIPS[:2]:
        shutil.copy(EXAMPLES / name, root / name)
    shutil.copy(EXAMPLES / "chainsaw.flac", root / "garden" / "north" / "chainsaw.flac")
    (root / "garden" / "broken.wav").write_bytes(b"RIFF not really a wav")
    return root


def _events(path):
    return [
        (r["type"], r["label"], r["onset"], r.get("offset")) for r in map(json.loads, path.read_text().splitlines())
    ]


def _rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_tag_equals_replay_per_file_and_records_the_bad_one(archive, tmp_path, cnn_dir):
    out = tmp_path / "out"
    r = run_cli("tag", archive, "--out", out, "--model", cnn_dir, "--scores", "--jobs", "1", "--on-threshold", "0.3")
    assert r.returncode == 1, r.stderr  # one file failed
    assert "broken.wav" in r.stderr and "Traceback" not in r.stderr
    errors = _rows(out / "errors.csv")
    assert [e["name"] for e in errors] == ["recordings/garden/broken.wav"] and "not a readable audio file" in errors[0][
        "error"
    ]
    summary = {row["name"]: row for row in _rows(out / "summary.csv")}
    assert sorted(summary) == [
        "recordings/chainsaw.flac" if False else "recordings/dog.flac",
        "recordings/garden/north/chainsaw.flac",
        "recordings/rain.flac",
    ]
    for name, clip in (
        ("dog.flac", "dog.flac"),
        ("rain.flac", "rain.flac"),
        ("garden/north/chainsaw.flac", "chainsaw.flac"),
    ):
        base = out / "recordings" / name
        ev, sc = tmp_path / f"{clip}.events.jsonl", tmp_path / f"{clip}.scores.tsv"
        rr = run_cli(
            "replay",
            EXAMPLES / clip,
            "--model",
            cnn_dir,
            "--fast",
            "--quiet",
            "--on-threshold",
            "0.3",
            "--events",
            ev,
            "--scores",
            sc,
        )
        assert rr.returncode == 0, rr.stderr
        assert _events(base.with_name(base.name + ".events.jsonl")) == _events(ev)
        ours = np.loadtxt(base.with_name(base.name + ".scores.tsv"), skiprows=1)
        np.testing.assert_allclose(ours, np.loadtxt(sc, skiprows=1), atol=1e-5)
        closes = [e for e in _events(ev) if e[0] == "close"]
        labels = base.with_name(base.name + ".labels.txt").read_text().splitlines()
        assert [line.split("\t")[2] for line in labels] == [e[1] for e in closes]
        assert float(summary[f"recordings/{name}"]["seconds"]) == pytest.approx(5.0)
    assert any(_events(ev) for ev in out.rglob("*.events.jsonl"))  # the threshold does give events to compare


def test_rerun_skips_finished_files_and_force_redoes_them(archive, tmp_path, cnn_dir):
    out = tmp_path / "out"
    (archive / "garden" / "broken.wav").unlink()
    assert run_cli("tag", archive, "--out", out, "--model", cnn_dir, "--jobs", "1").returncode == 0
    marker = out / "recordings" / "dog.flac.done.json"
    before = marker.stat().st_mtime_ns
    r = run_cli("tag", archive, "--out", out, "--model", cnn_dir, "--jobs", "1")
    assert r.returncode == 0 and "3 already done" in r.stderr and marker.stat().st_mtime_ns == before
    assert len(_rows(out / "summary.csv")) == 3  # skipped files keep their summary rows
    r = run_cli("tag", archive, "--out", out, "--model", cnn_dir, "--jobs", "1", "--force")
    assert r.returncode == 0 and "tagged 3 files" in r.stderr and marker.stat().st_mtime_ns != before
    assert not list(out.rglob("*.part"))  # nothing half-written left behind


def test_processes_and_manifests_give_the_same_outputs(archive, tmp_path, cnn_dir):
    (archive / "garden" / "broken.wav").unlink()
    one, two = tmp_path / "one", tmp_path / "two"
    assert run_cli("tag", archive, "--out", one, "--model", cnn_dir, "--jobs", "1", "--scores").returncode == 0
    assert run_cli("tag", archive, "--out", two, "--model", cnn_dir, "--jobs", "2", "--scores").returncode == 0
    for f in one.rglob("*.scores.tsv"):  # batches of other sizes: float rounding only
        np.testing.assert_allclose(
            np.loadtxt(f, skiprows=1), np.loadtxt(two / f.relative_to(one), skiprows=1), atol=1e-5
        )
    manifest = archive / "list.csv"
    manifest.write_text("path\ndog.flac\ngarden/north/chainsaw.flac\n")
    three = tmp_path / "three"
    r = run_cli("tag", manifest, "--out", three, "--model", cnn_dir, "--jobs", "1", "--scores", "--parquet")
    assert r.returncode == 0, r.stderr
    got = sorted(str(p.relative_to(three)) for p in three.rglob("*.scores.tsv"))
    assert got == ["dog.flac.scores.tsv", "garden/north/chainsaw.flac.scores.tsv"]
    np.testing.assert_allclose(
        np.loadtxt(three / "dog.flac.scores.tsv", skiprows=1),
        np.loadtxt(one / "recordings" / "dog.flac.scores.tsv", skiprows=1),
        atol=1e-5,
    )
    pq = pytest.importorskip("pyarrow.parquet")
    assert pq.read_table(three / "summary.parquet").column("name").to_pylist() == [
        "dog.flac",
        "garden/north/chainsaw.flac",
    ]


def test_bad_invocations_say_what_to_fix(tmp_path, cnn_dir):
    r = run_cli("tag", tmp_path / "nowhere", "--out", tmp_path / "o")
    assert r.returncode == 2 and "no such file or folder" in r.stderr and "Traceback" not in r.stderr
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    shutil.copy(EXAMPLES / "dog.flac", tmp_path / "a" / "dog.flac")
    shutil.copy(EXAMPLES / "dog.flac", tmp_path / "b" / "dog.flac")
    r = run_cli("tag", tmp_path / "a" / "dog.flac", tmp_path / "b" / "dog.flac", "--out", tmp_path / "o")
    assert r.returncode == 2 and "would both write outputs named 'dog.flac'" in r.stderr
    (tmp_path / "empty").mkdir()
    r = run_cli("tag", tmp_path / "empty", "--out", tmp_path / "o")
    assert r.returncode == 2 and "no audio files" in r.stderr
    r = run_cli(
        "tag", tmp_path / "a", "--out", tmp_path / "o", "--model", cnn_dir, "--event-config", tmp_path / "x.toml"
    )
    assert r.returncode == 2 and "x.toml" in r.stderr


def test_stdin_is_tagged_as_one_named_file(tmp_path, cnn_dir):
    import subprocess
    import sys

    from .conftest import read_clip

    pcm = (read_clip(EXAMPLES / "rain.flac") * 32767).astype("<i2").tobytes()
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "streamtag", "tag", "-", "--out", str(out), "--model", str(cnn_dir), "--scores"]
    raw = ["--raw-rate", "16000", "--raw-format", "s16le", "--name", "porch"]
    r = subprocess.run(cmd + raw, input=pcm, capture_output=True, timeout=120)
    assert r.returncode == 0, r.stderr
    scores = np.loadtxt(out / "porch.scores.tsv", skiprows=1)
    files = tmp_path / "files"
    assert run_cli("tag", EXAMPLES / "rain.flac", "--out", files, "--model", cnn_dir, "--scores").returncode == 0
    np.testing.assert_allclose(scores, np.loadtxt(files / "rain.flac.scores.tsv", skiprows=1), atol=1e-3)  # 16-bit
    r = subprocess.run(cmd + raw, input=b"", capture_output=True, timeout=120)
    assert r.returncode == 1 and b"no audio" in r.stderr
    r = subprocess.run(cmd, input=b"not a wav header at all", capture_output=True, timeout=120)
    assert r.returncode == 2 and b"not a WAV stream" in r.stderr


def test_ray_writes_exactly_what_a_local_tag_writes(archive, tmp_path, cnn_dir):
    pytest.importorskip("ray", reason="Ray is an optional extra (pip install 'streamtag[ray]')")
    local, on_ray = tmp_path / "local", tmp_path / "ray"
    args = ["--model", cnn_dir, "--scores", "--on-threshold", "0.3"]
    assert run_cli("tag", archive, "--out", local, "--jobs", "1", *args).returncode == 1  # the broken file
    r = run_cli("tag", archive, "--out", on_ray, "--ray", "auto", "--jobs", "2", *args, timeout=300)
    assert r.returncode == 1 and "1 failed" in r.stderr, r.stderr
    assert _rows(on_ray / "summary.csv") == _rows(local / "summary.csv")
    assert _rows(on_ray / "errors.csv") == _rows(local / "errors.csv")
    for f in local.rglob("*.events.jsonl"):
        assert _events(on_ray / f.relative_to(local)) == _events(f)
    for f in local.rglob("*.scores.tsv"):
        np.testing.assert_allclose(
            np.loadtxt(on_ray / f.relative_to(local), skiprows=1), np.loadtxt(f, skiprows=1), atol=1e-5
        )
