"""Dataset readers, grouped splits, a tiny training run, model files and eval's report."""

import csv
import dataclasses
import json
import shutil
import signal
import time

import numpy as np
import pytest
import soundfile as sf

from streamtag.errors import ConfigError, DatasetError
from streamtag.training.datasets import grouped_folds, load_dataset

from .conftest import EXAMPLES, read_clip, run_cli


@pytest.fixture(scope="module")
def class_folders(tmp_path_factory):
    """A folder-per-class dataset cut from the repo's clips: 3 classes, 6 clips each, mixed formats and rates."""
    root = tmp_path_factory.mktemp("folders")
    rng = np.random.default_rng(0)
    for name in ("dog", "rain", "chainsaw"):
        audio = read_clip(EXAMPLES / f"{name}.flac")
        (root / name).mkdir()
        for k in range(6):
            start = int(rng.integers(0, audio.size - 16000 * 2))
            piece = audio[start : start + 16000 * 2]
            if k % 2:
                sf.write(root / name / f"{name}{k}.wav", np.stack([piece, piece], 1), 16000)  # stereo WAV
            else:
                sf.write(root / name / f"{name}{k}.flac", piece, 16000)
    return root


def test_folder_per_class_reader(class_folders):
    ds = load_dataset(class_folders)
    assert ds.labels == ["chainsaw", "dog", "rain"] and len(ds.clips) == 18
    assert {c.label for c in ds.clips if c.path.parent.name == "dog"} == {"dog"}


def test_csv_manifest_reader(class_folders, tmp_path):
    manifest = tmp_path / "m.csv"
    with open(manifest, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "label", "fold"])
        for p in sorted(class_folders.rglob("*.*")):
            w.writerow([p, p.parent.name, 1 + int(p.stem[-1]) % 2])
    ds = load_dataset(manifest)
    assert len(ds.clips) == 18 and {c.fold for c in ds.clips} == {1, 2}
    bad = tmp_path / "bad.csv"
    bad.write_text("file,class\nx.wav,dog\n")
    with pytest.raises(DatasetError, match="'path' and 'label'"):
        load_dataset(bad)


def test_esc50_reader_and_grouped_folds(esc50):
    ds = load_dataset(esc50)
    with open(esc50 / "meta" / "esc50.csv") as f:
        assert len(ds.clips) == sum(1 for _ in f) - 1  # whatever the metadata lists
    assert len(ds.labels) == 50
    folds = grouped_folds(ds, 5)
    for group in {c.group for c in ds.clips}:
        assert len({folds[i] for i, c in enumerate(ds.clips) if c.group == group}) == 1  # no source on two sides
    counts = np.bincount(folds)
    assert counts.min() > 0.7 * counts.max()


def test_esc50_layout_copy_with_other_rate(esc50, tmp_path):
    """The reader takes the official layout at another rate (the full download is 44.1 kHz WAV)."""
    (tmp_path / "meta").mkdir()
    (tmp_path / "audio").mkdir()
    rows = list(csv.DictReader(open(esc50 / "meta" / "esc50.csv")))[:4]
    with open(tmp_path / "meta" / "esc50.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=rows[0].keys())
        w.writeheader()
        for row in rows:
            x, _ = sf.read(esc50 / "audio" / row["filename"])
            row["filename"] = row["filename"].replace(".flac", ".wav")
            sf.write(tmp_path / "audio" / row["filename"], np.repeat(x, 2), 32000)
            w.writerow(row)
    assert len(load_dataset(tmp_path).clips) == 4


def test_esc50_layout_without_a_column_names_it(tmp_path):
    (tmp_path / "meta").mkdir()
    (tmp_path / "audio").mkdir()
    (tmp_path / "meta" / "esc50.csv").write_text("filename,fold,target\n1-100032-A-0.wav,1,0\n")
    with pytest.raises(DatasetError, match="has no category column"):
        load_dataset(tmp_path)


def test_tiny_training_lowers_loss_and_round_trips(class_folders, tmp_path):
    out = tmp_path / "model"
    r = run_cli(
        "train",
        class_folders,
        "--arch",
        "lstm",
        "--arch-param",
        "hidden=24",
        "--epochs",
        "20",
        "--batch-size",
        "4",
        "--out",
        out,
        "--quiet",
        "--cache",
        tmp_path / "cache",
        timeout=600,
    )
    assert r.returncode == 0, r.stderr
    log = json.loads((out / "train_log.json").read_text())
    losses = [row["loss"] for row in log["history"]]
    # multi-label BCE starts at ln 2 per class; heavy augmentation (gain, noise, reverb) keeps it well above 0
    assert len(losses) == 20 and np.mean(losses[-3:]) < 0.93 * np.mean(losses[:3])
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["arch"] == "lstm" and cfg["labels"] == ["chainsaw", "dog", "rain"] and cfg["arch_params"]["hidden"] == 24
    r = run_cli("replay", EXAMPLES / "dog.flac", "--model", out, "--fast", "--quiet")  # the trained folder is usable
    assert r.returncode == 0, r.stderr


@pytest.mark.parametrize("workers", [0, 2], ids=["batches in-process", "two batch workers"])
def test_interrupted_then_resumed_equals_uninterrupted(class_folders, tmp_path, workers):
    from safetensors.numpy import load_file

    from .conftest import start_cli

    def args(out, *extra):
        return [
            "train",
            "--loader-workers",
            str(workers),
            class_folders,
            "--arch",
            "cnn",
            "--arch-param",
            "hidden=16",
            "--arch-param",
            "dilations=[1,2]",
            "--batch-size",
            "4",
            "--epochs",
            "6",
            "--no-val",
            "--out",
            out,
            "--quiet",
            "--cache",
            tmp_path / "cache",
            *extra,
        ]

    straight = tmp_path / "straight"
    assert run_cli(*args(straight)).returncode == 0
    resumed = tmp_path / "resumed"
    proc = start_cli(*args(resumed))
    while proc.poll() is None and not (resumed / "checkpoint.pt").exists():
        time.sleep(0.02)
    proc.send_signal(signal.SIGSTOP)  # held at its first epoch (the run is seconds long: a late signal
    proc.send_signal(signal.SIGINT)  # would find it finished, and the test would resume nothing)
    proc.send_signal(signal.SIGCONT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err  # stopped mid-run: the last checkpoint holds a finished epoch
    other = run_cli(*args(resumed, "--resume", "--steps-per-epoch", "97"))  # a schedule of another length
    assert other.returncode == 2 and "--steps-per-epoch" in other.stderr and "Traceback" not in other.stderr
    r = run_cli(*args(resumed, "--resume"))
    assert r.returncode == 0, r.stderr
    history = json.loads((resumed / "train_log.json").read_text())["history"]
    assert [row["epoch"] for row in history] == [1, 2, 3, 4, 5, 6]
    a, b = load_file(straight / "model.safetensors"), load_file(resumed / "model.safetensors")
    for name in a:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)  # exact: data order and RNG restored
    r = run_cli(*args(resumed, "--resume")[:-6], "--epochs", "9", "--no-val", "--out", resumed, "--resume")
    assert r.returncode != 0 and "resume with the same --epochs" in r.stderr
    r = run_cli(*args(tmp_path / "none", "--resume"))
    assert r.returncode == 2 and "nothing to resume" in r.stderr
    assert "training" not in r.stderr  # said before the dataset is read and its features computed


def test_eval_report_on_a_small_real_subset(class_folders, tmp_path):
    model = tmp_path / "model"
    assert (
        run_cli(
            "train",
            class_folders,
            "--arch",
            "cnn",
            "--arch-param",
            "hidden=16",
            "--epochs",
            "3",
            "--out",
            model,
            "--quiet",
            "--cache",
            tmp_path / "cache",
        ).returncode
        == 0
    )
    report_dir = tmp_path / "report"
    r = run_cli("eval", model, class_folders, "--report", report_dir, "--plot", "--baseline-folds", "3")
    assert r.returncode == 0, r.stderr
    assert f"report written to {report_dir / 'report.md'}" in r.stderr  # says where, and what it is doing
    assert "clips through the onnx backend" in r.stderr and "level sweep, -40 dB" in r.stderr
    report = json.loads((report_dir / "report.json").read_text())
    m = report["metrics"]
    assert m["clips"] == 18 and 0 <= m["acc_last"] <= 1 and 0 <= m["macro_map"] <= 1
    for key in ("acc_last", "acc_mean"):
        lo, hi = m[f"{key}_ci95"]
        assert lo <= m[key] <= hi and (hi - lo > 0.05 or m[key] in (0.0, 1.0))  # 18 clips: a wide interval
    assert list(m["time_to_detect"]) == ["0.25", "0.5", "1", "2", "5"]
    assert np.array(m["confusion"]).sum() == 18
    assert 0 <= report["baseline_acc"] <= 1
    assert (report_dir / "time_to_detect.png").stat().st_size > 10_000
    assert "Time to detect" in (report_dir / "report.md").read_text()
    assert "95% interval" in (report_dir / "report.md").read_text()
    shutil.rmtree(report_dir)


def test_sigterm_saves_and_says_how_to_resume(class_folders, tmp_path):
    """Started from a script in the background (SIGINT ignored there), a signal still stops it cleanly."""
    import subprocess
    import sys

    out = tmp_path / "model"
    cmd = [sys.executable, "-m", "streamtag", "train", str(class_folders), "--arch-param", "hidden=16",
           "--epochs", "200", "--batch-size", "4", "--out", str(out), "--quiet"]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while not (out / "checkpoint.pt").is_file() and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.2)
    time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err  # a clean stop asked for (Ctrl-C: 130)
    assert "--resume" in err and "Traceback" not in err
    import torch

    assert torch.load(out / "checkpoint.pt", weights_only=True)["epoch"] >= 1  # what --resume starts from


