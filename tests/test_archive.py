"""streamtag tag: whole folders and manifests, results equal to replay, resumable, bad files recorded."""

import array
import csv
import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from .conftest import EXAMPLES, read_clip, run_cli

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
    assert "give their folders instead" in r.stderr
    for site in ("c1", "c2"):  # folders given, of one name: giving folders is no fix, folders above them are
        (tmp_path / site / "rec").mkdir(parents=True)
        shutil.copy(EXAMPLES / "dog.flac", tmp_path / site / "rec" / "dog.flac")
    r = run_cli("tag", tmp_path / "c1" / "rec", tmp_path / "c2" / "rec", "--out", tmp_path / "o")
    assert r.returncode == 2 and "named 'rec/dog.flac': give folders above these" in r.stderr, r.stderr
    for site in ("c1", "c2"):  # two manifests, each naming its dog.flac
        (tmp_path / site / "rec" / "list.txt").write_text("dog.flac\n")
    r = run_cli(
        "tag", tmp_path / "c1" / "rec" / "list.txt", tmp_path / "c2" / "rec" / "list.txt", "--out", tmp_path / "o"
    )
    assert r.returncode == 2 and "'dog.flac': list them in one manifest" in r.stderr, r.stderr
    (tmp_path / "empty").mkdir()
    r = run_cli("tag", tmp_path / "empty", "--out", tmp_path / "o")
    assert r.returncode == 2 and "no audio files" in r.stderr
    r = run_cli(
        "tag", tmp_path / "a", "--out", tmp_path / "o", "--model", cnn_dir, "--event-config", tmp_path / "x.toml"
    )
    assert r.returncode == 2 and "x.toml" in r.stderr


def test_stdin_is_tagged_as_one_named_file(tmp_path, cnn_dir):
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
    r = subprocess.run(cmd + raw, input=pcm, capture_output=True, timeout=120)  # stdin is new audio every time
    assert r.returncode == 2 and b"already holds results named 'porch'" in r.stderr and b"--force" in r.stderr
    r = subprocess.run(cmd + raw + ["--force"], input=b"", capture_output=True, timeout=120)
    assert r.returncode == 1 and b"no audio" in r.stderr
    wav = io.BytesIO()
    sf.write(wav, read_clip(EXAMPLES / "rain.flac"), 16000, format="WAV", subtype="PCM_16")
    r = subprocess.run(cmd + ["--name", "cut"], input=wav.getvalue()[:60000], capture_output=True, timeout=120)
    assert r.returncode == 1 and b"stdin ended early" in r.stderr  # the header announced more than came
    r = subprocess.run(cmd, input=b"not a wav header at all", capture_output=True, timeout=120)
    assert r.returncode == 2 and b"not a WAV stream" in r.stderr


def _wait_idle(pid: int, deadline: float) -> None:
    """Until every thread of ``pid`` sleeps and its CPU time stands still for three looks in a row (none runnable:
    a starved thread shows R): what it was given is done, by no clock of ours."""

    def state() -> tuple[bool, int]:
        asleep, ticks = True, 0
        for stat in Path(f"/proc/{pid}/task").glob("*/stat"):
            fields = stat.read_text().rsplit(")", 1)[1].split()
            asleep &= fields[0] in "SD"
            ticks += int(fields[11]) + int(fields[12])  # utime, stime
        return asleep, ticks

    still, last = 0, None
    while still < 3 and time.monotonic() < deadline:
        time.sleep(0.2)
        asleep, ticks = state()
        still = still + 1 if asleep and ticks == last else 0
        last = ticks


@pytest.mark.parametrize("how", [signal.SIGTERM, signal.SIGINT])
def test_a_stop_keeps_what_stdin_gave_and_closes_its_open_event(tmp_path, cnn_dir, how):
    """stdin cannot be read again: a stop threw away everything tagged and advised running the command again.
    Now what came before the stop is kept, the event open at the stop closed as interrupted."""
    import fcntl
    import termios

    pcm = (read_clip(EXAMPLES / "dog.flac")[: int(2.9 * 16000)] * 32767).astype("<i2").tobytes()  # an event open
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "streamtag", "tag", "-", "--out", str(out), "--model", str(cnn_dir), "--name", "cam"]
    proc = subprocess.Popen(
        [*cmd, "--raw-rate", "16000", "--raw-format", "s16le"], stdin=subprocess.PIPE, stderr=subprocess.PIPE
    )
    proc.stdin.write(pcm)
    proc.stdin.flush()
    deadline = time.monotonic() + 120
    unread = array.array("i", [1])
    while unread[0] and time.monotonic() < deadline:  # until tag has read it all (the pipe open still)
        time.sleep(0.2)
        fcntl.ioctl(proc.stdin.fileno(), termios.FIONREAD, unread)
    _wait_idle(proc.pid, deadline)  # and has tagged it: waiting for more
    proc.send_signal(how)
    err = proc.communicate(timeout=120)[1].decode()
    assert proc.returncode == (0 if how == signal.SIGTERM else 130), err
    assert "stdin's audio up to the stop is tagged" in err and "run the same command again" not in err, err
    rows = [json.loads(line) for line in (out / "cam.events.jsonl").read_text().splitlines()]
    assert rows and rows[-1]["type"] == "close" and rows[-1]["reason"] == "interrupted", rows  # open at the stop
    (row,) = _rows(out / "summary.csv")
    assert float(row["seconds"]) == pytest.approx(2.9, abs=0.011) and "stopped before stdin ended" in row["warning"]
    assert not list(out.rglob("*.part"))


def test_a_stop_before_stdin_gave_any_audio_is_no_failure(tmp_path, cnn_dir):
    """A service stopping an idle `tag -` (no audio yet): kept nothing, and is neither a failure nor a claim that
    audio was tagged."""
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "streamtag", "tag", "-", "--out", str(out), "--model", str(cnn_dir), "--name", "cam"]
    proc = subprocess.Popen(
        [*cmd, "--raw-rate", "16000", "--raw-format", "s16le"], stdin=subprocess.PIPE, stderr=subprocess.PIPE
    )
    _wait_idle(proc.pid, time.monotonic() + 120)  # waiting for its first audio
    proc.send_signal(signal.SIGTERM)
    err = proc.communicate(timeout=120)[1].decode()
    assert proc.returncode == 0 and "nothing was written" in err and "0 failed" in err, err
    assert not list(out.glob("cam*"))


def test_a_file_whose_output_names_are_too_long_fails_alone(tmp_path, cnn_dir):
    """A 251-byte file name (valid) made tag's outputs' names too long: the other files of its worker failed with
    its error, and every later run into that --out stopped with a traceback."""
    folder = tmp_path / "rec"
    folder.mkdir()
    for name in ("a.flac", "b.flac", "x" * 240 + ".flac"):
        shutil.copy(EXAMPLES / "dog.flac", folder / name)
    out = tmp_path / "out"
    for run in range(2):
        r = run_cli("tag", folder, "--out", out, "--model", cnn_dir, "--jobs", "1")
        assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
        assert f"{'2 already done' if run else '2 files'}" in r.stderr and "1 failed" in r.stderr, r.stderr
        assert "its outputs' names would be 263 bytes long, more than the 255" in r.stderr, r.stderr
        (error,) = _rows(out / "errors.csv")
        assert error["name"] == "rec/" + "x" * 240 + ".flac" and "give it a shorter name" in error["error"]
    assert sorted(row["name"] for row in _rows(out / "summary.csv")) == ["rec/a.flac", "rec/b.flac"]
    for name, says in (("N" * 250, "--name is too long"), ("", "--name '': give a plain file name")):
        r = run_cli("tag", "-", "--out", out, "--model", cnn_dir, "--name", name, input="")
        assert r.returncode == 2 and says in r.stderr and len(r.stderr.splitlines()) == 1, r.stderr


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full (Linux) to stand for a full disk")
@pytest.mark.parametrize("files", [1, 2])
def test_a_full_disk_is_one_line_and_leaves_nothing_half_written(tmp_path, cnn_dir, files):
    """A full disk under --out: a traceback (three chained), the file's .part outputs left behind. The .part of one
    output is made a link to /dev/full, where every write fails as on a full disk."""
    folder = tmp_path / "rec"
    folder.mkdir()
    for i in range(files):
        shutil.copy(EXAMPLES / "rain.flac", folder / f"{i}.flac")
    out = tmp_path / "out"
    (out / "rec").mkdir(parents=True)
    (out / "rec" / "0.flac.scores.tsv.part").symlink_to("/dev/full")
    r = run_cli("tag", folder, "--out", out, "--model", cnn_dir, "--scores", "--jobs", "1")
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    assert f"{out}: No space left on device" in r.stderr and "run it again" in r.stderr, r.stderr
    assert not list(out.rglob("*.part")) and not list(out.rglob("*.done.json"))


