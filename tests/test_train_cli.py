"""What train and eval say about a new user's data and flags: one line, before any work, never a wrong model."""

import csv
import json
import shutil
import signal

import numpy as np
import pytest
import soundfile as sf

from streamtag.cli import main
from streamtag.errors import ConfigError, DatasetError
from streamtag.training.datasets import combine, load_dataset

from .conftest import EXAMPLES, read_clip, run_cli

FAST = ["--epochs", "1", "--steps-per-epoch", "2", "--batch-size", "8", "--threads", "1", "--quiet"]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """Three classes of three 1 s clips each, cut from the repo's examples."""
    root = tmp_path_factory.mktemp("tiny")
    for name in ("chainsaw", "dog", "rain"):
        audio = read_clip(EXAMPLES / f"{name}.flac")
        (root / name).mkdir()
        for k in range(3):
            sf.write(root / name / f"{name}{k}.wav", audio[k * 16000 : (k + 1) * 16000], 16000)
    return root


@pytest.fixture
def cli(capsys):
    """``streamtag ARGS`` in this process: (exit status, stderr); the signal handlers train sets are put back."""
    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}

    def call(*args):
        capsys.readouterr()
        code = main([str(a) for a in args])
        return code, capsys.readouterr().err

    yield call
    for sig, handler in saved.items():
        signal.signal(sig, handler)


def _manifest(path, rows, header=("path", "label"), **open_args):
    with open(path, "w", newline="", **open_args) as f:
        w = csv.writer(f, **({"lineterminator": "\r\n"} if open_args else {}))
        w.writerow(header)
        w.writerows(rows)
    return path


def test_resume_refuses_other_classes_or_clips_and_drops_stale_graphs(folders, tmp_path, cli):
    from streamtag.training.trainer import TrainOptions, train

    out = tmp_path / "model"
    ds = combine([load_dataset(folders)])
    opts = TrainOptions(arch_params={"hidden": 8}, epochs=2, batch_size=8, steps_per_epoch=2)

    def stop(line):  # as a Ctrl-C in the second epoch: the first one's checkpoint is saved
        if json.loads(line)["epoch"] == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(ds, np.arange(len(ds.clips)), [], opts, out, progress=False, log=stop)
    assert (out / "trained_on.txt").read_text().count("\n") == 9  # written with the first save: eval knows its clips

    common = ["--arch-param", "hidden=8", "--epochs", "2", "--steps-per-epoch", "2", "--batch-size", "8"]
    common += ["--threads", "1", "--quiet", "--no-val", "--resume", "--out", out]
    other = tmp_path / "other.csv"
    _manifest(other, [[p, "bird" if p.parent.name == "rain" else p.parent.name] for p in folders.rglob("*.wav")])
    code, err = cli("train", other, *common)
    assert code == 2 and "classes" in err and "Traceback" not in err
    fewer = tmp_path / "fewer.csv"
    _manifest(fewer, [[p, p.parent.name] for p in sorted(folders.rglob("*.wav"))[1:]])
    code, err = cli("train", fewer, *common)
    assert code == 2 and "other clips" in err

    (out / "model.onnx").write_text("a graph of the earlier weights")
    code, err = cli("train", folders, *common)
    assert code == 0, err
    assert not (out / "model.onnx").exists()
    assert [row["epoch"] for row in json.loads((out / "train_log.json").read_text())["history"]] == [1, 2]
    code, err = cli("train", folders, *common)  # a finished run: it saved the same model again, without a word
    assert code == 2 and "finished all its 2 epochs; nothing is left to train" in err and f"--init {out}" in err


def test_a_class_folder_given_as_the_dataset_names_the_folder_above(folders, cli, tmp_path):
    code, err = cli("train", folders / "dog", *FAST, "--out", tmp_path / "m")
    assert code == 2 and "(audio files, but no class folders); give the folder above it" in err, err