def test_train_never_replaces_a_model_by_surprise(class_folders, tmp_path):
    out = tmp_path / "model"
    args = ["train", class_folders, "--arch-param", "hidden=8", "--epochs", "1", "--out", out, "--quiet"]
    first = run_cli(*args)
    assert first.returncode == 0, first.stderr
    assert (out / "model.safetensors").stat().st_mode & 0o044 == 0o044  # readable by others, as any model file
    (out / "model.onnx").write_text("stale graph of the old weights")
    again = run_cli(*args)
    assert again.returncode == 2 and "--overwrite" in again.stderr and "Traceback" not in again.stderr
    typo = run_cli("train", tmp_path / "no_such_data", *args[2:], "--overwrite")  # refused before anything goes
    assert typo.returncode == 2 and "not found" in typo.stderr
    assert (out / "model.onnx").exists() and (out / "train_log.json").exists()
    late = run_cli(*args, "--overwrite", "--val-fold", "1")  # refused by a check after the data is read
    assert late.returncode == 2 and (out / "model.safetensors").exists() and (out / "config.json").exists()
    unwritable = run_cli("train", class_folders, "--epochs", "1", "--out", "/proc/streamtag_model", "--quiet")
    assert unwritable.returncode == 2 and "cannot write" in unwritable.stderr and "Traceback" not in unwritable.stderr
    replaced = run_cli(*args, "--overwrite")
    assert replaced.returncode == 0, replaced.stderr
    assert not (out / "model.onnx").exists()
    no_folds = run_cli("train", class_folders, "--val-fold", "1", "--out", tmp_path / "m2", "--quiet")
    assert no_folds.returncode == 2 and "has no folds" in no_folds.stderr and "np.int64" not in no_folds.stderr
    assert not (tmp_path / "m2").exists()  # a refused run leaves no folder behind