def test_manifests_in_other_encodings_and_with_spaces(tmp_path, cnn_dir):
    """A manifest of names that are not UTF-8 (find over a Latin-1 archive) or saved as UTF-16 (Excel's Unicode
    text) stopped with a UnicodeDecodeError traceback; a CSV cell's space before the path made it 'missing'."""
    folder = tmp_path / "lat"
    folder.mkdir()
    latin = os.fsdecode(b"caf\xe9.flac")  # a name in Latin-1 bytes
    shutil.copy(EXAMPLES / "dog.flac", folder / latin)
    shutil.copy(EXAMPLES / "rain.flac", folder / "rain.flac")
    (tmp_path / "find.txt").write_bytes(b"lat/caf\xe9.flac\nlat/rain.flac\n")
    (tmp_path / "excel.csv").write_text("label,path\ndog, lat/rain.flac\n", encoding="utf-16")
    (tmp_path / "cp1252.csv").write_bytes("path\nlat/café.flac\n".encode("cp1252"))  # UTF-8 names on disk: missing
    for manifest, tagged in (("find.txt", 2), ("excel.csv", 1)):
        r = run_cli("tag", tmp_path / manifest, "--out", tmp_path / manifest.replace(".", "_"), "--model", cnn_dir)
        assert r.returncode == 0 and f"tagged {tagged} file" in r.stderr, r.stderr
    (tmp_path / "lat" / latin).rename(tmp_path / "lat" / "café.flac")
    (tmp_path / "lat" / "rain.flac").unlink()
    r = run_cli("tag", tmp_path / "cp1252.csv", "--out", tmp_path / "o", "--model", cnn_dir)
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    assert "but missing (the manifest is not UTF-8 text: save it as UTF-8)" in r.stderr, r.stderr


def test_a_link_pointed_at_another_recording_is_tagged_again_not_refused(tmp_path, cnn_dir):
    """A 'latest.flac' link re-pointed between runs refused the whole run as results 'of another file'."""
    folder = tmp_path / "rec"
    folder.mkdir()
    (folder / "latest.flac").symlink_to(EXAMPLES / "rain.flac")
    out = tmp_path / "out"
    assert run_cli("tag", folder, "--out", out, "--model", cnn_dir).returncode == 0
    (folder / "latest.flac").unlink()
    (folder / "latest.flac").symlink_to(EXAMPLES / "dog.flac")
    r = run_cli("tag", folder, "--out", out, "--model", cnn_dir)
    assert r.returncode == 0 and "tagged 1 file" in r.stderr, r.stderr
    marker = json.loads((out / "rec" / "latest.flac.done.json").read_text())
    assert marker["file"]["path"] == str(EXAMPLES.resolve() / "dog.flac")  # the outputs are the new recording's


def test_ray_writes_exactly_what_a_local_tag_writes(archive, tmp_path, cnn_dir):
    pytest.importorskip("ray", reason="Ray is an optional extra (pip install '.[ray]')")
    local, on_ray = tmp_path / "local", tmp_path / "ray"
    args = ["--model", cnn_dir, "--scores", "--on-threshold", "0.3"]
    assert run_cli("tag", archive, "--out", local, "--jobs", "1", *args).returncode == 1  # the broken file
    jobs = (os.cpu_count() or 1) + 2  # actors beyond the CPUs never started, and the run waited on them for ever
    r = run_cli("tag", archive, "--out", on_ray, "--ray", "auto", "--jobs", jobs, *args, timeout=300)
    assert r.returncode == 1 and "1 failed" in r.stderr, r.stderr
    assert re.search(rf"--jobs {jobs} is more than the \d+ CPU\(s\) the Ray cluster has", r.stderr), r.stderr
    assert _rows(on_ray / "summary.csv") == _rows(local / "summary.csv")
    assert _rows(on_ray / "errors.csv") == _rows(local / "errors.csv")
    for f in local.rglob("*.events.jsonl"):
        assert _events(on_ray / f.relative_to(local)) == _events(f)
    for f in local.rglob("*.scores.tsv"):
        np.testing.assert_allclose(
            np.loadtxt(on_ray / f.relative_to(local), skiprows=1), np.loadtxt(f, skiprows=1), atol=1e-5
        )


def test_a_ray_rerun_of_a_finished_archive_starts_no_ray(archive, tmp_path, cnn_dir):
    """Every file done by an earlier run: --ray started Ray (seconds, and a cluster's logs) only to skip them all.
    Now the done files are set aside first, so an address where nothing answers is never asked."""
    (archive / "garden" / "broken.wav").unlink()
    out = tmp_path / "out"
    assert run_cli("tag", archive, "--out", out, "--model", cnn_dir, "--jobs", "1").returncode == 0
    before = _rows(out / "summary.csv")
    r = run_cli("tag", archive, "--out", out, "--model", cnn_dir, "--ray", "127.0.0.1:1", timeout=60)
    assert r.returncode == 0 and "3 already done, 0 failed" in r.stderr, r.stderr
    assert _rows(out / "summary.csv") == before
    pytest.importorskip("ray", reason="Ray is an optional extra (pip install '.[ray]')")
    (archive / "dog.flac").touch()  # a changed file is tagged again: that one asks Ray
    r = run_cli("tag", archive, "--out", out, "--model", cnn_dir, "--ray", "127.0.0.1:1", timeout=60)
    assert r.returncode == 2 and "nothing answers at 127.0.0.1:1" in r.stderr, r.stderr


class _Task:  # what a fake remote call returns (Ray's object refs are hashable)
    def __init__(self, value):
        self.value = value


class _FakeRay:
    """Ray's calls as tag_on_ray makes them, run in this process; the actor of a batch named in ``dies`` dies on it
    (each time, or once), and one named in ``fails`` raises, as a disk full would."""

    class exceptions:
        class RayError(Exception):
            pass

        class RayActorError(RayError):
            pass

        class RaySystemError(RayError):
            pass

    def __init__(self, dies, fails, once, cpus: int = 2):
        self.dies, self.fails, self.once, self.actors, self.cpus = dies, fails, once, 0, cpus

    def available_resources(self):
        return {"CPU": self.cpus}

    def cluster_resources(self):
        return {"CPU": self.cpus}

    def remote(self, num_cpus):
        fake = self

        class Actor:
            def __init__(self, kwargs):
                fake.actors += 1

            @classmethod
            def remote(cls, kwargs):
                actor = cls(kwargs)
                actor.run = type("Method", (), {"remote": staticmethod(actor._run)})
                return actor

            def _run(self, batch):
                from streamtag.archive import Outcome

                names = {item.name for item in batch}
                if names & fake.dies:
                    if fake.once:
                        fake.dies -= names
                    return _Task(fake.exceptions.RayActorError("The actor died unexpectedly"))
                if names & fake.fails:
                    return _Task(fake.exceptions.RayError("OSError: No space left on device"))
                return _Task([Outcome(item.name, str(item.path), seconds=1.0) for item in batch])

        return lambda cls: Actor

    def wait(self, tasks, num_returns):
        return tasks[:1], tasks[1:]

    def get(self, task):
        if isinstance(task.value, Exception):
            raise task.value
        return task.value

    def shutdown(self):
        pass