def test_train_renames_labels_by_the_packaged_map_as_eval_does(folders, tmp_path, cli):
    barks = tmp_path / "barks.csv"
    _manifest(barks, [[p, "dog_bark"] for p in (folders / "dog").iterdir()])
    code, err = cli("train", folders, barks, "--arch-param", "hidden=8", *FAST, "--out", tmp_path / "m")
    assert code == 0, err
    assert "dog_bark -> dog" in err
    assert "every clip is a group of its own here" in err  # a folder dataset, a manifest without groups
    grouped = _manifest(tmp_path / "g.csv", [[p, p.parent.name, p.stem[-1]] for p in folders.rglob("*.wav")],
                        header=("path", "label", "group"))  # fmt: skip
    code, err = cli("train", grouped, "--arch-param", "hidden=8", *FAST, "--out", tmp_path / "g")
    assert code == 0 and "group of its own" not in err, err
    assert json.loads((tmp_path / "m" / "config.json").read_text())["labels"] == ["chainsaw", "dog", "rain"]


def test_eval_keeps_a_label_the_model_has_itself():
    from streamtag.training.datasets import Clip, Dataset
    from streamtag.training.evaluate import dataset_targets
    from streamtag.training.teacher import read_label_map

    ds = Dataset([Clip(EXAMPLES / "dog.flac", "dog_bark", None, "a")], ["dog_bark"], "d")
    targets, _, _, unknown = dataset_targets(ds, ["dog_bark", "rain"], read_label_map())
    assert targets.tolist() == [0] and unknown == []  # a model trained before train renamed it


def test_folder_datasets_skip_hidden_files_and_say_what_they_pass_over(folders, tmp_path):
    root = tmp_path / "mac"
    for name in ("dog", "rain"):
        (root / name).mkdir(parents=True)
        for f in (folders / name).iterdir():
            (root / name / f.name).write_bytes(f.read_bytes())
    (root / "dog" / "._dog0.wav").write_bytes(b"\0\5\26\7 AppleDouble")  # macOS metadata, not audio
    (root / ".Trashes").mkdir()
    (root / ".Trashes" / "x.wav").write_bytes(b"junk")
    (root / "owl").mkdir()
    (root / "owl" / "hoot.m4a").write_bytes(b"m4a")
    (root / "cat").mkdir()
    (root / "stray.wav").write_bytes((folders / "dog" / "dog0.wav").read_bytes())  # beside the class folders
    (root / "._stray.wav").write_bytes(b"\0\5\26\7 AppleDouble")
    ds = load_dataset(root)
    assert ds.labels == ["dog", "rain"] and len(ds.clips) == 6
    notes = " ".join(ds.notes)
    assert ".m4a" in notes and "owl" in notes and "cat" in notes
    assert "1 audio file beside the class folders (e.g. stray.wav) left out" in notes  # it was left out unsaid


def test_too_few_classes_says_what_was_left_out(folders, tmp_path):
    """ "need at least 2 classes (1 found)" for a folder whose other class held only files the reader does not
    take: the notes that said why were printed only once a dataset had loaded."""
    root = tmp_path / "ds"
    shutil.copytree(folders / "dog", root / "dog")
    (root / "kazoo").mkdir()
    (root / "kazoo" / "k.m4a").write_bytes(b"\0" * 64)
    with pytest.raises(DatasetError, match=r"\(1 found\); .*1 file skipped, the reader does not take .m4a"):
        load_dataset(root)