def test_init_starts_from_a_trained_model_and_refuses_another_shape(class_folders, tmp_path):
    from safetensors.numpy import load_file

    def args(out, *extra):
        common = ["--arch", "cnn", "--arch-param", "hidden=16", "--arch-param", "dilations=[1,2]", "--batch-size", "4"]
        common += ["--arch-param", "pool_seconds=[0.5]"]
        quiet = ["--no-val", "--quiet", "--cache", tmp_path / "cache"]
        return ["train", class_folders, *common, *quiet, "--out", out, *extra]

    base = tmp_path / "base"
    assert run_cli(*args(base, "--epochs", "2")).returncode == 0
    tuned = tmp_path / "tuned"
    r = run_cli(*args(tuned, "--epochs", "1", "--lr", "1e-9", "--init", base))  # a step too small to move them
    assert r.returncode == 0, r.stderr
    scratch = tmp_path / "scratch"
    assert run_cli(*args(scratch, "--epochs", "1", "--lr", "1e-9", "--seed", "1")).returncode == 0
    a, b, c = (load_file(m / "model.safetensors") for m in (base, tuned, scratch))
    weight = next(n for n in a if n.endswith("weight") and a[n].ndim > 1)
    np.testing.assert_allclose(b[weight], a[weight], atol=1e-5)
    assert not np.allclose(c[weight], a[weight], atol=1e-3)  # without --init the weights are fresh

    # a run may add the head's gate: every other weight comes over, the gate starts open
    gated = tmp_path / "gated"
    r = run_cli(*args(gated, "--epochs", "1", "--lr", "1e-9", "--arch-param", "pool_gate=true", "--init", base))
    assert r.returncode == 0, r.stderr
    d = load_file(gated / "model.safetensors")
    np.testing.assert_allclose(d[weight], a[weight], atol=1e-5)
    assert set(d) - set(a) == {"head.gate.weight", "head.gate.bias"}
    assert (1 / (1 + np.exp(-d["head.gate.bias"])) > 0.9).all()

    # a CNN may append conv blocks: the old ones come over, the new ones start with a small scale
    deeper = tmp_path / "deeper"
    r = run_cli(*args(deeper, "--epochs", "1", "--lr", "1e-9", "--arch-param", "dilations=[1,2,4]", "--init", base))
    assert r.returncode == 0, r.stderr
    e = load_file(deeper / "model.safetensors")
    np.testing.assert_allclose(e[weight], a[weight], atol=1e-5)
    assert {n.split(".")[0] + "." + n.split(".")[1] for n in set(e) - set(a)} == {"convs.2", "norms.2"}
    np.testing.assert_allclose(e["norms.2.weight"], 0.1, atol=1e-5)
    r = run_cli(*args(tmp_path / "reordered", "--epochs", "1", "--arch-param", "dilations=[2,1,4]", "--init", base))
    assert r.returncode == 2 and "dilations" in r.stderr and "Traceback" not in r.stderr

    r = run_cli(*args(tmp_path / "other", "--epochs", "1", "--arch-param", "hidden=24", "--init", base))
    assert r.returncode == 2 and "--init" in r.stderr and "differ" in r.stderr and "Traceback" not in r.stderr
    r = run_cli(*args(tmp_path / "none", "--epochs", "1", "--init", tmp_path / "missing"))
    assert r.returncode == 2 and "not a model folder" in r.stderr


def test_some_crops_start_with_a_settled_level_estimate():
    """Streams meet a sound with the level estimate settled on what came before it; training must show that."""
    from streamtag.training.trainer import DB, TrainOptions, _Batches

    opts = TrainOptions(batch_size=64, warm_level_p=0.5, warm_level_db=(-50.0, 10.0), spec_masks=0)
    rng = np.random.default_rng(0)
    feats = [rng.normal(-5.0, 1.0, size=(400, 64)).astype(np.float32) for _ in range(4)]
    hard = np.eye(2, dtype=np.float32)[[0, 1, 0, 1]]
    batches = _Batches(feats, hard, None, opts, float(np.log(1e-9)), rng, np.zeros(64, np.float32))
    batches.settled_frames = 300.0
    x, _, level0 = batches.batch()
    settled = level0[:, 1] > 0
    assert 16 < int(settled.sum()) < 48  # about half of 64
    assert np.all(level0[settled, 1].numpy() == 300.0) and np.all(level0[~settled].numpy() == 0.0)
    offset = (level0[settled, 0] - x[settled].mean(dim=(1, 2))).numpy() / DB
    assert offset.min() >= -50.01 and offset.max() <= 10.01 and offset.max() - offset.min() > 20