@pytest.mark.parametrize("once", [True, False])
def test_a_ray_actor_that_dies_or_a_task_that_fails_fails_its_own_files_only(tmp_path, monkeypatch, once):
    """One actor killed (out of memory) aborted the whole run with a traceback, no summary, and threw the
    other actors' work away; now its batch goes once more to a new actor, and only a second death fails it."""
    from streamtag import distributed
    from streamtag.archive import Item

    items = [Item(tmp_path / f"f{i}.wav", f"f{i}.wav") for i in range(6)]
    fake = _FakeRay(dies={"f0.wav"}, fails={"f5.wav"}, once=once)
    monkeypatch.setattr(distributed, "_start_ray", lambda address: fake)
    outcomes = distributed.tag_on_ray(items, "auto", 2, width=1, out=tmp_path)
    by_name = {o.name: o for o in outcomes}
    assert sorted(by_name) == [item.name for item in items]  # every file has its outcome
    assert [n for n, o in sorted(by_name.items()) if o.error] == (["f5.wav"] if once else ["f0.wav", "f5.wav"])
    assert "No space left" in by_name["f5.wav"].error
    if not once:
        assert "died twice" in by_name["f0.wav"].error
    assert fake.actors == 2 + (1 if once else 2)  # a new actor for each death


class _ClusterElsewhere(_FakeRay):
    """A :class:`_FakeRay` whose actors are the real ones, each batch run from ``cwd`` (a cluster's own working
    folder); after ``lost_after`` batches the next wait fails as Ray Client's does when the cluster goes."""

    def __init__(self, cwd: Path, lost_after: int | None = None):
        super().__init__(dies=set(), fails=set(), once=True, cpus=1)
        self.cwd, self.lost_after, self.ran = cwd, lost_after, 0

    def remote(self, num_cpus):
        import types

        fake = self

        def wrap(cls):
            def make(kwargs):
                actor = cls(kwargs)

                def run_elsewhere(batch):
                    here = os.getcwd()
                    os.chdir(fake.cwd)
                    try:
                        fake.ran += 1
                        return _Task(actor.run(batch))
                    finally:
                        os.chdir(here)

                return types.SimpleNamespace(run=types.SimpleNamespace(remote=run_elsewhere))

            return types.SimpleNamespace(remote=make)

        return wrap

    def wait(self, tasks, num_returns):
        if self.lost_after is not None and self.ran > self.lost_after:
            raise ConnectionError("[Errno None] None: '/tmp/out'")
        return super().wait(tasks, num_returns)


def test_ray_actors_get_absolute_paths_so_a_cluster_elsewhere_finds_files_and_out(
    archive, tmp_path, cnn_dir, monkeypatch
):
    """An actor works in the cluster's folder, not the caller's: relative inputs failed ("given but missing") and
    a relative --out put every output under the cluster's folder while the run said "tagged"."""
    from streamtag import distributed
    from streamtag.archive import find_inputs
    from streamtag.cli.run import detector_factory

    elsewhere = tmp_path / "cluster_cwd"
    elsewhere.mkdir()
    monkeypatch.setattr(distributed, "_start_ray", lambda address: _ClusterElsewhere(elsewhere))
    monkeypatch.chdir(tmp_path)
    items = [i for i in find_inputs([archive.name]) if not i.name.endswith("broken.wav")]  # relative paths
    kwargs = dict(out=Path("out"), model=str(cnn_dir), backend="onnx", width=4, scores=False)
    outcomes = distributed.tag_on_ray(items, "auto", **kwargs, detector=detector_factory(str(cnn_dir)), force=False)
    assert [o.error for o in outcomes] == [None] * len(items)
    assert sorted(o.path for o in outcomes) == sorted(str(i.path) for i in items)  # as given, as a local run
    assert len(list((tmp_path / "out").rglob("*.events.jsonl"))) == len(items)
    assert not list(elsewhere.rglob("*"))


def test_a_ray_cluster_lost_mid_run_keeps_what_finished_and_says_so(archive, tmp_path, cnn_dir, monkeypatch, capsys):
    """The cluster gone mid-run (ray:// link lost) ended tag with a traceback, no summary and .part files left."""
    from streamtag import distributed
    from streamtag.cli import main

    (archive / "garden" / "broken.wav").unlink()
    monkeypatch.setattr(distributed, "_start_ray", lambda address: _ClusterElsewhere(tmp_path, lost_after=1))
    out = tmp_path / "out"
    args = ["tag", str(archive), "--out", str(out), "--model", str(cnn_dir), "--ray", "ray://127.0.0.1:10001"]
    assert main([*args, "--width", "1", "--jobs", "1"]) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err and "streamtag tag: error: the Ray cluster was lost (ConnectionError" in err
    # the second batch ended before the link went: its marker says so
    assert "1 of 3 files not finished" in err and "run the same command again" in err, err
    assert len(_rows(out / "summary.csv")) == 2 and not list(out.rglob("*.part"))
    monkeypatch.setattr(distributed, "_start_ray", lambda address: _ClusterElsewhere(tmp_path))
    assert main([*args, "--jobs", "1"]) == 0
    assert "tagged 1 file" in capsys.readouterr().err and len(_rows(out / "summary.csv")) == 3


def test_a_ray_address_where_nothing_answers_is_one_line_at_once(tmp_path):
    pytest.importorskip("ray", reason="Ray is an optional extra (pip install '.[ray]')")
    for address in ("127.0.0.1:1", "ray://127.0.0.1:1"):  # HOST:PORT hung for minutes in Ray's own retries
        r = run_cli("tag", EXAMPLES / "dog.flac", "--out", tmp_path / "out", "--ray", address, timeout=60)
        assert r.returncode == 2 and f"--ray {address}: nothing answers at 127.0.0.1:1" in r.stderr, r.stderr
        assert "Traceback" not in r.stderr
    # something that answers but is not Ray (hung the same way, with Ray's logs), auto sent elsewhere by
    # RAY_ADDRESS (the same), a port out of range (said as the default port), an empty address (ran locally)
    import http.server
    import threading

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), http.server.SimpleHTTPRequestHandler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    web = f"127.0.0.1:{httpd.server_address[1]}"
    try:
        for ray, env, said in (
            (web, {}, f"--ray {web}: what answers at {web} is not Ray"),
            ("auto", {"RAY_ADDRESS": "127.0.0.1:1"}, "--ray auto: RAY_ADDRESS=127.0.0.1:1: nothing answers"),
            ("127.0.0.1:99999", {}, "the port must be a number in 1..65535"),
            ("", {}, "argument --ray: needs an address"),
        ):
            cmd = ("tag", EXAMPLES / "dog.flac", "--out", tmp_path / "out", f"--ray={ray}")
            r = run_cli(*cmd, env={**os.environ, **env}, timeout=60)
            assert r.returncode == 2 and said in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    finally:
        httpd.shutdown()
    r = run_cli("tag", "-", "--out", tmp_path / "piped", "--ray", "auto", input="")  # said before stdin is read
    assert r.returncode == 2 and "stdin (-) is tagged locally, without --ray" in r.stderr, r.stderr
    assert not (tmp_path / "piped").exists()  # and before --out is made