def test_manifest_labels_are_trimmed_merged_per_file_and_read_from_excel(folders, tmp_path):
    dog, rain = sorted((folders / "dog").iterdir()), sorted((folders / "rain").iterdir())
    rows = [[p, "dog"] for p in dog] + [[p, "rain "] for p in rain[:2]] + [[rain[2], "rain"]]
    rows += [[dog[0], "rain"], [dog[1], "dog"]]  # dog0 holds rain too; dog1 listed twice
    ds = load_dataset(_manifest(tmp_path / "m.csv", rows))
    assert ds.labels == ["dog", "rain"] and len(ds.clips) == 6
    hard = ds.hard_targets()
    assert hard[0].tolist() == [1.0, 1.0] and hard[1].tolist() == [1.0, 0.0]  # one clip, two labels
    assert any("listed before" in n for n in ds.notes)
    with pytest.raises(DatasetError, match="differ only by case"):
        load_dataset(_manifest(tmp_path / "c.csv", [[dog[0], "Rain"], [dog[1], "rain"]]))
    excel = _manifest(tmp_path / "x.csv", [[p, "dog"] for p in dog] + [[p, "rain"] for p in rain], encoding="utf-8-sig")
    assert excel.read_bytes().startswith(b"\xef\xbb\xbfpath,label\r\n")
    assert len(load_dataset(excel).clips) == 6
    # Excel's "Unicode text" (UTF-16, tab-separated) is read; its plain "CSV" in a Windows code page is one line
    lines = ["path\tlabel"] + [f"{p}\tdog" for p in dog] + [f"{p}\train" for p in rain]
    unicode_text = tmp_path / "u.csv"
    unicode_text.write_bytes("\r\n".join(lines).encode("utf-16"))
    assert len(load_dataset(unicode_text).clips) == 6
    cp1252 = tmp_path / "w.csv"
    cp1252.write_bytes(f"path,label\n{dog[0]},dog\n{dog[1]},d\u00e9g\n".encode("cp1252"))
    with pytest.raises(DatasetError, match=r"w.csv:3: not UTF-8 text \(byte 0xe9\); save it as \"CSV UTF-8\""):
        load_dataset(cp1252)
    unicode_text.rename(tmp_path / "u.txt")  # as Excel names it
    assert len(load_dataset(tmp_path / "u.txt").clips) == 6
    unmarked = tmp_path / "n.csv"
    unmarked.write_bytes("path,label\n".encode("utf-16-le"))
    with pytest.raises(DatasetError, match="UTF-16 text without a byte-order mark"):
        load_dataset(unmarked)


def test_a_label_map_without_tabs_is_refused(tmp_path):
    from streamtag.training.teacher import read_label_map

    bad = tmp_path / "map.tsv"
    bad.write_text("dog,Dog\n")
    with pytest.raises(ConfigError, match="no tab"):
        read_label_map(bad)


def test_bad_train_flags_are_one_line_before_any_work(folders, tmp_path, cli):
    out = ["--out", tmp_path / "m"]
    for flags, said in (
        (["--cv", "1"], "K >= 2"),
        (["--steps-per-epoch", "0"], "--steps-per-epoch must be >= 1"),
        (["--arch-param", "hidden=abc"], "hidden=abc is not a JSON value"),
        (["--arch-param", "nosuchkey=3"], "has no nosuchkey"),
        (["--arch-param", "pool_seconds=0.5,3"], "pool_seconds=[0.5,3]"),
        (["--arch-param", "hidden=0"], "--arch-param: hidden must be a whole number of channels, at least 1 (0 given)"),
        (["--device", "tpu"], "--device tpu: choose auto, cpu or cuda"),  # these three were torch's tracebacks
        (["--threads", "-1"], "--threads must be 1 or more"),
        (["--seed", "-1"], "--seed must be in 0.."),
        (["--audible-snr", "nan"], "--audible-snr must be 0 dB or more"),
        (["--cv", "2", "--jobs", "-2"], "--jobs must be 1 or more"),
        (["--cache", "/proc/streamtag-cache"], "cannot write the cache folder /proc/streamtag-cache"),
    ):
        code, err = cli("train", folders, *flags, *out)
        assert code == 2 and said in err and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    code, err = cli("train", folders, "--out", folders)  # the model's files among the audio
    assert code == 2 and "is the dataset folder" in err and not (folders / "config.json").exists(), err
    code, err = cli("train", folders, "--cv", "10", *FAST, *out)  # 9 recordings
    assert code == 2 and "2 <= K <= 9" in err
    assert not (tmp_path / "m" / "fold0").exists()
    code, err = cli("train", folders, "--init", "default", "--arch", "lstm", *FAST, *out)  # the bundled model's name
    assert code == 2 and "its architecture differs" in err, err  # found, then refused: not "not a model folder"
    assert not (tmp_path / "m").exists()  # nothing written for a run that never started (it left trained_on.txt)