def test_ctrl_c_at_a_terminal_stops_a_run_with_batch_workers_cleanly(class_folders, tmp_path):
    """A terminal's Ctrl-C signals the whole process group, the batch workers too: the run saves and says how
    to resume (exit 130), no worker prints a traceback, and none is left behind."""
    import os
    import subprocess
    import sys

    out = tmp_path / "model"
    cmd = [sys.executable, "-m", "streamtag", "train", str(class_folders), "--loader-workers", "2", "--epochs", "500"]
    cmd += ["--batch-size", "4", "--no-val", "--arch-param", "hidden=16", "--quiet", "--out", str(out)]
    cmd += ["--cache", str(tmp_path / "cache")]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    while proc.poll() is None and not (out / "checkpoint.pt").exists():
        time.sleep(0.05)
    assert proc.poll() is None, proc.communicate()[1]
    os.killpg(proc.pid, signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "Traceback" not in err and "--resume" in err, err
    for _ in range(200):  # the workers end with the run; give them a moment to be reaped
        try:
            os.killpg(proc.pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.05)
    else:
        raise AssertionError("batch workers outlived the run")


def test_batch_workers_draw_the_same_batches_however_many_there_are():
    """Batch ``step`` of ``epoch`` comes from its own seed: two workers or three, the run sees the same data."""
    from streamtag.training.trainer import BatchMaker, TrainOptions, _Batches

    rng = np.random.default_rng(0)
    feats = [rng.normal(-5.0, 1.0, size=(400, 64)).astype(np.float32) for _ in range(6)]
    hard = np.eye(3, dtype=np.float32)[[0, 1, 2, 0, 1, 2]]

    def draw(workers: int, epoch: int) -> list:
        batches = _Batches(feats, hard, None, TrainOptions(batch_size=4), -20.7, np.random.default_rng(1), np.zeros(64))
        with BatchMaker(batches, workers) as maker:
            return [(x.numpy(), y.numpy(), lv.numpy()) for x, y, lv in maker.epoch(7, epoch, 5)]

    two, three = draw(2, 0), draw(3, 0)
    assert len(two) == len(three) == 5
    for a, b in zip(two, three):
        for u, v in zip(a, b):
            np.testing.assert_array_equal(u, v)
    assert not np.array_equal(two[0][0], two[1][0])  # each step its own batch
    assert not np.array_equal(two[0][0], draw(2, 1)[0][0])  # and each epoch
    assert len(draw(0, 0)) == 5  # in-process: the run's own generator, as before


def test_a_batch_worker_killed_mid_run_is_one_clear_error_not_a_hang(monkeypatch):
    """The kernel's out-of-memory killer takes a worker: the run says so and how to go on, it does not wait."""
    import os

    from streamtag.errors import StreamtagError
    from streamtag.training import trainer

    rng = np.random.default_rng(0)
    feats = [rng.normal(-5.0, 1.0, size=(400, 64)).astype(np.float32) for _ in range(4)]
    batches = trainer._Batches(
        feats, np.eye(2, dtype=np.float32)[[0, 1, 0, 1]], None, trainer.TrainOptions(batch_size=2), -20.7, rng,
        np.zeros(64),
    )  # fmt: skip
    monkeypatch.setattr(trainer._Batches, "draw", lambda self: os.kill(os.getpid(), signal.SIGKILL))
    with trainer.BatchMaker(batches, 2) as maker:
        with pytest.raises(StreamtagError, match="a batch worker died .*--resume"):
            list(maker.epoch(0, 0, 3))


def test_bootstrap_interval_of_an_accuracy_narrows_with_more_clips():
    """eval's 95% interval: around the accuracy, about +-1.96 standard errors wide, narrower for more clips."""
    from streamtag.training.evaluate import bootstrap_interval

    lo, hi = bootstrap_interval(np.arange(100) < 60)  # 60 of 100 right
    assert lo < 0.6 < hi and 0.14 < hi - lo < 0.24  # 2 * 1.96 * sqrt(0.24 / 100) = 0.19
    lo2, hi2 = bootstrap_interval(np.arange(1000) < 600)
    assert lo2 < 0.6 < hi2 and hi2 - lo2 < (hi - lo) / 2.5
    assert bootstrap_interval(np.ones(50)) == [1.0, 1.0]
    assert all(np.isnan(bootstrap_interval(np.zeros(0))))


def test_band_limited_crops_have_nothing_above_their_cutoff():
    """--band-limit: a share of crops (of every class) loses everything above a random 3.4-7 kHz, so a dataset
    recorded at 8 kHz (Donate-a-cry) cannot teach that a missing top octave is its class."""
    from streamtag.training.trainer import TrainOptions, _Batches

    opts = TrainOptions(batch_size=64, band_limit_p=0.5, warm_level_p=0.0, spec_masks=0, background_p=0.0)
    opts = dataclasses.replace(opts, reverb_p=0.0, noise_floor_p=0.0, gain_db=(0.0, 0.0), silence_p=0.0)
    floor = float(np.log(1e-9))
    rng = np.random.default_rng(0)
    feats = [np.full((300, 64), 2.0, np.float32) for _ in range(4)]
    hard = np.eye(2, dtype=np.float32)[[0, 1, 0, 1]]
    batches = _Batches(feats, hard, None, opts, floor, rng, np.zeros(64, np.float32))
    x, y, _ = batches.batch()
    empty = (x < floor + 1.0).all(dim=1).numpy()  # (batch, bands): bands at the floor throughout the crop
    cut = np.where(empty.any(axis=1), empty.argmax(axis=1), 64)
    limited = cut < 64
    assert 16 < int(limited.sum()) < 48  # about half
    assert (y[limited].sum() > 0).all()  # targets stay: the sound is still there below the cutoff
    for i in np.flatnonzero(limited):
        assert empty[i, cut[i] :].all() and not empty[i, : cut[i]].any()  # everything above, nothing below
    hz = batches.band_centres[cut[limited]]
    assert hz.min() >= 3400 and hz.max() <= 7400 and hz.max() - hz.min() > 1000
    assert not empty[~limited].any()


def test_a_recording_mixed_far_under_is_left_out_of_the_loss_not_taught_as_heard():
    """A background mixed close under a crop is heard (targets the union); one further under than
    --audible-snr may be masked, so its classes are unknown there: a model taught "dog" for a dog 25 dB
    under music learns to call music dog."""
    from streamtag.training.trainer import TrainOptions, _Batches

    opts = TrainOptions(audible_snr_db=12.0)
    rng = np.random.default_rng(0)
    feats = [np.full((400, 64), 2.0, np.float32), np.full((400, 64), 1.0, np.float32)]
    hard = np.array([[1, 0, 0], [0, 1, 0]], np.float32)  # class 2: known absent from both
    batches = _Batches(feats, hard, None, opts, float(np.log(1e-9)), rng, np.zeros(64, np.float32))
    dog, music = batches._crop(0).y, batches._crop(1).y
    near, far = batches._mix_targets(dog, music, 6.0), batches._mix_targets(dog, music, 20.0)
    assert (near[:, 0] == 1).all() and (near[:, 1] == 1).all() and (near[:, 2] == 0).all()
    assert (far[:, 0] == 1).all() and np.isnan(far[:, 1]).all() and (far[:, 2] == 0).all()
    assert (batches._mix_targets(music, dog, 20.0)[:, 1] == 1).all()  # the louder one is always heard


def test_quiet_lead_crops_start_quiet_with_nothing_to_detect():
    """--quiet-lead: the sound moves later behind a quiet floor whose targets are all 0; the rest of the crop
    keeps its targets (shifted with it)."""
    from streamtag.training.trainer import TrainOptions, _Batches

    opts = TrainOptions(batch_size=32, quiet_lead_p=1.0, warm_level_p=0.0, spec_masks=0, background_p=0.0)
    opts = dataclasses.replace(opts, reverb_p=0.0, noise_floor_p=0.0, gain_db=(0.0, 0.0), silence_p=0.0, band_limit_p=0)
    rng = np.random.default_rng(0)
    feats = [np.full((300, 64), 2.0, np.float32) for _ in range(4)]  # loud, far above any floor
    hard = np.eye(2, dtype=np.float32)[[0, 1, 0, 1]]
    batches = _Batches(feats, hard, None, opts, float(np.log(1e-9)), rng, np.zeros(64, np.float32))
    x, y, level0 = batches.batch()
    loud = x.mean(dim=2) > 1.0  # (batch, frames)
    lead = (~loud).int().argmin(dim=1)  # first loud frame
    assert int(lead.min()) >= 50 and int(lead.max()) <= 150 and len(set(lead.tolist())) > 5  # 0.5-1.5 s here
    for i, n in enumerate(lead.tolist()):
        assert bool(loud[i, n:].all()) and float(y[i, :n].abs().sum()) == 0.0
        assert float(y[i, n:].sum(dim=1).min()) == 1.0  # the clip's label from its (later) start on
    assert float(level0.abs().sum()) == 0.0  # the quiet itself settles the estimate


def test_cross_validation_pools_source_grouped_folds(class_folders, tmp_path):
    out = tmp_path / "cv"
    common = ["--arch", "cnn", "--arch-param", "hidden=16", "--arch-param", "dilations=[1,2]", "--batch-size", "4"]
    r = run_cli(
        "train",
        class_folders,
        *common,
        "--epochs",
        "2",
        "--cv",
        "2",
        "--out",
        out,
        "--quiet",
        "--cache",
        tmp_path / "cache",
        timeout=600,
    )
    assert r.returncode == 0, r.stderr
    report = json.loads((out / "report.json").read_text())
    assert report["model"] == "cnn (2-fold grouped CV)" and report["metrics"]["clips"] == 18
    assert len(report["folds"]) == 2 and 0.0 <= report["baseline_acc"] <= 1.0
    assert (out / "fold0" / "config.json").is_file() and (out / "fold1" / "model.safetensors").is_file()


def test_unlabelled_manifest_weights_groups(class_folders, tmp_path):
    """A ``weight`` column: a group is drawn that many times as often as a group of weight 1 (the recipe
    uses it for speech, which two unlabelled groups of eighteen hold); bad weights are one clear error."""
    from streamtag.training.datasets import read_unlabelled
    from streamtag.training.trainer import TrainOptions, _Batches

    files = sorted(class_folders.rglob("*.*"))
    manifest = tmp_path / "u.csv"
    with open(manifest, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "group", "weight"])
        for p in files:
            w.writerow([p, p.parent.name, {"dog": "3", "rain": "1"}.get(p.parent.name, "")])  # chainsaw: 1
    clips = read_unlabelled(manifest)
    weight = {c.group: c.weight for c in clips}
    assert weight == {"dog": 3.0, "rain": 1.0, "chainsaw": 1.0}

    opts = TrainOptions(batch_size=8)
    feats = [np.zeros((300, 64), np.float32) for _ in clips]
    hard = np.full((len(clips), 2), np.nan, np.float32)  # nothing labelled: every draw is unlabelled
    groups, weights = [c.group for c in clips], [c.weight for c in clips]
    bands = np.zeros(64, np.float32)
    batches = _Batches(feats, hard, None, opts, 0.0, np.random.default_rng(0), bands, groups, weights)
    drawn = [groups[batches._pick()] for _ in range(5000)]
    share = {g: drawn.count(g) / len(drawn) for g in weight}
    assert share["dog"] == pytest.approx(0.6, abs=0.03) and share["rain"] == pytest.approx(0.2, abs=0.03)
    even = _Batches(feats, hard, None, opts, 0.0, np.random.default_rng(0), bands, groups)
    drawn = [groups[even._pick()] for _ in range(3000)]
    assert drawn.count("dog") / len(drawn) == pytest.approx(1 / 3, abs=0.03)  # no weights: groups alike

    for rows, message in (
        ([[files[0], "a", "-2"]], "line 2: weight '-2' must be a positive number"),
        ([[files[0], "a", "many"]], "weight 'many' must be a positive number"),
        ([[files[0], "a", "2"], [files[1], "a", "1"]], "group 'a' has weights 2 and 1"),
    ):
        bad = tmp_path / "bad.csv"
        with open(bad, "w", newline="") as f:
            csv.writer(f).writerows([["path", "group", "weight"], *rows])
        with pytest.raises(DatasetError, match=message):
            read_unlabelled(bad)

    # two manifests may share a group (e.g. one package split in two lists), but then also its weight
    other = tmp_path / "other.csv"
    with open(other, "w", newline="") as f:
        csv.writer(f).writerows([["path", "group", "weight"], [files[0], "dog", "1"]])
    teacher = tmp_path / "teacher.onnx"  # never opened: the manifests are read first
    teacher.write_bytes(b"")
    r = run_cli(
        "train",
        class_folders,
        "--unlabelled",
        manifest,
        "--unlabelled",
        other,
        "--teacher",
        teacher,
        "--out",
        tmp_path / "m",
    )
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert f"{manifest} and {other}: group 'dog' has weights 3 and 1" in r.stderr