def test_a_rerun_tags_again_what_no_longer_matches_its_outputs(tmp_path, cnn_dir):
    """A done file is skipped only for the same file and settings: --scores added, another threshold, or
    another file under the same output name are tagged again, not answered with stale outputs."""
    (tmp_path / "day1").mkdir()
    (tmp_path / "day2" / "day1").mkdir(parents=True)
    shutil.copy(EXAMPLES / "dog.flac", tmp_path / "day1" / "a.flac")
    shutil.copy(EXAMPLES / "rain.flac", tmp_path / "day2" / "day1" / "a.flac")  # a recorder reusing names
    out = tmp_path / "out"
    tag = ["tag", "--out", out, "--model", cnn_dir, "--jobs", "1"]
    assert run_cli(*tag, tmp_path / "day1").returncode == 0
    r = run_cli(*tag, tmp_path / "day1")
    assert "0 files" in r.stderr and "1 already done" in r.stderr
    r = run_cli(*tag, tmp_path / "day1", "--scores")
    assert r.returncode == 0 and "tagged 1 file " in r.stderr and (out / "day1" / "a.flac.scores.tsv").is_file()
    (out / "day1" / "a.flac.scores.tsv").unlink()  # an output deleted by hand: made again, not "already done"
    r = run_cli(*tag, tmp_path / "day1", "--scores")
    assert r.returncode == 0 and "tagged 1 file " in r.stderr and (out / "day1" / "a.flac.scores.tsv").is_file()
    assert "outputs since deleted" in r.stderr
    r = run_cli(*tag, tmp_path / "day1", "--scores", "--on-threshold", "0.2")
    assert r.returncode == 0 and "tagged 1 file " in r.stderr
    r = run_cli(*tag, tmp_path / "day2" / "day1", "--scores", "--on-threshold", "0.2")  # another file, same name
    assert r.returncode == 2 and "already holds the results named 'day1/a.flac' of another file" in r.stderr
    assert "--force" in r.stderr and _rows(out / "summary.csv")[0]["path"] == str(tmp_path / "day1" / "a.flac")
    r = run_cli(*tag, tmp_path / "day2" / "day1", "--scores", "--on-threshold", "0.2", "--force")
    assert r.returncode == 0 and "tagged 1 file " in r.stderr
    (row,) = _rows(out / "summary.csv")
    assert row["path"] == str(tmp_path / "day2" / "day1" / "a.flac")
    r = run_cli(*tag, tmp_path / "day2" / "day1", "--on-threshold", "0.2")
    assert "1 of the files tagged had been finished before" in r.stderr  # said, not silently hours of work
    marker = out / "day1" / "a.flac.done.json"  # a marker of an older streamtag names no settings
    old = {k: v for k, v in json.loads(marker.read_text()).items() if k not in ("settings", "file")}
    marker.write_text(json.dumps(old))
    r = run_cli(*tag, tmp_path / "day2" / "day1", "--scores", "--on-threshold", "0.2")
    assert "tagged 1 file " in r.stderr and "by an older streamtag" in r.stderr
    (tmp_path / "other").mkdir()
    shutil.copy(EXAMPLES / "chainsaw.flac", tmp_path / "other" / "b.flac")
    assert run_cli(*tag, tmp_path / "other").returncode == 0
    assert [row["name"] for row in _rows(out / "summary.csv")] == ["day1/a.flac", "other/b.flac"]  # the archive's


def test_duplicates_truncation_nan_and_other_extensions_are_reported(tmp_path, cnn_dir):
    folder = tmp_path / "in"
    folder.mkdir()
    audio = read_clip(EXAMPLES / "dog.flac")
    sf.write(folder / "whole.wav", audio, 16000)
    cut = io.BytesIO()
    sf.write(cut, audio, 16000, format="WAV", subtype="PCM_16")
    (folder / "cut.wav").write_bytes(cut.getvalue()[:60000])  # the header says 5 s, 1.9 s follow
    spoiled = audio.copy()
    spoiled[1000:1101] = np.nan
    sf.write(folder / "nan.wav", spoiled, 16000, subtype="FLOAT")
    sf.write(folder / "notes.rf64", audio, 16000, format="RF64")
    sf.write(folder / "take.bak", audio, 16000, format="WAV")  # an extension the folder search leaves out
    (folder / "readme.txt").write_text("not audio")
    out = tmp_path / "out"
    r = run_cli("tag", folder, folder / "whole.wav", "--out", out, "--model", cnn_dir, "--jobs", "1")
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    assert "tagged 3 files" in r.stderr and "1 failed" in r.stderr  # whole.wav given twice is tagged once
    assert "cut.wav is truncated" in r.stderr and "nan.wav: 101 NaN/Inf samples were replaced by 0" in r.stderr
    assert "2 files of the folders given were not tagged" in r.stderr and ".bak, .txt" in r.stderr
    assert (out / "in" / "cut.wav.events.jsonl").is_file()  # what could be read was tagged and kept ...
    assert not (out / "in" / "cut.wav.done.json").exists()  # ... but the file is not done
    summary = {row["name"]: row for row in _rows(out / "summary.csv")}
    assert sorted(summary) == ["in/nan.wav", "in/notes.rf64", "in/whole.wav"]
    assert "NaN" in summary["in/nan.wav"]["warning"] and not summary["in/whole.wav"]["warning"]
    for path in out.rglob("*.events.jsonl"):  # replay's rows (schema and time): where the model heard events
        for row in map(json.loads, path.read_text().splitlines()):
            assert row["schema"] == 1 and "time" in row and row["source"].endswith(path.name[: -len(".events.jsonl")])
    r = run_cli("tag", folder / "take.bak", "--out", out, "--model", cnn_dir)  # given by name, it is tagged
    assert r.returncode == 0 and "tagged 1 file " in r.stderr, r.stderr


def test_an_output_folder_that_cannot_be_written_is_refused_before_any_work(tmp_path, cnn_dir):
    for out, why in ((tmp_path / "x.wav" / "sub", "not a folder"), ("/proc/streamtag_out", "cannot write")):
        (tmp_path / "x.wav").write_bytes(b"")
        r = run_cli("tag", EXAMPLES / "dog.flac", "--out", out, "--model", cnn_dir)
        assert r.returncode == 2 and why in r.stderr and "Traceback" not in r.stderr, r.stderr


@pytest.fixture()
def long_archive(tmp_path):
    """Twelve 3-minute files: a run of seconds, long enough to stop in the middle on a loaded machine (60 s files
    left under a second between the first finished file and the end)."""
    folder = tmp_path / "long"
    folder.mkdir()
    audio = np.tile(read_clip(EXAMPLES / "dog.flac"), 36)
    for i in range(12):
        sf.write(folder / f"f{i:02d}.wav", audio, 16000)
    return folder


def _wait_for_a_finished_file(proc, out, limit_s=120):
    deadline = time.monotonic() + limit_s
    while proc.poll() is None and time.monotonic() < deadline and not list(out.rglob("*.done.json")):
        time.sleep(0.05)
    assert proc.poll() is None, "the run ended before it could be stopped"


def test_ctrl_c_stops_cleanly_and_the_same_command_resumes(long_archive, tmp_path, cnn_dir):
    """Ctrl-C (exit 130), then SIGTERM (exit 0) to the whole process group: each run keeps what finished and
    leaves nothing half-written, and the same command tags the rest."""
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "streamtag", "tag", str(long_archive), "--out", str(out), "--model", str(cnn_dir)]
    cmd += ["--jobs", "2", "--width", "2"]
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True, start_new_session=True)
    _wait_for_a_finished_file(proc, out)
    os.killpg(proc.pid, signal.SIGINT)  # what a terminal's Ctrl-C does: the whole process group
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130 and "interrupted" in err and "run the same command again" in err, err
    assert "Traceback" not in err and "KeyboardInterrupt" not in err
    assert not list(out.rglob("*.part"))  # nothing half-written left
    done = len(list(out.rglob("*.done.json")))
    assert 1 <= done < 12 and len(_rows(out / "summary.csv")) == done
    r = run_cli("tag", long_archive, "--out", out, "--model", cnn_dir, "--jobs", "2", timeout=300)
    assert r.returncode == 0 and f"{done} already done" in r.stderr and f"tagged {12 - done} files" in r.stderr
    # again with --scores: every marker is stale now; the count said at a Ctrl-C is what the next run tags
    proc = subprocess.Popen([*cmd, "--scores"], stderr=subprocess.PIPE, text=True, start_new_session=True)
    deadline = time.monotonic() + 120
    while proc.poll() is None and time.monotonic() < deadline and not list(out.rglob("*.scores.tsv")):
        time.sleep(0.05)
    assert proc.poll() is None, "the run ended before it could be stopped"
    os.killpg(proc.pid, signal.SIGTERM)  # this time as systemd stops a service: SIGTERM to all its processes
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0 and "Traceback" not in err, err  # a clean stop asked for: 0, as replay's and serve's
    left = int(re.search(r"interrupted; (\d+) of 12 files not finished", err).group(1))
    r = run_cli("tag", long_archive, "--out", out, "--model", cnn_dir, "--jobs", "2", "--scores", timeout=300)
    assert r.returncode == 0 and f"tagged {left} files" in r.stderr, (err, r.stderr)