def test_init_on_another_label_set_keeps_what_both_know_and_starts_new_classes_untrained(folders, tmp_path, cli):
    """Fine-tuning the bundled model on a user's own sounds was refused unless the data named all 57 of its
    classes: the shared classes' output rows come over by name, a new class starts untrained, the rest go."""
    from safetensors.numpy import load_file

    data = tmp_path / "data"
    shutil.copytree(folders, data)
    (data / "chainsaw").rename(data / "kazoo")
    out = tmp_path / "mine"
    code, err = cli("train", data, "--init", "default", *FAST, "--lr", "1e-12", "--no-val", "--out", out)
    assert code == 0, err
    assert "2 of its 57 classes go on as learned (dog, rain); 1 new class starts untrained (kazoo); 55 it had " in err
    bundled = json.loads((EXAMPLES.parent / "default_model" / "config.json").read_text())["labels"]
    assert json.loads((out / "config.json").read_text())["labels"] == ["dog", "kazoo", "rain"]
    before, after = (load_file(m / "model.safetensors") for m in (EXAMPLES.parent / "default_model", out))
    rows = after["head.proj.weight"]
    np.testing.assert_allclose(rows[0], before["head.proj.weight"][bundled.index("dog")], atol=1e-6)
    np.testing.assert_allclose(rows[2], before["head.proj.weight"][bundled.index("rain")], atol=1e-6)
    assert not np.allclose(rows[1], before["head.proj.weight"][bundled.index("chainsaw")], atol=1e-3)
    np.testing.assert_allclose(after["convs.0.weight"], before["convs.0.weight"], atol=1e-6)  # the body, whole


def test_eval_flags_checked_up_front(folders, tmp_path, cli, cnn_dir, monkeypatch):
    for flags, said in (
        (["--levels", "20"], "outside -60..0"),
        (["--levels=-100"], "-100 dB is outside -60..0"),  # taken, then refused by the engine after the clean pass
        (["--baseline-folds", "1"], "0 (no baseline) or >= 2"),
        (["--false-alarm-audio", tmp_path / "nosuch"], "--false-alarm-audio: unlabelled audio not found"),
        (["--teacher", tmp_path / "t.onnx"], "give that too, or drop --teacher"),  # was ignored without a word
        (["--expected", "dog"], "give that too, or drop it"),
    ):
        code, err = cli("eval", cnn_dir, folders, *flags, "--report", tmp_path / "r")
        assert code == 2 and said in err and len(err.strip().splitlines()) == 1, err
        assert not (tmp_path / "r").exists()
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "torch" else real(name, *a))
    code, err = cli("eval", cnn_dir, folders, "--baseline-folds", "2", "--report", tmp_path / "r")
    assert code == 2 and "--baseline-folds 0" in err and not (tmp_path / "r").exists()
    code, err = cli("eval", cnn_dir, folders, "--limit", "3", "--levels", "0", "--report", tmp_path / "r")
    assert code == 0, err  # too few clips for a baseline: torch is not needed