def test_unmapped_negatives_teach_a_class_without_a_teacher_counterpart_absent_where_the_teacher_hears_another():
    """--unmapped-negatives: class 1 has no teacher class; on unlabelled frames where the teacher hears class 0
    it is taught absent (0), elsewhere it stays unknown; a clip that labels it keeps its label."""
    from streamtag.training.trainer import TrainOptions, _Batches

    opts = TrainOptions(crop_s=3.0, unmapped_negatives=True)
    rng = np.random.default_rng(0)
    feats = [np.full((300, 64), 2.0, np.float32), np.full((300, 64), 2.0, np.float32)]
    hard = np.array([[np.nan, np.nan], [0.0, 1.0]], np.float32)  # an unlabelled file; a clip of class 1

    def soft(i, first, n):  # the teacher hears class 0 in the first half of every file; class 1 is unmapped
        out = np.full((n, 2), np.nan, np.float32)
        out[:, 0] = (np.arange(first, first + n) < 150).astype(np.float32)
        return out

    floor, bands = float(np.log(1e-9)), np.zeros(64, np.float32)
    with_rule = _Batches(feats, hard, soft, opts, floor, rng, bands)
    crop = with_rule._crop(0)
    heard = crop.y[:, 0] >= 0.5
    assert heard.any() and (~heard).any()
    assert (crop.y[heard, 1] == 0).all() and np.isnan(crop.y[~heard, 1]).all()
    assert (with_rule._crop(1).y[:, 1] == 1.0).all()  # its own clips still teach it present
    without = _Batches(feats, hard, soft, TrainOptions(crop_s=3.0), floor, rng, bands)
    assert np.isnan(without._crop(0).y[:, 1]).all()
    # with --label-frames, the quiet frames of a clip of the unmapped class are its own label's to leave
    # unknown, never taught absent: a can opening followed by speech is still a can-opening clip
    quiet_tail = [feats[0], np.where(np.arange(300)[:, None] < 100, 2.0, -20.0).astype(np.float32)]
    both = TrainOptions(crop_s=3.0, unmapped_negatives=True, label_frames_db=20.0)
    own = _Batches(quiet_tail, hard, soft, both, floor, rng, bands)._crop(1).y[:, 1]
    assert (own[:100] == 1.0).all() and np.isnan(own[115:150]).all()  # the teacher hears class 0 there


def test_agreement_by_group_says_which_source_pulls_a_class_down():
    """eval --agreement-audio, per group: a source where the student ranks the teacher's frames right gets AP 1,
    one where it ranks them backwards a low AP, and one with too few frames either way none."""
    from streamtag.training.evaluate import agreement_by_group

    truth = np.array([1, 1, 0, 0, 1, 1, 0, 0, 1, 1, 1, 1], bool)[:, None]
    scores = np.array([0.9, 0.8, 0.1, 0.2, 0.1, 0.2, 0.9, 0.8, 0.5, 0.5, 0.5, 0.5], np.float32)[:, None]
    groups = np.array(["good"] * 4 + ["backwards"] * 4 + ["speech only"] * 4)
    out = agreement_by_group(scores, truth, groups, {0: "speech"}, min_positives=2)
    assert out["good"]["speech"]["ap"] == 1.0 and out["backwards"]["speech"]["ap"] < 0.6
    assert out["speech only"]["speech"]["ap"] is None and out["speech only"]["speech"]["positives"] == 4
    assert out["good"]["speech"]["mean_on_positives"] == pytest.approx(0.85)
    assert sum(g["frames"] for g in out.values()) == 12