@pytest.mark.parametrize("how", ["SIGTERM to tag", "Ctrl-C at a terminal"])
def test_a_stop_ends_a_ray_run_cleanly_and_counts_what_its_actors_finished(long_archive, tmp_path, cnn_dir, how):
    """Ray put its own SIGTERM handler in place of tag's (exit 1 and a crash dump), and the files its actors had
    finished in a batch not yet reported were counted as not finished. A Ctrl-C reaches the whole process group,
    Ray's actors too: their files were counted as failed and the summary line did not add up."""
    pytest.importorskip("ray", reason="Ray is an optional extra (pip install '.[ray]')")
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "streamtag", "tag", str(long_archive), "--out", str(out), "--model", str(cnn_dir)]
    cmd += ["--ray", "auto", "--jobs", "2", "--width", "2"]
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True, start_new_session=True)
    _wait_for_a_finished_file(proc, out, limit_s=240)
    if how == "SIGTERM to tag":
        proc.send_signal(signal.SIGTERM)
    else:
        os.killpg(proc.pid, signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == (0 if how == "SIGTERM to tag" else 130), err
    assert "interrupted" in err and "SIGTERM received" not in err, err
    done = len(list(out.rglob("*.done.json")))
    assert f"interrupted; {12 - done} of 12 files not finished" in err, err
    assert re.search(rf"tagged {done} files? .* 0 already done, 0 failed", err), err
    assert len(_rows(out / "summary.csv")) == done and not (out / "errors.csv").read_text().strip().count("\n")
    assert not list(out.rglob("*.part"))


def test_a_sigterm_while_the_worker_processes_start_is_still_a_sigterm(archive, tmp_path, cnn_dir, monkeypatch):
    """Signals are held while tag's processes start, then raised: a held SIGTERM came back as a Ctrl-C (exit 130
    where a SIGTERM stops tag with 0)."""
    import multiprocessing.context

    from streamtag.cli import main

    real_start = multiprocessing.context.SpawnProcess.start

    def start_under_a_sigterm(self):
        os.kill(os.getpid(), signal.SIGTERM)  # held until every process has started
        real_start(self)

    monkeypatch.setattr(multiprocessing.context.SpawnProcess, "start", start_under_a_sigterm)
    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        code = main(["tag", str(archive), "--out", str(tmp_path / "out"), "--model", str(cnn_dir), "--jobs", "2"])
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)
    assert code == 0


def test_a_worker_process_killed_mid_run_fails_its_files_and_the_rest_finish(long_archive, tmp_path, cnn_dir):
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "streamtag", "tag", str(long_archive), "--out", str(out), "--model", str(cnn_dir)]
    proc = subprocess.Popen([*cmd, "--jobs", "2", "--width", "2"], stderr=subprocess.PIPE, text=True)
    _wait_for_a_finished_file(proc, out)
    children = Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()
    workers = [c for c in children if b"spawn_main" in Path(f"/proc/{c}/cmdline").read_bytes()]
    os.kill(int(workers[0]), signal.SIGKILL)  # as the out-of-memory killer would
    _, err = proc.communicate(timeout=300)  # before the fix: waited for ever
    assert proc.returncode == 1 and "worker process ended (exit code -9)" in err, err
    failed = _rows(out / "errors.csv")
    assert failed and len(failed) + len(_rows(out / "summary.csv")) == 12


def test_ctrl_c_at_any_moment_of_a_rerun_over_many_finished_files_ends_cleanly(tmp_path):
    """Thousands of finished files: the workers report them faster than the parent reads. A Ctrl-C while
    they start, or while their reports fill the queue, ends the run (no hang, no traceback)."""
    from streamtag.archive import _identity, done_marker, find_inputs, settings_key
    from streamtag.cli.run import detector_factory
    from streamtag.modelfile import load_config, resolve_model_dir

    folder, out = tmp_path / "many", tmp_path / "out"
    folder.mkdir()
    tiny = np.zeros(1600, np.float32)
    for i in range(4000):
        sf.write(folder / f"f{i:04d}.wav", tiny, 16000)
    model = resolve_model_dir(None)
    cfg = load_config(model)
    key = settings_key(model, cfg.labels, cfg.features.frame_seconds, False, detector_factory(None))
    for item in find_inputs([folder]):  # finished with the same settings: a rerun only reports them
        marker = done_marker(out, item)
        marker.parent.mkdir(parents=True, exist_ok=True)
        row = {"name": item.name, "path": str(item.path), "seconds": 0.1, "events": {}, "error": None}
        marker.write_text(json.dumps({**row, "settings": key, "file": _identity(item)}))
        for output in (".events.jsonl", ".labels.txt"):  # a marker stands for its outputs only while they exist
            (out / (item.name + output)).write_text("")
    cmd = [sys.executable, "-m", "streamtag", "tag", str(folder), "--out", str(out), "--jobs", "2"]
    for delay in (0.6, 1.0, 1.4):
        proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True)
        time.sleep(delay)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=120)  # before the fix: a hang, or a worker's traceback
        assert proc.returncode in (0, 130) and "Traceback" not in err, err
        if proc.returncode == 130 and "tagged" in err:  # every file was finished before: none is left (it said "0 of
            assert "interrupted after all 4000 files had finished; nothing is left" in err, err  # 4000 ... run again")
        elif proc.returncode == 130:  # stopped while it was still finding the files: that is all it says
            assert err.strip() == "streamtag tag: interrupted", err
        assert not list(out.rglob("*.part"))


def test_a_torch_backend_in_tag_uses_one_thread_a_process(tmp_path, monkeypatch, cnn_dir):
    """tag --jobs N runs N processes: torch in each started a thread per core (N x cores threads on N cores)."""
    import streamtag.backends as backends
    from streamtag.archive import find_inputs, tag_archive

    asked = []
    real = backends.make_backend

    def recording(name, model=None, batch_size=1, **options):
        asked.append((name, options))
        return real("onnx", model, batch_size=batch_size)  # the run itself needs no torch

    monkeypatch.setattr(backends, "make_backend", recording)
    monkeypatch.setattr("streamtag.multistream.make_backend", recording)
    items = find_inputs([EXAMPLES / "dog.flac"])
    tag_archive(items, out=tmp_path / "one", model=cnn_dir, backend="torch")  # one file: the chunk step
    tag_archive(find_inputs([EXAMPLES]), out=tmp_path / "many", model=cnn_dir, backend="torch", width=2)
    assert asked == [("torch", {"threads": 1})] * 2