def test_eval_report_holds_its_warnings_and_no_stale_plots(folders, tmp_path, cnn_dir):
    data = tmp_path / "d.csv"
    _manifest(data, [[p, "siren" if p.stem.endswith("0") else p.parent.name] for p in folders.rglob("*.wav")])
    report = tmp_path / "report"
    report.mkdir()
    (report / "confusion.png").write_bytes(b"a plot of another model")
    (report / "report.json").write_text("{}")
    r = run_cli(
        "eval", cnn_dir, data, "--levels", "-10,-20", "--baseline-folds", "0", "--report", report,
        "--false-alarm-audio", folders / "rain",
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert not (report / "confusion.png").exists() and "replaced" in r.stderr
    saved = json.loads((report / "report.json").read_text())
    assert list(saved["levels"]) == ["-10", "-20"]
    assert saved["false_alarms"]["expected"] == []  # the model has neither speech nor music
    assert any("siren" in w for w in saved["warnings"])
    assert "siren" in (report / "report.md").read_text()


def test_agreement_without_a_counted_class_says_so_not_nan():
    from streamtag.training.evaluate import markdown

    m = {"clips": 1, "acc_last": 1.0, "acc_mean": 1.0, "macro_map": 1.0, "time_to_detect": {}, "per_class": {}}
    text = markdown(
        {"metrics": m, "teacher_agreement": {"files": 1, "frames": 9, "map": float("nan"), "per_class": {}}}
    )
    assert "nan" not in text and "no agreement to measure" in text


def test_a_model_trained_before_the_default_label_map_goes_on_under_its_own_labels(tmp_path, cli):
    """--init (or --resume) of a model trained as dog_bark, before train applied the packaged map by default: its
    labels are kept, not renamed to dog (which made the model refuse its own dataset)."""
    data = tmp_path / "data"
    for name, clip in (("dog_bark", "dog"), ("rain", "rain")):
        audio = read_clip(EXAMPLES / f"{clip}.flac")
        (data / name).mkdir(parents=True)
        for k in range(3):
            sf.write(data / name / f"{clip}{k}.wav", audio[k * 16000 : (k + 1) * 16000], 16000)
    plain_map = tmp_path / "map.tsv"
    plain_map.write_text("label\taudioset_display_names\taliases\nrain\tRain\t\n")
    old = tmp_path / "old"
    code, err = cli("train", data, "--out", old, "--label-map", plain_map, "--arch-param", "hidden=8", *FAST)
    assert code == 0, err
    assert json.loads((old / "config.json").read_text())["labels"] == ["dog_bark", "rain"]
    code, err = cli("train", data, "--out", tmp_path / "new", "--init", old, "--arch-param", "hidden=8", *FAST)
    assert code == 0 and "renamed" not in err, err
    assert json.loads((tmp_path / "new" / "config.json").read_text())["labels"] == ["dog_bark", "rain"]


def test_a_clip_with_two_labels_is_right_on_either_in_eval_accuracy():
    """Rows of one file make one clip with every label they give; eval's argmax counted only the first."""
    from streamtag.training.evaluate import metrics

    labels = ["dog", "rain", "wind"]
    probs = [np.tile([[0.1, 0.9, 0.0]], (5, 1)), np.tile([[0.8, 0.1, 0.1]], (5, 1))]  # rain, then dog on top
    targets = np.array([0, 0])  # both clips' first label is dog
    hard = np.array([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]], np.float32)  # the first clip is dog and rain
    assert metrics(probs, targets, labels, 0.01)["acc_last"] == 0.5
    assert metrics(probs, targets, labels, 0.01, hard=hard)["acc_last"] == 1.0


def test_one_file_named_two_ways_in_a_manifest_is_one_clip(folders, tmp_path):
    """A file listed as x.wav and as sub/../x.wav (or through a link) is one clip, with no group column given."""
    rain = folders / "rain" / "rain0.wav"
    (tmp_path / "sub").mkdir()
    (tmp_path / "link.wav").symlink_to(rain)
    rows = [(rain, "rain"), (tmp_path / "sub" / ".." / "link.wav", "dog"), (folders / "dog" / "dog0.wav", "dog")]
    ds = load_dataset(_manifest(tmp_path / "m.csv", rows))
    assert len(ds.clips) == 2 and sorted((c.label, *c.also) for c in ds.clips) == [("dog",), ("rain", "dog")]