def test_label_frames_teach_a_clip_label_where_the_clip_is_loud_and_leave_its_silence_to_the_teacher():
    """--label-frames DB: a clip of class 0 that is a loud second then near silence is taught class 0 as 1 where
    it is loud (not blended with the teacher's 0.3), the teacher's word alone in its silence, and the classes
    it is known not to hold stay 0 throughout; 0 keeps the blended label on every frame."""
    from streamtag.training.trainer import TrainOptions, _Batches

    x = np.full((300, 64), -20.0, np.float32)  # 3 s, so one crop is the whole clip
    x[:100] = 2.0  # the first second is 50 dB above the rest
    hard = np.array([[1.0, 0.0]], np.float32)

    def soft(i, first, n):
        return np.full((n, 2), 0.3, np.float32)

    floor, bands = float(np.log(1e-9)), np.zeros(64, np.float32)
    rng = np.random.default_rng(0)
    crop = _Batches([x], hard, soft, TrainOptions(label_frames_db=20.0), floor, rng, bands)._crop(0)
    assert (crop.y[:100, 0] == 1.0).all() and np.allclose(crop.y[115:, 0], 0.3)
    assert np.allclose(crop.y[:, 1], 0.5 * 0.0 + 0.5 * 0.3)  # a known absence stays blended
    before = _Batches([x], hard, soft, TrainOptions(), floor, rng, bands)._crop(0)
    assert np.allclose(before.y[:, 0], 0.65)
    with pytest.raises(ConfigError, match="--label-frames"):
        TrainOptions(label_frames_db=-3.0)


def test_averaging_models_writes_the_mean_of_their_weights_and_refuses_another_architecture(tmp_path):
    """recipes/average_models.py: the averaged model holds the element-wise mean of the weights (a model that
    loads and steps), the union of the training lists; a model with another config is one line, exit 1."""
    import importlib.util
    import subprocess
    import sys
    from pathlib import Path

    from safetensors.numpy import load_file

    from streamtag.backends import make_backend

    from .conftest import make_model

    recipe = Path(__file__).resolve().parents[1] / "recipes" / "average_models.py"
    spec = importlib.util.spec_from_file_location("average_models", recipe)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    a, b = make_model("cnn-ml", tmp_path / "a", seed=0), make_model("cnn-ml", tmp_path / "b", seed=1)
    (a / "trained_on.txt").write_text("one.wav 10\ntwo.wav 20\n")
    (b / "trained_on.txt").write_text("two.wav 20\nthree.wav 30\n")
    out = module.average_models([a, b], tmp_path / "soup")
    wa, wb, avg = (load_file(str(f / "model.safetensors")) for f in (a, b, out))
    conv = "convs.0.weight"
    assert not np.allclose(wa[conv], wb[conv])
    for name in wa:
        if wa[name].dtype.kind == "f":
            np.testing.assert_allclose(avg[name], (wa[name] + wb[name]) / 2, rtol=1e-6, atol=1e-7)
    assert (out / "trained_on.txt").read_text().splitlines() == ["one.wav 10", "three.wav 30", "two.wav 20"]
    assert json.loads((out / "train_log.json").read_text())["averaged"] == [str(a), str(b)]
    probs = make_backend("torch", out)(np.zeros((1, 160), np.float32))
    assert probs.shape == (1, 5) and np.isfinite(probs).all()

    other = make_model("lstm-ml", tmp_path / "lstm")
    r = subprocess.run(
        [sys.executable, str(recipe), str(tmp_path / "x"), str(a), str(other)], capture_output=True, text=True
    )
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert r.stderr.strip().startswith("average_models: error: ") and "only models of one architecture" in r.stderr
    assert not (tmp_path / "x").exists()


def test_averaging_a_cnn_with_the_deeper_one_grown_from_it_scales_the_appended_blocks(tmp_path):
    """A model deepened by train --init averages with the model it grew from: the shallow one counts as having
    the appended blocks doing nothing, so their batch-norm scale and shift are halved and the rest averaged."""
    import dataclasses
    import importlib.util
    from pathlib import Path

    import torch
    from safetensors.numpy import load_file

    from streamtag.backends import make_backend
    from streamtag.models import build_model
    from streamtag.models.io import load_model, save_model

    from .conftest import make_model

    recipe = Path(__file__).resolve().parents[1] / "recipes" / "average_models.py"
    spec = importlib.util.spec_from_file_location("average_models", recipe)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    shallow = make_model("cnn-ml", tmp_path / "shallow")
    cfg, small = load_model(shallow)
    deep_cfg = dataclasses.replace(cfg, arch_params={**cfg.arch_params, "dilations": [*small.dilations, 1]})
    torch.manual_seed(3)
    deep = build_model(deep_cfg)
    deep.load_state_dict(small.state_dict(), strict=False)
    new = len(small.dilations)
    with torch.no_grad():
        deep.norms[new].weight.fill_(0.6)
        deep.norms[new].bias.fill_(0.2)
    save_model(deep, deep_cfg, tmp_path / "deep")
    out = module.average_models([shallow, tmp_path / "deep"], tmp_path / "soup")
    avg = load_file(str(out / "model.safetensors"))
    np.testing.assert_allclose(avg[f"norms.{new}.weight"], 0.3, rtol=1e-6)
    np.testing.assert_allclose(avg[f"norms.{new}.bias"], 0.1, rtol=1e-6)
    np.testing.assert_allclose(avg["convs.0.weight"], small.state_dict()["convs.0.weight"].numpy(), rtol=1e-6)
    written = json.loads((out / "config.json").read_text())["arch_params"]
    assert written["dilations"] == deep_cfg.arch_params["dilations"]

    # an appended block that does nothing: the average computes what the shallow model computes
    with torch.no_grad():
        deep.norms[new].weight.zero_()
        deep.norms[new].bias.zero_()
    save_model(deep, deep_cfg, tmp_path / "idle")
    out = module.average_models([tmp_path / "idle", shallow], tmp_path / "idle_soup")
    audio = np.random.default_rng(0).normal(0, 0.1, (1, 1600)).astype(np.float32)
    np.testing.assert_allclose(make_backend("torch", out)(audio), make_backend("torch", shallow)(audio), atol=1e-5)