def test_a_retag_leaves_no_output_of_the_earlier_tagging(tmp_path, cnn_dir):
    """Tagged with --scores, then the file changed and tagged again without: the old scores.tsv stayed, the
    dog's scores beside the rain's labels."""
    (tmp_path / "ch").mkdir()
    f = tmp_path / "ch" / "f.wav"
    sf.write(f, read_clip(EXAMPLES / "dog.flac"), 16000)
    out = tmp_path / "out"
    assert run_cli("tag", tmp_path / "ch", "--out", out, "--model", cnn_dir, "--scores").returncode == 0
    assert (out / "ch" / "f.wav.scores.tsv").is_file()
    sf.write(f, read_clip(EXAMPLES / "rain.flac")[:40000], 16000)
    r = run_cli("tag", tmp_path / "ch", "--out", out, "--model", cnn_dir)
    assert r.returncode == 0 and "tagged again" in r.stderr, r.stderr
    assert sorted(p.name for p in (out / "ch").iterdir()) == [
        "f.wav.done.json",
        "f.wav.events.jsonl",
        "f.wav.labels.txt",
    ]


def test_a_summary_parquet_is_kept_up_to_date_by_runs_without_parquet(tmp_path, cnn_dir):
    pq = pytest.importorskip("pyarrow.parquet")
    out = tmp_path / "out"
    assert run_cli("tag", EXAMPLES / "dog.flac", "--out", out, "--model", cnn_dir, "--parquet").returncode == 0
    assert run_cli("tag", EXAMPLES / "rain.flac", "--out", out, "--model", cnn_dir).returncode == 0
    table = pq.read_table(out / "summary.parquet")
    assert table.column("name").to_pylist() == ["dog.flac", "rain.flac"]
    assert table.column("warning").to_pylist() == [None, None]  # empty, as the CSV's cell reads: not ''


def test_a_stopped_rerun_keeps_the_finished_results_it_did_not_redo(tmp_path, cnn_dir):
    """--force (or new settings) removed every done marker up front: a stop midway left the old outputs
    without markers, summary.csv empty, and the next plain run tagged everything again."""
    from streamtag.archive import find_inputs, tag_archive, write_tables

    folder, out = tmp_path / "in", tmp_path / "out"
    folder.mkdir()
    sf.write(folder / "a.wav", read_clip(EXAMPLES / "dog.flac")[:16000], 16000)  # ends first
    sf.write(folder / "b.wav", np.tile(read_clip(EXAMPLES / "rain.flac"), 2), 16000)
    items = find_inputs([folder])
    tag_archive(items, out, model=cnn_dir, width=2)
    markers = {m.name: m.read_bytes() for m in (out / "in").glob("*.done.json")}

    def stop(outcome):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):  # stopped as a.wav is done again, b.wav still in flight
        tag_archive(items, out, model=cnn_dir, width=2, force=True, progress=stop)
    assert (out / "in" / "b.wav.done.json").read_bytes() == markers["b.wav.done.json"]
    assert not list(out.rglob("*.part"))
    write_tables([], out)
    assert [row["name"] for row in _rows(out / "summary.csv")] == ["in/a.wav", "in/b.wav"]
    assert all(o.skipped for o in tag_archive(items, out, model=cnn_dir, width=2))  # a plain rerun redoes none


def test_clipped_nan_and_silent_input_is_a_warning(tmp_path, cnn_dir):
    folder = tmp_path / "in"
    folder.mkdir()
    sf.write(folder / "zeros.wav", np.zeros(32000, np.float32), 16000)
    sf.write(folder / "loud.wav", read_clip(EXAMPLES / "dog.flac") * 4, 16000, subtype="FLOAT")
    sf.write(folder / "fine.wav", read_clip(EXAMPLES / "dog.flac"), 16000)
    import soxr

    dog48 = soxr.resample(read_clip(EXAMPLES / "dog.flac"), 16000, 48000)
    sf.write(folder / "full48.wav", dog48 / np.abs(dog48).max(), 48000, subtype="PCM_16")  # peaks at 0 dBFS
    sf.write(folder / "loud48.wav", dog48 * 4, 48000, subtype="FLOAT")
    out = tmp_path / "out"
    r = run_cli("tag", folder, "--out", out, "--model", cnn_dir)
    assert r.returncode == 0, r.stderr
    warning = {row["name"]: row["warning"] for row in _rows(out / "summary.csv")}
    assert "digital silence" in warning["in/zeros.wav"] and "beyond full scale" in warning["in/loud.wav"]
    assert "beyond full scale" in warning["in/loud48.wav"]  # resampled: still said
    assert warning["in/full48.wav"] == ""  # within full scale: its resampling's overshoot is not the input's
    assert warning["in/fine.wav"] == "" and "zeros.wav: digital silence" in r.stderr


def test_folder_search_skips_hidden_entries_links_to_folders_and_the_output_folder(tmp_path):
    from streamtag.archive import find_inputs

    root = tmp_path / "rec"
    (root / ".git").mkdir(parents=True)
    (root / "sub").mkdir()
    for f in ("a.wav", "._a.wav", ".hidden.wav", ".git/x.wav", "sub/b.wav"):
        (root / f).write_bytes(b"x")
    (root / "up").symlink_to(root)  # a loop
    (root / "gone.wav").symlink_to(tmp_path / "nowhere.wav")
    (root / "tags").mkdir()  # --out inside the folder tagged
    (root / "tags" / "c.wav").write_bytes(b"x")
    passed: list = []
    items = find_inputs([root], passed, out=root / "tags")
    assert [i.name for i in items] == ["rec/a.wav", "rec/sub/b.wav"]
    assert sorted(p.name for p in passed) == ["gone.wav", "up"]
    assert [i.name for i in find_inputs([root / "._a.wav"])] == ["._a.wav"]  # given by name, it is tagged


def test_a_folder_that_cannot_be_listed_is_one_line_not_skipped(tmp_path, monkeypatch):
    """os.walk passes over a folder it cannot list unless asked: its files were silently left out of the run."""
    from streamtag.archive import find_inputs
    from streamtag.errors import ConfigError

    root = tmp_path / "rec"
    (root / "locked").mkdir(parents=True)
    (root / "a.wav").write_bytes(b"x")
    (root / "locked" / "b.wav").write_bytes(b"x")
    scandir = os.scandir

    def denied(path="."):  # what a folder of mode 000 gives a user who is not root
        if Path(path) == root / "locked":
            raise PermissionError(13, "Permission denied", str(path))
        return scandir(path)

    monkeypatch.setattr(os, "scandir", denied)
    with pytest.raises(ConfigError, match=r"locked: cannot read this folder \(Permission denied\)"):
        find_inputs([root], [])


@pytest.mark.skipif(sys.platform == "darwin", reason="macOS file systems refuse names that are not UTF-8")
def test_a_file_name_that_is_not_utf8_is_tagged_and_listed(tmp_path, cnn_dir):
    """A legacy Latin-1 name (b"caf\xe9.flac"): it crashed the summary with a traceback, on every rerun."""
    folder = tmp_path / "in"
    folder.mkdir()
    shutil.copy(EXAMPLES / "dog.flac", folder / "dog.flac")
    latin = os.fsdecode(bytes(folder) + b"/caf\xe9.flac")
    shutil.copy(EXAMPLES / "rain.flac", latin)
    tag = ["tag", folder, "--out", tmp_path / "out", "--model", cnn_dir, "--jobs", "1", "--parquet"]
    r = run_cli(*tag)
    assert r.returncode == 0 and "tagged 2 files " in r.stderr and "Traceback" not in r.stderr, r.stderr
    names = [row["name"] for row in _rows(tmp_path / "out" / "summary.csv")]  # read as UTF-8
    assert names == ["in/caf\\udce9.flac", "in/dog.flac"]
    # its events too: a lone surrogate in the JSON (\udce9 as an escape) broke strict readers (DuckDB, Arrow)
    events = os.fsencode(tmp_path / "out" / "in") + b"/caf\xe9.flac.events.jsonl"
    for line in open(events, encoding="utf-8").read().splitlines():
        json.loads(line)["source"].encode("utf-8")  # raises on a lone surrogate
        assert "caf\\\\udce9.flac" in line  # the name as the tables write it
    r = run_cli(*tag)
    assert r.returncode == 0 and "2 already done" in r.stderr, r.stderr