def test_training_s_validation_scores_a_clip_with_two_labels_as_eval_does():
    from streamtag.training.trainer import accuracies

    probs = [np.tile([[0.1, 0.9, 0.0]], (5, 1)), np.tile([[0.8, 0.1, 0.1]], (5, 1))]
    hard = np.array([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]], np.float32)
    assert accuracies(probs, np.array([0, 0]))["acc_last"] == 0.5
    assert accuracies(probs, np.array([0, 0]), hard=hard) == {"acc_last": 1.0, "acc_mean": 1.0}


def test_eval_limit_takes_the_models_classes_first():
    """--limit 4 on ESC-50 with a dog-and-rain model scored 4 classes it does not have: 0%, mAP nan."""
    from types import SimpleNamespace

    from streamtag.cli.evaluate import _spread

    labels = ["airplane", "dog", "dog", "rain", "zebra", "dog", "rain", "airplane"]
    data = SimpleNamespace(clips=[SimpleNamespace(label=x) for x in labels])
    assert [labels[i] for i in _spread(data, 4, {"dog", "rain"})] == ["dog", "dog", "rain", "rain"]
    assert sorted(labels[i] for i in _spread(data, 7, {"dog", "rain"})) == sorted(labels[1:7] + ["airplane"])
    assert len(_spread(data, 99, {"dog"})) == len(labels)


def test_eval_refuses_a_dataset_with_none_of_the_models_classes(folders, tmp_path, cli, cnn_dir):
    """It printed "the dataset has one of the model's classes", a numpy warning and a report of nothing (every
    clip an error), exit 0."""
    data = _manifest(tmp_path / "d.csv", [[p, "whistle"] for p in folders.rglob("*.wav")])
    code, err = cli("eval", cnn_dir, data, "--report", tmp_path / "r")
    assert code == 2 and "none of the dataset's classes (whistle) is one of the model's" in err, err
    assert "(streamtag eval MODEL_FOLDER DATASET)" in err, err  # eval has no --model: the model comes first
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "r").exists(), err


def test_eval_refuses_an_unreadable_clip_before_scoring_any(folders, tmp_path, cli, cnn_dir):
    data = tmp_path / "data"
    shutil.copytree(folders, data)
    (data / "dog" / "empty.wav").write_bytes(b"")
    code, err = cli("eval", cnn_dir, data, "--report", tmp_path / "r")
    assert code == 2 and "1 clip of the dataset cannot be scored" in err and "empty (0 bytes)" in err, err
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "r").exists(), err
    (data / "dog" / "empty.wav").unlink()  # a clip shorter than a hop: found after every clip before it was scored
    sf.write(data / "dog" / "tiny.wav", np.full(100, 0.1, np.float32), 16000)
    code, err = cli("eval", cnn_dir, data, "--report", tmp_path / "r")
    assert code == 2 and "tiny.wav is 6.2 ms long, shorter than one hop (10 ms)" in err, err
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "r").exists(), err