def test_the_split_keeps_sources_apart_and_unlabelled_or_lone_classes_in_training(class_folders, tmp_path):
    """No recording on both sides (--val-fold with a shared group), a class of one clip trains (it used to be
    the whole of its validation fold, then 'no training signal'), and a label map without a header keeps its
    first row; a manifest row without a label is one line."""
    import argparse

    from streamtag.cli.train import _split
    from streamtag.training.datasets import load_dataset
    from streamtag.training.teacher import read_label_map

    rows = ["path,label,fold,group"]
    for name in ("dog", "rain", "chainsaw"):
        for i, f in enumerate(sorted((class_folders / name).iterdir())):
            rows.append(f"{f},{name},{i % 2},{name}-{i // 2}")  # groups of two clips, one in each fold
    manifest = tmp_path / "m.csv"
    manifest.write_text("\n".join(rows) + "\n")
    data = load_dataset(manifest)
    args = argparse.Namespace(no_val=False, val_fold=1, seed=0)
    train_idx, val_idx = _split(data, args)
    assert not {data.clips[i].group for i in train_idx} & {data.clips[i].group for i in val_idx}
    lone = tmp_path / "lone"
    shutil.copytree(class_folders, lone)
    (lone / "cat").mkdir()
    shutil.copy(next((class_folders / "dog").iterdir()), lone / "cat" / "only.wav")
    data = load_dataset(lone)
    train_idx, val_idx = _split(data, argparse.Namespace(no_val=False, val_fold=None, seed=0))
    assert "cat" in {data.clips[i].label for i in train_idx} and "cat" not in {data.clips[i].label for i in val_idx}
    table = tmp_path / "map.tsv"
    table.write_text("dog\tDog|Bark\tdog_bark\nrain\tRain\t\n")
    assert read_label_map(table).canonical("dog_bark") == "dog"
    broken = tmp_path / "broken.csv"
    broken.write_text(f"path,label\n{next((class_folders / 'dog').iterdir())}\n")
    r = run_cli("train", broken, "--out", tmp_path / "o")
    assert r.returncode == 2 and "broken.csv:2: every row needs a path and a label" in r.stderr, r.stderr


def test_eval_of_a_class_the_model_lacks_and_of_one_class(class_folders, cnn_dir, tmp_path):
    """A dataset class the model lacks counts as errors without a traceback in the baseline or a wrong row in the
    confusion matrix; one class alone is scored over every model class (an argmax among one is always right)."""
    data = tmp_path / "data"
    shutil.copytree(class_folders, data)
    shutil.copytree(class_folders / "dog", data / "cat")  # a class cnn_dir has not got
    r = run_cli("eval", cnn_dir, data, "--baseline-folds", "2", "--report", tmp_path / "r")
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr
    report = json.loads((tmp_path / "r" / "report.json").read_text())
    confusion = np.array(report["metrics"]["confusion"])
    assert confusion.sum() == 18  # the 18 clips of known classes, the 6 cat clips in no row
    shutil.copytree(class_folders / "dog", tmp_path / "one" / "dog")
    r = run_cli("eval", cnn_dir, tmp_path / "one", "--baseline-folds", "0", "--report", tmp_path / "r1")
    assert r.returncode == 0 and "accuracy is the argmax over all 5" in r.stderr, r.stderr


def test_event_stream_tells_a_sound_named_late_from_one_never_named(tmp_path, monkeypatch):
    """The isolated-sounds figure: a sound whose event opens 0.6 s in is not *found* (onset within 0.3 s) but is
    *heard*; one never named is neither; and the report says both, with how high each label rose."""
    from types import SimpleNamespace

    from streamtag.training import evaluate

    rate, hop = 16000, 160
    rng = np.random.default_rng(0)
    paths = []
    for name in ("a", "b", "c"):
        paths.append(tmp_path / f"{name}.wav")
        sf.write(paths[-1], rng.uniform(-0.5, 0.5, rate).astype(np.float32), rate)
    feats = SimpleNamespace(sample_rate=rate, hop_length=hop, frame_seconds=hop / rate)
    backend = SimpleNamespace(config=SimpleNamespace(features=feats), labels=["dog", "cat"])

    def scores(backend, samples):  # dog on time, then once more within it; cat 0.6 s late; the second dog never
        frames = samples.size // hop
        loud = np.abs(samples[: frames * hop]).reshape(frames, hop).max(1) > 0.01
        starts = np.flatnonzero(np.diff(loud.astype(int)) == 1) + 1
        probs = np.zeros((frames, 2), np.float32)
        probs[starts[0] : starts[0] + 40, 0] = 0.9
        probs[starts[0] + 80 : starts[0] + 95, 0] = 0.9  # a second event of the same sound: an extra alert
        probs[starts[1] + 60 : starts[1] + 95, 1] = 0.9
        return probs

    monkeypatch.setattr(evaluate, "stream_probs", scores)
    got = evaluate.event_stream(backend, paths, ["dog", "cat", "dog"])
    assert (got["sounds"], got["found"], got["heard"]) == (3, 1, 2)
    assert [(r["found"], r["heard"]) for r in got["placed"]] == [(True, True), (False, True), (False, False)]
    assert got["placed"][1]["onset_delay_s"] == pytest.approx(0.6, abs=0.02)
    assert [r["peak"] for r in got["placed"]] == pytest.approx([0.9, 0.9, 0.0])
    text = "\n".join(evaluate.event_stream_lines(got))
    assert "1 of 3 sounds found" in text and "named at all" in text and ": 2 of 3" in text
    assert got["false_events"] == 1 and "1 other events (dog)" in text  # the late cat is named, not "other"
    assert "0.3 s before the sound to 1 s after its end" in text
    assert "not found within 0.3 s" in text and "cat 0.90, dog 0.00" in text  # with how near each label came


def _plan(batch: int = 4, frames: int = 120, bands: int = 8, value: float = 2.0):
    from streamtag.training.augment import Plan

    plan = Plan.empty(batch, frames, bands, 3, 0)
    plan.x[:] = value
    plan.y[:] = 0.0
    return plan