def test_a_file_that_cannot_be_opened_says_permission_denied(tmp_path, monkeypatch):
    import streamtag.sources.file as file_source

    path = tmp_path / "x.flac"
    shutil.copy(EXAMPLES / "dog.flac", path)

    def denied(*args, **kwargs):  # what a file of mode 000 gives a user who is not root
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(file_source.sf, "info", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("System error.")))
    monkeypatch.setattr(file_source, "open", denied, raising=False)
    with pytest.raises(file_source.AudioFileError, match="x.flac: permission denied"):
        file_source.probe_audio(path)


@pytest.mark.skipif(sys.platform == "win32", reason="no advisory locks on Windows")
def test_two_runs_into_one_output_folder_at_once_are_refused(tmp_path, cnn_dir):
    """The second run renamed the first one's half-written outputs away and died with a traceback."""
    from streamtag.archive import lock_out

    out = tmp_path / "out"
    out.mkdir()
    held = lock_out(out)  # as a run in progress holds it
    r = run_cli("tag", EXAMPLES / "dog.flac", "--out", out, "--model", cnn_dir, "--jobs", "1")
    assert r.returncode == 2 and f"is in use by another streamtag tag run (pid {os.getpid()})" in r.stderr, r.stderr
    assert not (out / "summary.csv").exists()
    held.close()  # the run ended
    assert run_cli("tag", EXAMPLES / "dog.flac", "--out", out, "--model", cnn_dir, "--jobs", "1").returncode == 0


def test_a_named_pipe_in_a_folder_is_said_as_such(tmp_path, cnn_dir):
    folder = tmp_path / "in"
    folder.mkdir()
    shutil.copy(EXAMPLES / "dog.flac", folder / "dog.flac")
    os.mkfifo(folder / "pipe.wav")  # an audio name, not a file to read to its end
    r = run_cli("tag", folder, "--out", tmp_path / "out", "--model", cnn_dir, "--jobs", "1")
    assert r.returncode == 0 and "tagged 1 file " in r.stderr, r.stderr
    assert "1 entry in the folders given is not a regular file" in r.stderr and "for their extension" not in r.stderr


def test_a_manifest_from_excel_is_read(tmp_path):
    from streamtag.archive import find_inputs

    (tmp_path / "a.wav").write_bytes(b"x")
    manifest = tmp_path / "list.csv"
    manifest.write_bytes("\ufeffPath,note\r\na.wav,first\r\n".encode())  # a byte-order mark and a capital
    assert [i.path for i in find_inputs([manifest])] == [tmp_path / "a.wav"]


def test_bad_tag_invocations_are_one_line_before_any_work(tmp_path, cnn_dir):
    out = tmp_path / "out"
    out.mkdir()
    (out / "summary.csv").write_text("item,price\nbread,2\n")  # a user's own table in the --out given
    r = run_cli("tag", EXAMPLES / "dog.flac", "--out", out, "--model", cnn_dir)
    assert r.returncode == 2 and "summary.csv is not a table streamtag wrote" in r.stderr, r.stderr
    assert (out / "summary.csv").read_text() == "item,price\nbread,2\n"
    (out / "summary.csv").unlink()
    (out / "examples").write_text("")  # a file where the folder of outputs goes
    r = run_cli("tag", EXAMPLES, "--out", out, "--model", cnn_dir)
    assert r.returncode == 2 and "is a file where a folder of outputs goes" in r.stderr and "Errno" not in r.stderr
    r = run_cli("tag", EXAMPLES / "dog.flac", "--out", out, "--model", cnn_dir, "--name", "porch")
    assert r.returncode == 2 and "--name names stdin's outputs" in r.stderr
    r = run_cli("tag", EXAMPLES / "dog.flac", "--out", out, "--model", cnn_dir, "--width", "0")
    assert r.returncode == 2 and "--width must be a whole number >= 1 (0 given)" in r.stderr
    (out / "dog.flac.labels.txt").write_text("my own notes on the dog\n")  # a file of the user's at an output path
    r = run_cli("tag", EXAMPLES / "dog.flac", "--out", out, "--model", cnn_dir)
    assert r.returncode == 2 and "dog.flac.labels.txt is not a file streamtag wrote" in r.stderr, r.stderr
    assert (out / "dog.flac.labels.txt").read_text() == "my own notes on the dog\n"
    (out / "dog.flac.labels.txt").write_text("1.000\t2.500\tdog\n")  # ours, from a file cut short: replaced
    assert run_cli("tag", EXAMPLES / "dog.flac", "--out", out, "--model", cnn_dir).returncode == 0
    r = run_cli("tag", EXAMPLES / "dog.flac", "--out", "", "--model", cnn_dir)  # an unset shell variable
    assert r.returncode == 2 and "--out is empty" in r.stderr, r.stderr
    r = run_cli("tag", EXAMPLES / "dog.flac", "--out", tmp_path / ("x" * 300) / "out", "--model", cnn_dir)
    assert r.returncode == 2 and "File name too long" in r.stderr and "Traceback" not in r.stderr, r.stderr


def test_a_missing_manifest_entry_and_too_many_jobs_are_said_plainly(tmp_path, cnn_dir):
    shutil.copy(EXAMPLES / "dog.flac", tmp_path / "dog.flac")
    manifest = tmp_path / "list.txt"
    manifest.write_text("dog.flac\ngone.flac\n")
    from streamtag.cli.tag import usable_cores
    from streamtag.errors import count

    jobs = str(usable_cores() + 1)
    r = run_cli("tag", manifest, "--out", tmp_path / "out", "--model", cnn_dir, "--jobs", jobs)
    assert r.returncode == 1 and f"gone.flac is listed in {manifest} but missing" in r.stderr, r.stderr
    assert f"--jobs {jobs} is more than the {count(usable_cores(), 'core')} here" in r.stderr
    assert "Errno" not in r.stderr


def test_a_copy_of_an_archive_is_not_another_file_and_outputs_among_the_inputs_are_not_scanned(tmp_path, cnn_dir):
    """An archive copied with its times kept (cp -p, rsync) and tagged into the same --out is the same recordings,
    not "another file of the same name"; --out the folder given: its outputs are neither tagged nor noted."""
    (tmp_path / "a" / "rec").mkdir(parents=True)
    shutil.copy2(EXAMPLES / "dog.flac", tmp_path / "a" / "rec" / "dog.flac")
    out = tmp_path / "out"
    assert run_cli("tag", tmp_path / "a" / "rec", "--out", out, "--model", cnn_dir).returncode == 0
    shutil.copytree(tmp_path / "a", tmp_path / "b")  # copy2: times kept
    r = run_cli("tag", tmp_path / "b" / "rec", "--out", out, "--model", cnn_dir)
    assert r.returncode == 0, r.stderr
    here = tmp_path / "b" / "rec"
    for _ in range(2):
        r = run_cli("tag", here, "--out", here, "--model", cnn_dir)
        assert r.returncode == 0 and "were not tagged" not in r.stderr and "was not tagged" not in r.stderr, r.stderr