def test_a_fine_tuned_model_knows_the_clips_of_the_model_it_started_from(folders, tmp_path, cli):
    """train --init wrote only its own run's clips to trained_on.txt: eval of the fine-tuned model on clips the
    starting model had learned from gave no warning, and its validation split held them without a word."""
    first = tmp_path / "first"
    code, err = cli("train", folders, "--arch-param", "hidden=8", *FAST, "--out", first, "--no-val")
    assert code == 0, err
    few = _manifest(tmp_path / "few.csv", [[p, p.parent.name] for p in sorted(folders.rglob("*.wav")) if "0" in p.stem])
    second = tmp_path / "second"
    code, err = cli("train", few, "--init", first, "--arch-param", "hidden=8", *FAST, "--out", second, "--no-val")
    assert code == 0, err
    listed = (second / "trained_on.txt").read_text().splitlines()
    assert len(listed) == 3 + 1 + 6 and listed[3].startswith("# and, through train --init")
    code, err = cli("eval", second, folders, "--levels", "0", "--baseline-folds", "0", "--report", tmp_path / "r")
    assert code == 0 and "9 of 9 clips were in this model's training set" in err, err
    assert "chainsaw0.wav, chainsaw1.wav, chainsaw2.wav and 6 more" in err  # which ones, not only how many
    # each clip in clips.csv: what was said, whether it is right as the report counts it, and that it was learned
    with open(tmp_path / "r" / "clips.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    report = json.loads((tmp_path / "r" / "report.json").read_text())["metrics"]
    assert len(rows) == 9 and {r["in_training"] for r in rows} == {"1"}
    assert sum(int(r["right_mean"]) for r in rows) / 9 == pytest.approx(report["acc_mean"])
    assert sum(int(r["right_last"]) for r in rows) / 9 == pytest.approx(report["acc_last"])
    assert all(r["right_mean"] == str(int(r["predicted_mean"] == r["labels"])) for r in rows)
    assert all(0 <= float(r["label_score_mean"]) <= float(r["label_score_max"]) <= 1 for r in rows)
    code, err = cli("train", folders, "--init", first, "--arch-param", "hidden=8", *FAST, "--out", tmp_path / "v")
    assert code == 0 and "validation clips were in the training set of --init" in err, err
    code, err = cli("train", few, "--arch-param", "hidden=8", *FAST, "--out", second, "--no-val", "--resume")
    assert code == 2 and "nothing is left to train" in err, err  # the inherited lines are not this run's clips


def test_an_overwrite_stopped_before_its_first_save_leaves_the_old_model_whole(folders, tmp_path, cli, monkeypatch):
    """train --overwrite stopped in its first epoch left the old weights beside the new run's trained_on.txt: eval
    warned about the wrong clips (9 of 38 where the weights had learned 30)."""
    from streamtag.training import trainer

    out = tmp_path / "m"
    code, err = cli("train", folders, "--arch-param", "hidden=8", *FAST, "--out", out, "--no-val")
    assert code == 0, err
    before = {f: (out / f).read_bytes() for f in ("model.safetensors", "config.json", "trained_on.txt")}
    few = _manifest(tmp_path / "few.csv", [[p, p.parent.name] for p in sorted(folders.rglob("*.wav")) if "0" in p.stem])

    def stopped(*args, **kwargs):  # a Ctrl-C just before the first save
        raise KeyboardInterrupt

    monkeypatch.setattr(trainer, "save_model", stopped)
    code, err = cli("train", few, "--arch-param", "hidden=8", *FAST, "--out", out, "--no-val", "--overwrite")
    assert code == 130 and "before the first epoch ended" in err, err
    assert {f: (out / f).read_bytes() for f in before} == before  # the old model, whole


def test_a_label_that_cannot_be_a_column_or_a_topic_is_refused(folders, tmp_path, cli):
    """'car horn/#1' and 'my<TAB>appliance' were trained: then serve's MQTT died with a traceback (a wildcard in a
    topic) and a --scores TSV had more header columns than scores, each class paired with the next one's. A
    dataset label a --label-map renames, and one eval only compares, may hold them."""
    for label in ("car horn/#1", "my\tappliance", "a:b"):
        rows = [[p, label if p.parent.name == "rain" else p.parent.name] for p in folders.rglob("*.wav")]
        manifest = _manifest(tmp_path / "weird.csv", rows)
        code, err = cli("train", manifest, *FAST, "--out", tmp_path / "m")
        assert code == 2 and f"label {label!r} holds" in err and "rename it" in err, err
        assert not (tmp_path / "m").exists()
    for rain, chainsaw, says in (("level", "chainsaw", "MQTT topic of the level"), ("r x", "r_x", "one Home")):
        renamed = {"rain": rain, "chainsaw": chainsaw}  # trained, then refused by serve --mqtt
        rows = [[p, renamed.get(p.parent.name, p.parent.name)] for p in folders.rglob("*.wav")]
        code, err = cli("train", _manifest(tmp_path / "mqtt.csv", rows), *FAST, "--out", tmp_path / "m")
        assert code == 2 and says in err and "rename" in err and not (tmp_path / "m").exists(), err
    rows = [[p, "rain/heavy" if p.parent.name == "rain" else p.parent.name] for p in folders.rglob("*.wav")]
    manifest = _manifest(tmp_path / "aliased.csv", rows)
    label_map = tmp_path / "map.tsv"
    label_map.write_text("rain\tRain\train/heavy\n")
    small = ["--arch-param", "hidden=8", *FAST]
    code, err = cli("train", manifest, "--label-map", label_map, *small, "--out", tmp_path / "a")
    assert code == 0, err
    assert json.loads((tmp_path / "a" / "config.json").read_text())["labels"] == ["chainsaw", "dog", "rain"]
    report = ["--levels", "0", "--baseline-folds", "0", "--report", tmp_path / "r"]
    code, err = cli("eval", tmp_path / "a", manifest, *report)
    assert code == 0, err


def test_an_overwritten_model_loses_the_old_event_thresholds(folders, tmp_path, cli):
    """--overwrite kept the old model's events.toml: its thresholds were for other weights, and one naming a class
    the new model lacks made every later command on the folder fail; eval found that only after scoring every
    clip, in a line that did not name the file."""
    out = tmp_path / "m"
    code, err = cli("train", folders, "--arch-param", "hidden=8", *FAST, "--out", out, "--no-val")
    assert code == 0, err
    (out / "events.toml").write_text("[chainsaw]\non_threshold = 0.9\n")
    code, err = cli("eval", out, folders, "--levels", "0", "--baseline-folds", "0", "--report", tmp_path / "r")
    assert code == 0, err  # the model's own thresholds are its to have
    rows = [[p, p.parent.name] for p in folders.rglob("*.wav") if p.parent.name != "chainsaw"]
    two = _manifest(tmp_path / "two.csv", rows)
    code, err = cli("train", two, "--arch-param", "hidden=8", *FAST, "--out", out, "--no-val", "--overwrite")
    assert code == 0 and f"removed {out / 'events.toml'}" in err and not (out / "events.toml").exists(), err
    (out / "events.toml").write_text("[chainsaw]\non_threshold = 0.9\n")  # a user's, naming a class it lacks
    code, err = cli("eval", out, folders, "--levels", "0", "--baseline-folds", "0", "--report", tmp_path / "r2")
    assert code == 2 and f"{out / 'events.toml'}: event settings: unknown class 'chainsaw'" in err, err
    assert "clips through the" not in err  # said before any clip was scored


def test_init_takes_the_starting_model_s_architecture(folders, tmp_path, cli):
    """--init refused a run that did not repeat the starting model's --arch-param values by hand ("its arch
    parameters differ"): they come with the model now, and any given still override them."""
    first = tmp_path / "first"
    assert cli("train", folders, "--arch-param", "hidden=8", *FAST, "--out", first, "--no-val")[0] == 0
    code, err = cli("train", folders, "--init", first, *FAST, "--out", tmp_path / "second", "--no-val")
    assert code == 0, err
    assert json.loads((tmp_path / "second" / "config.json").read_text())["arch_params"]["hidden"] == 8
    code, err = cli("train", folders, "--init", first, "--arch-param", "hidden=16", *FAST, "--out", tmp_path / "x")
    assert code == 2 and "arch parameters differ" in err, err
    code, err = cli("train", folders, "--init", first, "--arch-param", "pool_gate=true", *FAST, "--out", tmp_path / "g")
    assert code == 0, err  # grown: the gate added, the rest of its parameters still the starting model's
    grown = json.loads((tmp_path / "g" / "config.json").read_text())["arch_params"]
    assert grown["hidden"] == 8 and grown["pool_gate"] is True