def test_each_augmentation_step_does_what_it_says():
    """The batch augmentation, step by step on hand-made plans: a recording mixed at its SNR, the band limit,
    the reverberation tail (the recursive filter it stands for, to float precision), the noise floor, the gain
    as a pure shift above the floor, the quiet lead, the level estimate's start and the SpecAugment masks."""
    from streamtag.training.augment import DB, augment

    floor, bands = float(np.log(1e-9)), np.zeros(8, np.float32)

    def run(plan, settled=300.0):
        x, y, level0 = augment(plan, floor, bands, 0.01, settled)
        return x.numpy(), y.numpy(), level0.numpy()

    plan = _plan()
    plan.mixed, plan.under, plan.snr_db = np.array([1]), np.full((1, 120, 8), -3.0, np.float32), np.array([6.0])
    plan.cut[2] = 5
    plan.gain_db[3] = -20.0
    x, _, level0 = run(plan)
    assert np.allclose(x[1], 2.0 + np.log1p(10**-0.6), atol=1e-5)  # 6 dB under: its level, whatever it was
    assert np.allclose(x[2, :, :5], 2.0) and np.allclose(
        x[2, :, 5:], floor + np.log(2)
    )  # the floor, plus the gain's floor
    assert np.allclose(x[3], np.logaddexp(2.0 - 20 * DB, floor), atol=1e-5)
    assert np.allclose(x[0], 2.0) and not level0.any()

    plan = _plan()  # reverberation: against tail[t] = a tail[t-1] + (1 - a) p[t], in float64
    plan.x[0] = np.random.default_rng(0).normal(-4.0, 2.0, size=(120, 8))
    plan.rt60[0], plan.wet_db[0] = 0.5, -3.0
    x, _, _ = run(plan)
    a, p = np.exp(-6.9 * 0.01 / 0.5), np.exp(plan.x[0].astype(np.float64))
    tail, acc = np.empty_like(p), np.zeros(8)
    for t in range(120):
        acc = a * acc + (1 - a) * p[t]
        tail[t] = acc
    np.testing.assert_allclose(x[0], np.log(p + 10**-0.3 * tail), atol=1e-4)
    assert np.allclose(x[1:], 2.0)

    plan = _plan(value=floor)  # the noise floor: about its level above silence, and never the same twice
    plan.noise_db[0], plan.noise_db[1] = -50.0, -70.0
    x, _, _ = run(plan)
    assert abs(x[0].mean() - x[1].mean() - 20 * DB) < 0.1 and x[0].std() > 0.1
    assert np.allclose(x[2:], floor + np.log(2))

    plan = _plan()  # the quiet lead, the level estimate's start, the masks
    plan.lead[0], plan.lead_noise_db[0] = 30, -90.0
    plan.warm_db[1] = -10.0
    plan.masks = np.zeros((4, 1, 4), np.int64)
    plan.masks[2, 0] = 3, 2, 50, 10  # bands 3-4, frames 50-59
    x, _, level0 = run(plan)
    assert np.all(x[0, :30] < -15.0) and np.allclose(x[0, 30:], 2.0)
    assert np.allclose(level0[1], [2.0 - 10 * DB, 300.0]) and not level0[[0, 2, 3]].any()
    masked = np.zeros((120, 8), bool)
    masked[:, 3:5] = masked[50:60] = True
    assert np.all(x[2][masked] == floor) and np.allclose(x[2][~masked], 2.0)


def test_a_drawn_batch_augmented_in_the_training_process_is_the_one_a_worker_makes():
    """Training on a GPU, batch workers only draw and the GPU augments; the batch is the one a worker would
    have made whole (to the float16 the workers send), and a plan augments alike every time."""
    from streamtag.training.trainer import BatchMaker, TrainOptions, _Batches

    rng = np.random.default_rng(0)
    feats = [rng.normal(-5.0, 1.0, size=(400, 64)).astype(np.float32) for _ in range(6)]
    hard = np.eye(3, dtype=np.float32)[[0, 1, 2, 0, 1, 2]]
    opts = TrainOptions(batch_size=8, quiet_lead_p=0.3, band_limit_p=0.5)
    batches = _Batches(feats, hard, None, opts, -20.7, np.random.default_rng(1), np.zeros(64, np.float32))
    plan = batches.draw()
    first, again = batches.augment(plan), batches.augment(plan)
    for u, v in zip(first, again):
        np.testing.assert_array_equal(u.numpy(), v.numpy())
    with BatchMaker(batches, 2) as whole:
        made = list(whole.epoch(3, 0, 3))
    with BatchMaker(batches, 2) as drawing:
        drawing._augment_here = True  # what a GPU run does, here on the CPU
        augmented_here = list(drawing.epoch(3, 0, 3))
    for (x, y, lv), (x2, y2, lv2) in zip(made, augmented_here):
        np.testing.assert_allclose(x.numpy(), x2.numpy(), atol=0.05)
        np.testing.assert_allclose(y.numpy(), y2.numpy(), atol=1e-3)
        np.testing.assert_allclose(lv.numpy(), lv2.numpy(), atol=0.05)
    assert not np.allclose(made[0][0].numpy(), made[1][0].numpy())


@pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="needs a CUDA GPU")
def test_a_plan_augments_on_a_gpu_as_on_the_cpu():
    """The same plan on the GPU: the same batch but for the noise, whose generator is the device's."""
    from streamtag.training.trainer import TrainOptions, _Batches

    rng = np.random.default_rng(0)
    feats = [rng.normal(-5.0, 1.0, size=(400, 64)).astype(np.float32) for _ in range(6)]
    hard = np.eye(3, dtype=np.float32)[[0, 1, 2, 0, 1, 2]]
    opts = TrainOptions(batch_size=16, noise_floor_p=0.0, quiet_lead_p=0.0, reverb_p=0.5)
    batches = _Batches(feats, hard, None, opts, -20.7, np.random.default_rng(1), np.zeros(64, np.float32))
    plan = batches.draw()
    for u, v in zip(batches.augment(plan), batches.augment(plan, "cuda")):
        np.testing.assert_allclose(u.numpy(), v.cpu().numpy(), atol=1e-3)


def test_the_confusion_plot_shows_the_dataset_s_classes(tmp_path):
    """A 3-class dataset scored by the 57-class bundled model drew a 57 x 57 matrix of empty rows and columns (its
    argmax is among the dataset's classes)."""
    pytest.importorskip("matplotlib")
    import matplotlib.image

    from streamtag.training.evaluate import plot_report

    labels = [f"class{i}" for i in range(57)]
    confusion = np.zeros((57, 57), int)
    confusion[[3, 9, 20], [3, 20, 20]] = 1
    metrics = {"time_to_detect": {"1": 0.5}, "confusion": confusion.tolist(), "labels": labels}
    plot_report({"metrics": {**metrics, "per_class": {labels[i]: {} for i in (3, 9, 20)}}}, tmp_path)
    small = matplotlib.image.imread(tmp_path / "confusion.png").shape
    plot_report({"metrics": {**metrics, "per_class": {x: {} for x in labels}}}, tmp_path)
    assert small[1] < 0.6 * matplotlib.image.imread(tmp_path / "confusion.png").shape[1]