def test_a_truncated_file_closes_its_open_events_as_interrupted_as_replay_does(tmp_path):
    """A file that breaks off mid-event: tag closed the event as ``stream_end`` (the file ended), replay as
    ``interrupted`` (the input failed); both now say ``interrupted``, alone (the chunk step) and in a pool."""
    buffer = io.BytesIO()
    sf.write(buffer, read_clip(EXAMPLES / "rain.flac"), 16000, format="WAV", subtype="PCM_16")
    cut = tmp_path / "cut.wav"
    cut.write_bytes(buffer.getvalue()[: 44 + 4 * 16000 * 2])  # 4 of its 5 s: the rain event (from 2.2 s) is open

    def reasons(rows: str) -> list:
        return [(r["type"], r["label"], r["onset"], r.get("offset"), r.get("reason")) for r in map(json.loads, rows)]

    r = run_cli("replay", cut, "--fast", "--quiet", "--events", "-")
    assert r.returncode == 1, r.stderr
    replayed = reasons(r.stdout.splitlines())
    assert replayed[-1][0] == "close" and replayed[-1][-1] == "interrupted", replayed
    for given, out in (([cut], tmp_path / "alone"), ([cut, EXAMPLES / "dog.flac"], tmp_path / "pool")):
        r = run_cli("tag", *given, "--out", out, "--jobs", "1")
        assert r.returncode == 1 and "cut.wav is truncated" in r.stderr, r.stderr
        assert reasons((out / "cut.wav.events.jsonl").read_text().splitlines()) == replayed, out.name


def test_a_refused_ray_address_names_the_token_a_new_cluster_asks_for(monkeypatch):
    """Ray 2.59+'s `ray start` turns token authentication on: --ray HOST:6379 then failed with Ray's own
    "Failed to connect" and nothing about the RAY_AUTH_MODE=token that --ray auto does without."""
    import types

    from streamtag import distributed
    from streamtag.errors import ConfigError

    def refuse(**_):
        raise ConnectionError("Failed to connect to Ray cluster at 192.0.2.2:6379")

    monkeypatch.setattr(distributed, "_ray", lambda: types.SimpleNamespace(init=refuse))
    monkeypatch.setattr(distributed, "_check_speaks_ray", lambda address, where: None)
    monkeypatch.delenv("RAY_AUTH_MODE", raising=False)
    with pytest.raises(ConfigError, match=r"cannot connect to Ray there .*set RAY_AUTH_MODE=token"):
        distributed._start_ray("127.0.0.1:6379")
    monkeypatch.setenv("RAY_AUTH_MODE", "token")  # set already: the hint would mislead
    with pytest.raises(ConfigError) as refused:
        distributed._start_ray("127.0.0.1:6379")
    assert "RAY_AUTH_MODE" not in str(refused.value)
    # each port in the other's form: the form it needs
    with pytest.raises(ConfigError, match=r"10001 is Ray Client's port, reached as ray://127\.0\.0\.1:10001"):
        distributed._start_ray("127.0.0.1:10001")
    with pytest.raises(ConfigError, match=r"6379 is a cluster's own port, reached as 127\.0\.0\.1:6379"):
        distributed._start_ray("ray://127.0.0.1:6379")


def test_a_file_that_fails_now_loses_the_outputs_of_its_earlier_version(tmp_path, cnn_dir):
    """A finished file overwritten by junk failed on the rerun, but its old outputs and marker stayed: the next
    run that did not list it (a manifest of another file) put its old row back in the summary, exit 0."""
    folder = tmp_path / "rec"
    folder.mkdir()
    shutil.copy(EXAMPLES / "dog.flac", folder / "dog.flac")
    shutil.copy(EXAMPLES / "rain.flac", folder / "rain.flac")
    out = tmp_path / "out"
    tag = ["--out", out, "--model", cnn_dir, "--jobs", "1"]
    assert run_cli("tag", folder, *tag).returncode == 0
    (folder / "rain.flac").write_bytes(os.urandom(20000))  # the recording replaced by junk
    r = run_cli("tag", folder, *tag)
    assert r.returncode == 1 and "the outputs of its earlier version were removed" in r.stderr, r.stderr
    assert not list(out.glob("rec/rain.flac.*"))  # the outputs of the version that is gone
    manifest = tmp_path / "one.txt"
    manifest.write_text(str(folder / "dog.flac") + "\n")
    r = run_cli("tag", manifest, *tag)
    assert r.returncode == 0, r.stderr
    assert [row["name"] for row in _rows(out / "summary.csv")] == ["rec/dog.flac"]


def test_a_rerun_counts_as_tagged_again_only_the_files_it_tagged(tmp_path, cnn_dir):
    """'tagged 0 files ... 1 failed' then 'note: 1 of the files tagged had been finished before': a file cut
    short since (tagged as far as it goes, but failed) was counted in the note and not in the headline."""
    folder = tmp_path / "rec"
    folder.mkdir()
    sf.write(folder / "rain.wav", read_clip(EXAMPLES / "rain.flac"), 16000)
    out = tmp_path / "out"
    tag = ["tag", folder, "--out", out, "--model", cnn_dir, "--jobs", "1"]
    assert run_cli(*tag).returncode == 0
    data = (folder / "rain.wav").read_bytes()
    (folder / "rain.wav").write_bytes(data[: len(data) // 2])  # cut short since
    r = run_cli(*tag)
    assert r.returncode == 1 and "tagged 0 files" in r.stderr and "1 failed" in r.stderr, r.stderr
    assert "had been finished before" not in r.stderr, r.stderr


def test_a_run_says_which_earlier_rows_are_of_files_gone_or_other_settings(tmp_path, cnn_dir):
    """The summary lists every finished file under --out: a deleted recording's row stayed, and rows of earlier
    runs with other thresholds sat beside this run's, without a word to the analyst reading it."""
    folder = tmp_path / "rec"
    folder.mkdir()
    for name in ("a", "b", "c"):
        shutil.copy(EXAMPLES / "dog.flac", folder / f"{name}.flac")
    out = tmp_path / "out"
    tag = ["--out", out, "--model", cnn_dir, "--jobs", "1"]
    r = run_cli("tag", folder, *tag)
    assert r.returncode == 0 and "note" not in r.stderr, r.stderr
    (folder / "b.flac").unlink()
    manifest = tmp_path / "a.txt"
    manifest.write_text(str(folder / "a.flac") + "\n")
    r = run_cli("tag", manifest, *tag, "--on-threshold", "0.3")
    assert r.returncode == 0, r.stderr
    assert "1 file in" in r.stderr and "from earlier runs is no longer at the path tagged from" in r.stderr
    assert "e.g. rec/b.flac" in r.stderr and "was tagged by earlier runs with other settings" in r.stderr
    assert "e.g. rec/c.flac" in r.stderr
    assert [row["name"] for row in _rows(out / "summary.csv")] == ["rec/a.flac", "rec/b.flac", "rec/c.flac"]
    assert "twice" not in r.stderr
    r = run_cli("tag", folder / "c.flac", *tag)  # the same recording by itself: a second name, c.flac
    assert r.returncode == 0 and "is there twice" in r.stderr and "c.flac and rec/c.flac" in r.stderr, r.stderr


def test_a_file_that_fails_for_new_settings_or_our_own_fault_keeps_its_outputs(tmp_path, cnn_dir, monkeypatch):
    """Only a file changed since into one that cannot be read loses its earlier outputs: the first version of that
    fix dropped them for a read error under new settings alone (--scores), or a failure of our own (a full disk)."""
    from streamtag import archive
    from streamtag.errors import AudioFileError

    folder = tmp_path / "rec"
    folder.mkdir()
    shutil.copy(EXAMPLES / "dog.flac", folder / "dog.flac")
    out = tmp_path / "out"
    items = archive.find_inputs([folder])
    archive.tag_archive(items, out, model=cnn_dir, width=2)
    before = sorted(p.name for p in out.rglob("*"))
    for fault in (AudioFileError("rec/dog.flac: Input/output error"), OSError(28, "No space left on device")):

        def failing(*args, fault=fault, **kwargs):
            raise fault

        monkeypatch.setattr(archive, "WavReplaySource", failing)
        (outcome,) = archive.tag_archive(items, out, model=cnn_dir, width=2, scores=True)  # new settings
        assert outcome.error and "earlier version" not in outcome.error
        assert sorted(p.name for p in out.rglob("*")) == before
