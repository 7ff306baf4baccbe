"""Knowledge distillation end to end on a tiny synthetic teacher made here: targets cached, loss falls,
the student exports and replays; teacher windows line up causally with frames; multi-label datasets."""

import csv
import json
import warnings

import numpy as np
import pytest
import soundfile as sf
import torch

from streamtag.training.datasets import combine, load_dataset
from streamtag.training.teacher import Teacher, read_label_map

from .conftest import EXAMPLES, read_clip, run_cli


class _TinyTeacher(torch.nn.Module):
    """wav32k (batch, samples) -> 3 sigmoid scores: loud, quiet, never (a stand-in for an AudioSet tagger)."""

    def forward(self, wav: torch.Tensor) -> torch.Tensor:
        level = torch.log10(wav.pow(2).mean(dim=1, keepdim=True) + 1e-10)
        loud = torch.sigmoid(4.0 * (level + 3.0))
        return torch.cat([loud, 1.0 - loud, torch.full_like(loud, 0.01)], dim=1)


def _export(folder) -> None:
    torch.onnx.export(
        _TinyTeacher(),
        (torch.zeros(2, 32000),),
        str(folder / "tiny.onnx"),
        input_names=["wav32k"],
        output_names=["scores"],
        dynamic_axes={"wav32k": {0: "batch", 1: "samples"}, "scores": {0: "batch"}},
        opset_version=17,
        dynamo=False,
    )


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("teacher")
    with warnings.catch_warnings():  # the legacy exporter warns that it is legacy
        warnings.simplefilter("ignore")
        _export(folder)
    with open(folder / "audioset_labels.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["index", "mid", "display_name"])
        for i, name in enumerate(["Loud", "Quiet", "Never"]):
            w.writerow([i, f"/m/{i}", name])
    (folder / "map.tsv").write_text(
        "label\taudioset_display_names\taliases\nchainsaw\tLoud\t\nrain\tQuiet\t\nhum\tNever\t\ndog\t\tdog_bark\n"
    )
    return folder


@pytest.fixture(scope="module")
def small_data(tmp_path_factory):
    """Two labelled datasets with an alias (dog_bark -> dog) and a folder of unlabelled audio."""
    root = tmp_path_factory.mktemp("distill_data")
    rng = np.random.default_rng(0)
    for ds, names in (("a", ("dog", "rain")), ("b", ("dog_bark", "chainsaw"))):
        for name in names:
            audio = read_clip(EXAMPLES / f"{name.removesuffix('_bark')}.flac")
            (root / ds / name).mkdir(parents=True)
            for k in range(3):
                start = int(rng.integers(0, audio.size - 16000 * 2))
                sf.write(root / ds / name / f"{k}.flac", audio[start : start + 16000 * 2], 16000)
    (root / "unlabelled").mkdir()
    for k, name in enumerate(("rain", "chainsaw")):
        sf.write(root / "unlabelled" / f"{k}.wav", read_clip(EXAMPLES / f"{name}.flac")[: 16000 * 4], 16000)
    return root


def test_frame_targets_follow_the_window_that_has_just_ended(teacher_dir):
    teacher = Teacher(teacher_dir / "tiny.onnx", window_s=2.0, hop_s=0.5, min_s=1.0)
    ends = teacher.window_ends(2.3)
    np.testing.assert_allclose(ends, [1.0, 1.5, 2.0, 2.3])
    windows = {"ends": ends, "scores": np.array([[0.1, 0, 0], [0.2, 0, 0], [0.3, 0, 0], [0.4, 0, 0]], np.float16)}
    mapping = [np.array([0]), np.array([], dtype=np.int64)]
    target = Teacher.frame_targets(windows, 230, 0.01, mapping)
    assert target.shape == (230, 2) and np.isnan(target[:, 1]).all()  # no mapping: unknown, left out of the loss
    np.testing.assert_allclose(
        target[[0, 99, 100, 149, 150, 199, 200, 229], 0], [0.1, 0.1, 0.2, 0.2, 0.3, 0.3, 0.4, 0.4], atol=1e-3
    )
    np.testing.assert_allclose(Teacher.frame_targets(windows, 30, 0.01, mapping, first=140)[:, 0], target[140:170, 0])


def test_combined_datasets_know_which_classes_a_clip_lacks(small_data, teacher_dir):
    label_map = read_label_map(teacher_dir / "map.tsv")
    a, b = load_dataset(small_data / "a"), load_dataset(small_data / "b")
    ds = combine([a, b], label_map.aliases, extra_labels=("hum",))
    assert ds.labels == ["chainsaw", "dog", "hum", "rain"]
    hard = ds.hard_targets()
    dog_from_b = next(i for i, c in enumerate(ds.clips) if c.label == "dog" and c.source.endswith(":b"))
    # dataset b names dog and chainsaw only: it says nothing of rain or hum
    assert hard[dog_from_b].tolist()[:2] == [0.0, 1.0] and np.isnan(hard[dog_from_b][[2, 3]]).all()


def test_distillation_end_to_end(small_data, teacher_dir, tmp_path):
    out = tmp_path / "student"
    args = [
        "train", small_data / "a", small_data / "b",
        "--teacher", teacher_dir / "tiny.onnx", "--label-map", teacher_dir / "map.tsv",
        "--teacher-labels", "hum", "--unlabelled", small_data / "unlabelled",
        "--arch-param", "hidden=16", "--arch-param", "dilations=[1,2]", "--arch-param", "pool_seconds=[0.5]",
        "--epochs", "4", "--steps-per-epoch", "6", "--batch-size", "8", "--lr", "0.01",
        "--no-val", "--quiet", "--out", out,
    ]  # fmt: skip
    done = run_cli(*args, timeout=600)
    assert done.returncode == 0, done.stderr
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["output"] == "sigmoid" and cfg["labels"] == ["chainsaw", "dog", "hum", "rain"]
    assert cfg["arch_params"]["level_seconds"] == 3.0
    import os
    from pathlib import Path

    from streamtag.training.datasets import content_digest

    cached = list((Path(os.environ["STREAMTAG_CACHE"]) / "teacher").glob("*.npz"))
    audio = [p for p in small_data.rglob("*") if p.suffix in (".flac", ".wav")]
    assert len(audio) == 14 and len(cached) >= len({content_digest(p) for p in audio})  # each distinct file once
    history = json.loads((out / "train_log.json").read_text())["history"]
    assert history[-1]["loss"] < history[0]["loss"]
    trained_on = (out / "trained_on.txt").read_text().splitlines()
    assert len(trained_on) == 14 and all("\t" in line for line in trained_on)
    events = tmp_path / "ev.jsonl"
    replay = run_cli("replay", EXAMPLES / "chainsaw.flac", "--model", out, "--fast", "--events", events)
    assert replay.returncode == 0, replay.stderr
    rows = [json.loads(line) for line in events.read_text().splitlines()]
    assert sum(r["type"] == "open" for r in rows) == sum(r["type"] == "close" for r in rows)

    # eval against the teacher, per source group: which group a class is heard weakly or wrongly in
    manifest = tmp_path / "agree.csv"
    u = small_data / "unlabelled"
    manifest.write_text(f"path,group\n{u / '0.wav'},rainy\n{u / '1.wav'},saws\n{small_data / 'a/rain/0.flac'},rainy\n")
    report_dir = tmp_path / "report"
    done = run_cli(
        "eval", out, small_data / "a", "--teacher", teacher_dir / "tiny.onnx", "--label-map", teacher_dir / "map.tsv",
        "--agreement-audio", manifest, "--agreement-audio", u, "--baseline-folds", "0", "--report", report_dir,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    agreement = json.loads((report_dir / "report.json").read_text())["teacher_agreement"]
    assert agreement["per_class"] and set(agreement["per_group"]) == {"rainy", "saws", str(u)}  # a folder: one group
    assert sum(g["frames"] for g in agreement["per_group"].values()) == agreement["frames"]
    for label, whole in agreement["per_class"].items():
        assert sum(g[label]["positives"] for g in agreement["per_group"].values()) == whole["positives"]
        for g in agreement["per_group"].values():
            assert all(x is None or 0.0 <= x <= 1.0 for x in (g[label]["mean_on_positives"], g[label]["mean_on_rest"]))
    assert "| group | frames | class |" in (report_dir / "report.md").read_text()


def test_teacher_options_need_a_teacher(small_data, tmp_path):
    for option in (["--teacher-labels", "speech"], ["--unmapped-negatives"]):
        done = run_cli("train", small_data / "a", *option, "--out", tmp_path / "m")
        assert done.returncode == 2 and "need --teacher" in done.stderr and "Traceback" not in done.stderr
    done = run_cli("train", small_data / "a", "--teacher", tmp_path / "nope.onnx", "--out", tmp_path / "m")
    assert done.returncode == 2 and "nope.onnx" in done.stderr and "Traceback" not in done.stderr


def test_caches_follow_the_audio_not_its_path_or_time(teacher_dir, tmp_path, monkeypatch):
    """A dataset and teacher copied elsewhere (new paths, new times: ../shared is provisioned afresh for every
    session) reuse the cached teacher scores and features: nothing is decoded again."""
    import shutil

    from streamtag.config import FeatureConfig
    from streamtag.sources import file as file_source
    from streamtag.training.datasets import Clip, Dataset, compute_features

    clip = tmp_path / "a" / "rain.flac"
    clip.parent.mkdir()
    shutil.copy(EXAMPLES / "rain.flac", clip)
    cache = tmp_path / "cache"
    first = Teacher(teacher_dir / "tiny.onnx", cache=cache / "teacher").windows(clip, 32000)
    feats = compute_features(Dataset([Clip(clip, "rain", 0, "g")], ["rain"], "d"), FeatureConfig(), cache / "features")[
        0
    ]
    moved = tmp_path / "b"
    shutil.copytree(tmp_path / "a", moved)  # copytree keeps times; touch them too
    shutil.copytree(teacher_dir, tmp_path / "teacher2")
    for p in [moved / "rain.flac", tmp_path / "teacher2" / "tiny.onnx"]:
        p.touch()

    def no_decoding(*args, **kwargs):
        raise AssertionError("decoded again: the cache was missed")

    monkeypatch.setattr(file_source, "read_audio", no_decoding)
    again = Teacher(tmp_path / "teacher2" / "tiny.onnx", cache=cache / "teacher").windows(moved / "rain.flac", 32000)
    np.testing.assert_array_equal(again["scores"], first["scores"])
    moved_set = Dataset([Clip(moved / "rain.flac", "rain", 0, "g")], ["rain"], "d")
    moved_feats = compute_features(moved_set, FeatureConfig(), cache / "features")
    np.testing.assert_array_equal(moved_feats[0], feats)


def test_a_training_pack_carries_the_prepared_data_and_trains_elsewhere(small_data, teacher_dir, tmp_path):
    """recipes/train_pack.py: what `train` prepares (features, teacher targets, labels, groups) survives the
    pack to within the quantiser's half step, a share of the unlabelled audio keeps every group, and the pack
    trains a model folder with batch workers, as on a GPU machine without the audio."""
    import importlib.util
    import subprocess
    import sys
    from pathlib import Path

    from streamtag.cli.train import _options, load_training_data
    from streamtag.modelfile import cache_dir
    from streamtag.training.trainer import prepare

    recipe = Path(__file__).resolve().parents[1] / "recipes" / "train_pack.py"
    spec = importlib.util.spec_from_file_location("train_pack", recipe)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    (tmp_path / "more").mkdir()
    for k in range(4):  # a second unlabelled group, four files
        sf.write(tmp_path / "more" / f"{k}.wav", read_clip(EXAMPLES / "dog.flac")[k * 8000 : k * 8000 + 48000], 16000)
    manifest = tmp_path / "unlabelled.csv"
    rows = [f"{small_data / 'unlabelled' / f'{k}.wav'},rain_pkg" for k in range(2)]
    rows += [f"{tmp_path / 'more' / f'{k}.wav'},dog_pkg" for k in range(4)]
    manifest.write_text("path,group\n" + "\n".join(rows) + "\n")
    train_args = [
        str(small_data / "a"), str(small_data / "b"), "--unlabelled", str(manifest),
        "--teacher", str(teacher_dir / "tiny.onnx"), "--label-map", str(teacher_dir / "map.tsv"),
        "--teacher-labels", "hum", "--arch-param", "hidden=16", "--arch-param", "dilations=[1,2]",
        "--steps-per-epoch", "3", "--batch-size", "4", "--no-val",
    ]  # fmt: skip
    pack = tmp_path / "data.npz"
    done = subprocess.run(
        [sys.executable, str(recipe), "pack", "--unlabelled-hours", "0.001", str(pack), *train_args],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr
    packed, opts = module.load(pack, {"epochs": 2})
    assert opts.epochs == 2 and opts.steps_per_epoch == 3 and opts.arch_params["dilations"] == [1, 2]

    from streamtag.cli import build_parser

    args = build_parser().parse_args(["train", *train_args, "--out", str(tmp_path / "unused")])
    dataset, teacher, label_map = load_training_data(args)
    every = np.arange(len(dataset.clips))
    here = prepare(dataset, every, [], _options(args), cache_dir() / "features", teacher, label_map)
    assert set(packed.groups) == set(here.groups)  # every unlabelled package keeps a clip
    assert len(packed.feats) < len(here.feats)  # but not every clip: 0.001 h asked for
    labelled = np.nan_to_num(here.hard, nan=0.0).max(1) > 0
    assert len(packed.feats) >= labelled.sum()  # every labelled clip is kept
    assert set(packed.clips) < set(here.clips)  # trained_on.txt lists what the pack holds
    # match packed clips to prepared ones by their features' shape and content
    for k, x in enumerate(packed.feats):
        matches = [j for j, y in enumerate(here.feats) if y.shape == x.shape and np.abs(y - x).max() <= 0.125 + 1e-4]
        assert matches, f"packed clip {k} matches no prepared clip within half a step"
        j = matches[0]
        np.testing.assert_array_equal(packed.hard[k], here.hard[j])
        mine, theirs = packed.soft(k, 3, 50), here.soft(j, 3, 50)
        np.testing.assert_array_equal(np.isnan(mine), np.isnan(theirs))
        np.testing.assert_allclose(mine[~np.isnan(mine)], theirs[~np.isnan(theirs)], atol=1e-3)
    out = tmp_path / "model"
    done = subprocess.run(
        [sys.executable, str(recipe), "train", str(pack), str(out), "--set", "epochs=2", "--set", "loader_workers=2"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr
    history = json.loads((out / "train_log.json").read_text())["history"]
    assert [row["epoch"] for row in history] == [1, 2]
    replay = run_cli("replay", EXAMPLES / "dog.flac", "--model", out, "--fast", "--quiet")
    assert replay.returncode == 0, replay.stderr
    wrong = subprocess.run(
        [sys.executable, str(recipe), "train", str(pack), str(out), "--set", "epoks=2"], capture_output=True, text=True
    )
    assert wrong.returncode != 0 and "no training option 'epoks'" in wrong.stderr
    for extra, said in (
        (["--set", "device=cuda"], "the value is not JSON"),
        (["--minutes", "1", "--set", "steps_per_epoch=0"], "--minutes needs a number of steps an epoch"),
    ):
        wrong = subprocess.run(
            [sys.executable, str(recipe), "train", str(pack), str(out), *extra], capture_output=True, text=True
        )
        assert wrong.returncode != 0 and said in wrong.stderr and "Traceback" not in wrong.stderr, wrong.stderr
