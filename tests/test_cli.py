"""The CLI as a user runs it: replay end to end, outputs, and one-line errors."""

import json
import os
import re
import subprocess
import sys
import time

import numpy as np
import pytest

from streamtag.modelfile import DEFAULT_MODEL_DIR

from .conftest import EXAMPLES, LABELS, read_clip, run_cli


def test_replay_jsonl_updates_timestamps_and_probabilities(cnn_dir, tmp_path):
    out = tmp_path / "u.jsonl"
    r = run_cli("replay", EXAMPLES / "dog.flac", "--model", cnn_dir, "--fast", "--jsonl", out, "--all", "--quiet")
    assert r.returncode == 0, r.stderr
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 50  # 5 s at the default 10 updates per second
    times = [row["t"] for row in rows]
    assert np.all(np.diff(times) > 0) and times[-1] == pytest.approx(5.0)
    for row in rows:
        assert set(row["probs"]) == set(LABELS)
        assert sum(row["probs"].values()) == pytest.approx(1.0, abs=1e-3)
    assert "captured 80000, processed 80000, dropped 0, unread 0" in r.stderr


def test_replay_rate_topk_and_scores_tsv(cnn_dir, tmp_path):
    jsonl, scores = tmp_path / "u.jsonl", tmp_path / "s.tsv"
    r = run_cli(
        "replay",
        EXAMPLES / "rain.flac",
        "--model",
        cnn_dir,
        "--fast",
        "--rate",
        "50",
        "--max-results",
        "2",
        "--jsonl",
        jsonl,
        "--scores",
        scores,
        "--quiet",
    )
    assert r.returncode == 0, r.stderr
    rows = [json.loads(line) for line in jsonl.read_text().splitlines()]
    assert len(rows) == 250 and all(len(row["top"]) == 2 for row in rows)
    assert rows[0]["top"][0][1] >= rows[0]["top"][1][1]
    lines = scores.read_text().splitlines()
    assert lines[0].split("\t") == ["onset", "offset", *LABELS]
    assert len(lines) == 501
    first = lines[1].split("\t")
    assert float(first[0]) == 0.0 and float(first[1]) == pytest.approx(0.01)
    assert sum(map(float, first[2:])) == pytest.approx(1.0, abs=1e-4)


def test_scores_tsv_reads_back_with_sed_scores_eval_layout(cnn_dir, tmp_path):
    """The TSV is what sed_scores_eval.io.read_sed_scores expects: float onset/offset then one column per class."""
    scores = tmp_path / "clip.tsv"
    assert (
        run_cli("replay", EXAMPLES / "dog.flac", "--model", cnn_dir, "--fast", "--scores", scores, "--quiet").returncode
        == 0
    )
    data = np.genfromtxt(scores, delimiter="\t", names=True)
    assert data.dtype.names[:2] == ("onset", "offset")
    np.testing.assert_allclose(data["offset"][:-1], data["onset"][1:])


def test_plain_lines_when_piped(cnn_dir):
    r = run_cli("replay", EXAMPLES / "dog.flac", "--model", cnn_dir, "--fast")
    assert r.returncode == 0
    update_lines = [ln for ln in r.stdout.splitlines() if ln.strip().endswith(tuple("0123456789"))]
    assert len(update_lines) >= 50
    assert any(label in r.stdout for label in LABELS)


def test_plot_writes_png(cnn_dir, tmp_path):
    png = tmp_path / "p.png"
    r = run_cli("replay", EXAMPLES / "dog.flac", "--model", cnn_dir, "--fast", "--plot", png, "--quiet")
    assert r.returncode == 0, r.stderr
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 20_000


def test_paced_replay_takes_real_time(cnn_dir, tmp_path):
    """--speed 4 paces at four times real time: a 5 s clip cannot finish in under 1.25 s."""
    import time

    t0 = time.monotonic()
    r = run_cli("replay", EXAMPLES / "dog.flac", "--model", cnn_dir, "--speed", "4", "--quiet")
    assert r.returncode == 0
    assert time.monotonic() - t0 >= 1.25


def test_fast_paced_replay_never_drops(cnn_dir):
    """A file can wait for the worker: pacing faster than the worker steps slows the replay, never drops."""
    clip = EXAMPLES / "chainsaw.flac"
    r = run_cli("replay", clip, "--model", cnn_dir, "--speed", "500", "--quiet", "--buffer-seconds", "0.05")
    assert r.returncode == 0, r.stderr
    assert "captured 80000, processed 80000, dropped 0, unread 0" in r.stderr


@pytest.mark.parametrize(
    "args, message",
    [
        (["replay", "nonexistent.wav"], "no such file"),
        (["replay", "{tmp}"], "is a directory"),
        (["replay", "{tmp}/text.wav"], "not a readable audio file"),
        (["replay", "{dog}", "--model", "{tmp}/nomodel"], "model folder not found"),
        (["replay", "{dog}", "--model", "{dog}"], "dog.flac: is a file, not a model folder"),
        (["replay", "{dog}", "--allow", "dog", "--deny", "rain"], "mutually exclusive"),
        (["replay", "{dog}", "--allow", "unicorn"], "--allow: unknown class 'unicorn' (the model's classes: "),
        (["replay", "{dog}", "--deny", "Dog"], "--deny: unknown class 'Dog' (did you mean dog?)"),
        (["replay", "{dog}", "--speed", "-1"], "argument --speed: must be a finite number > 0 (-1 given)"),
        (["replay", "{dog}", "--jsonl", "{tmp}/missing/dir/out.jsonl"], "does not exist"),
        (["replay", "{dog}", "--plot", "{tmp}/x.jpg"], "wants a .png"),
        (
            ["replay", "{dog}", "--backend", "torch", "--torch-device", "cuda"],
            "no CUDA GPU is visible (use --torch-device cpu)",
        ),
        (["eval", "{tmp}/nomodel", "{tmp}"], "model folder not found"),
        (["export", "{tmp}/nomodel", "--onnx", "{tmp}/x.onnx"], "the first argument for eval and export"),
        (["train", "{tmp}/nodata", "--out", "{tmp}/o"], "dataset not found"),
        (["eval", "{cnn}", "{tmp}", "--report", "/proc/streamtag_report"], "--report /proc/streamtag_report"),
        (["tag", "{dog}", "--out", "{tmp}/o", "--on-threshold", "2"], "--on-threshold 2: events.default: on_threshold"),
        (["eval", "{cnn}", "{tmp}", "--false-alarm-audio", "{tmp}", "--expected", "speach"], "--expected: 'speach'"),
    ],
)
def test_user_mistakes_give_one_line_and_nonzero_exit(args, message, cnn_dir, tmp_path):
    (tmp_path / "text.wav").write_text("this is not audio\n")
    args = [a.format(tmp=tmp_path, dog=EXAMPLES / "dog.flac", cnn=cnn_dir) for a in args]
    if "--model" not in args and args[0] == "replay":
        args += ["--model", str(cnn_dir)]
    r = run_cli(*args)
    assert r.returncode != 0
    assert "Traceback" not in r.stderr
    err_lines = [ln for ln in r.stderr.splitlines() if "error" in ln]
    assert len(err_lines) == 1 and message in err_lines[0], r.stderr


def test_help_lists_every_command():
    assert run_cli("--version").stdout.startswith("streamtag 0.")
    r = run_cli("--help")
    for command in ("live", "replay", "devices", "train", "eval", "export", "bench"):
        assert command in r.stdout


def test_export_writes_a_graph_that_the_onnx_backend_uses(cnn_dir, tmp_path):
    import shutil

    model = tmp_path / "model"
    shutil.copytree(cnn_dir, model)
    r = run_cli("export", model, "--onnx", model / "model.onnx", "--chunk-onnx", model / "chunk.onnx")
    assert r.returncode == 0, r.stderr
    import onnx

    graph = onnx.load(str(model / "model.onnx"))
    assert [i.name for i in graph.graph.input][0] == "audio"
    assert graph.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"  # dynamic batch
    from streamtag.backends.onnx_backend import open_session

    # the exported file is picked up (fingerprint matches): no second export goes to the cache
    session = open_session(model)
    assert session._model_path == str(model / "model.onnx")
    assert open_session(model, chunk=True)._model_path == str(model / "chunk.onnx")
    # a hop graph written where the chunk graph belongs is not mistaken for one
    shutil.copy(model / "model.onnx", model / "chunk.onnx")
    assert open_session(model, chunk=True)._model_path != str(model / "chunk.onnx")
    r = run_cli("export", model)
    assert r.returncode == 2 and "give --onnx OUT, --chunk-onnx OUT or both" in r.stderr
    (model / "chunk.onnx").unlink()  # the two graphs swapped on a first export: accepted, then unusable
    r = run_cli("export", model, "--onnx", model / "chunk.onnx")
    assert r.returncode == 2 and "name it model.onnx there, not chunk.onnx" in r.stderr
    assert not (model / "chunk.onnx").exists()
    alone = tmp_path / "alone"  # a graph exported out of its folder: it says how to run it, and so does replay
    alone.mkdir()
    r = run_cli("export", model, "--onnx", alone / "model.onnx")
    assert r.returncode == 0 and "in a copy of" in r.stderr, r.stderr
    r = run_cli("replay", EXAMPLES / "dog.flac", "--model", alone, "--fast")
    assert r.returncode == 2 and "an exported graph runs from a copy of its model's folder" in r.stderr


def test_full_disk_ends_the_run_with_one_error(cnn_dir):
    """Writing to /dev/full fails like a full disk: exit 1 and a clear reason naming the file, not a silent success."""
    for option in ("--jsonl", "--scores"):  # line-buffered and block-buffered outputs
        r = run_cli("replay", EXAMPLES / "dog.flac", "--model", cnn_dir, "--fast", "--quiet", option, "/dev/full")
        assert r.returncode == 1 and "Traceback" not in r.stderr
        assert "writing an output failed: /dev/full: No space left" in r.stderr


def test_full_disk_for_events_and_plot_names_the_file(tmp_path):
    """The bundled model finds the rain in rain.flac, so --events writes mid-run; --plot writes at the end."""
    png = tmp_path / "p.png"
    png.symlink_to("/dev/full")  # passes every check before the run, fails when written
    for option, path in (("--events", "/dev/full"), ("--plot", png)):
        r = run_cli("replay", EXAMPLES / "rain.flac", "--fast", "--quiet", option, path)
        assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
        last = r.stderr.strip().splitlines()[-1]
        assert last == f"streamtag replay: error: writing an output failed: {path}: No space left on device"


ONE_LINE_USAGE_ERRORS = [
    # (arguments after "replay DOG --model M --fast --quiet", text the one error line must hold)
    (["--buffer-seconds", "1e9"], "argument --buffer-seconds: must be a finite number in (0, 60] (1e9 given)"),
    (["--buffer-seconds", "0"], "argument --buffer-seconds: must be a finite number in (0, 60] (0 given)"),
    (["--rate", "nan"], "argument --rate: must be a finite number > 0 (nan given)"),
    (["--rate", "0"], "argument --rate: must be a finite number > 0 (0 given)"),
    (["--rate", "1e6"], "--rate must be at most 100 for this model (one update per 10 ms hop; 1e+06 given)"),
    (
        ["--backend", "torch", "--torch-device", "tpu"],
        "argument --torch-device: must be cpu, cuda or cuda:N (tpu given)",
    ),
    (["--torch-device", "cpu"], "--torch-device cpu needs --backend torch"),
    (["--speed", "nan"], "argument --speed: must be a finite number > 0 (nan given)"),
    (["--speed", "inf"], "argument --speed: must be a finite number > 0 (inf given)"),
    (["--speed", "0"], "argument --speed: must be a finite number > 0 (0 given); --fast replays as fast as possible"),
    (["--reset-every", "0"], "argument --reset-every: must be a finite number > 0 (0 given)"),
    (["--reset-every", "-1"], "argument --reset-every: must be a finite number > 0 (-1 given)"),
    (["--reset-on-silence", "0"], "argument --reset-on-silence: must be a finite number > 0 (0 given)"),
    (["--on-threshold", "2"], "argument --on-threshold: must be a finite number in (0, 1] (2 given)"),
    (["--score-threshold", "nan"], "argument --score-threshold: must be a finite number in [0, 1] (nan given)"),
    (["--all"], "--all selects what --jsonl writes: add --jsonl PATH"),
    (["--allow", ","], "--allow ',' names no class"),
    (
        ["--event-config", "{tmp}/events.yaml"],
        "--event-config: event settings {tmp}/events.yaml: give a .json or .toml",
    ),
    (["--save-clips", "{tmp}/events.yaml"], "--save-clips {tmp}/events.yaml is a file; give a folder"),
    (["--plot", "{tmp}/missing/p.png"], "--plot {tmp}/missing/p.png: output folder {tmp}/missing does not exist"),
    (["--events", "{tmp}/missing/e.jsonl"], "--events {tmp}/missing/e.jsonl: output folder {tmp}/missing does not"),
    (["--scores", "{tmp}/events.yaml/s.tsv"], "--scores {tmp}/events.yaml/s.tsv: {tmp}/events.yaml is not a folder"),
]


@pytest.mark.parametrize("extra, message", ONE_LINE_USAGE_ERRORS)
def test_bad_values_are_refused_before_any_work_in_one_line(extra, message, cnn_dir, tmp_path):
    """Exit 2 and one stderr line naming the flag, the value and what is allowed; nothing played, nothing written."""
    (tmp_path / "events.yaml").write_text("default:\n  on_threshold: 0.5\n")
    extra = [a.format(tmp=tmp_path) for a in extra]
    kept = tmp_path / "u.jsonl"  # a valid output next to the bad value: must not even be created
    jsonl = [] if "--all" in extra else ["--jsonl", kept]
    r = run_cli("replay", EXAMPLES / "dog.flac", "--model", cnn_dir, "--fast", "--quiet", *jsonl, *extra)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("streamtag replay: error: "), r.stderr
    assert message.format(tmp=tmp_path) in lines[0]
    assert not kept.exists() and not (tmp_path / "missing").exists()


def test_view_options_that_shape_nothing_are_refused_and_all_keeps_to_the_allowed(cnn_dir, tmp_path):
    """--quiet turns the console view off: --plain, --max-results, --score-threshold and --rate then shaped
    nothing (accepted, silently); --jsonl --all wrote a class --deny named."""
    jsonl = tmp_path / "u.jsonl"
    for extra, says in (
        (["--plain"], "--plain shapes what is shown, but --quiet turns the console view off: drop --plain"),
        (["--max-results", "5"], "--max-results shapes what is shown"),
        (["--rate", "50"], "--rate shapes what is shown"),
        (["--jsonl", jsonl, "--all", "--score-threshold", "0.5"], "and --jsonl --all writes every class"),
    ):
        r = run_cli("replay", EXAMPLES / "dog.flac", "--model", cnn_dir, "--fast", "--quiet", *extra)
        assert r.returncode == 2 and says in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    for extra, says in (  # a file on standard output turns the console view off as well
        (["--events", "-", "--plain"], "--plain shapes what is shown, but --events - takes standard output: drop"),
        (["--scores", "-", "--max-results", "5"], "but --scores - takes standard output and there is no --jsonl"),
    ):
        r = run_cli("replay", EXAMPLES / "dog.flac", "--model", cnn_dir, "--fast", *extra)
        assert r.returncode == 2 and says in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    r = run_cli("replay", EXAMPLES / "dog.flac", "--model", cnn_dir, "--fast", "--jsonl", "-", "--max-results", "1")
    assert r.returncode == 0 and all(len(json.loads(line)["top"]) == 1 for line in r.stdout.splitlines()), r.stdout
    r = run_cli("replay", EXAMPLES / "dog.flac", "--model", cnn_dir, "--fast", "--quiet", "--jsonl", jsonl, "--all")
    assert r.returncode == 0 and '"dog"' in jsonl.read_text()
    r = run_cli(
        "replay", EXAMPLES / "dog.flac", "--model", cnn_dir, "--fast", "--quiet", "--jsonl", jsonl, "--all",
        "--deny", "dog", "--rate", "20",
    )  # fmt: skip
    rows = [json.loads(line) for line in jsonl.read_text().splitlines()]
    assert r.returncode == 0 and len(rows) == 100 and all("dog" not in row["probs"] for row in rows)
    assert set(rows[0]["probs"]) == {"rain", "chainsaw", "rooster", "other"}


def test_an_output_never_overwrites_the_input_or_another_output(cnn_dir, tmp_path):
    import shutil

    clip = tmp_path / "rec.flac"
    shutil.copy(EXAMPLES / "dog.flac", clip)
    before = clip.read_bytes()
    for extra, message in (
        (["--scores", clip], f"--scores {clip} is also the file replayed"),
        (["--jsonl", tmp_path / "a", "--events", tmp_path / "a"], f"--events {tmp_path / 'a'} is also --jsonl"),
    ):
        r = run_cli("replay", clip, "--model", cnn_dir, "--fast", "--quiet", *extra)
        assert r.returncode == 2, r.stderr
        assert r.stderr.strip() == f"streamtag replay: error: {message}: give each output a file of its own"
    assert clip.read_bytes() == before and not (tmp_path / "a").exists()


@pytest.mark.parametrize("allow", [["--allow", "dog,rain"], ["--allow", "dog", "--allow", "rain"]])
def test_allow_takes_comma_separated_or_repeated_classes(allow, cnn_dir, tmp_path):
    out = tmp_path / "u.jsonl"
    r = run_cli("replay", *allow, EXAMPLES / "dog.flac", "--model", cnn_dir, "--fast", "--quiet", "--jsonl", out)
    assert r.returncode == 0, r.stderr
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 50 and all(sorted(label for label, _ in row["top"]) == ["dog", "rain"] for row in rows)


def test_allow_before_the_file_leaves_the_file_alone(cnn_dir, tmp_path):
    """`replay --allow dog FILE`: FILE is the audio file, not a second class name."""
    out = tmp_path / "u.jsonl"
    r = run_cli("replay", "--allow", "dog", EXAMPLES / "dog.flac", "--model", cnn_dir, "--fast", "--quiet")
    assert r.returncode == 0, r.stderr
    r = run_cli(
        "replay", "--deny", "dog", EXAMPLES / "dog.flac", "--model", cnn_dir, "--fast", "--jsonl", out, "--quiet"
    )
    assert r.returncode == 0, r.stderr
    assert all("dog" not in dict(json.loads(line)["top"]) for line in out.read_text().splitlines())


def test_export_creates_no_folder(tmp_path):
    target = tmp_path / "missing" / "x.onnx"
    r = run_cli("export", "--onnx", target)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip().startswith(f"streamtag export: error: --onnx {target}: output folder {target.parent} ")
    assert not target.parent.exists()


def test_installed_package_works_outside_the_checkout(tmp_path):
    """From another folder (so the checkout is not on sys.path): the package, its model and clips are installed."""
    import subprocess
    import sys

    code = (
        "import streamtag, pathlib; assert streamtag.__file__, 'namespace package: reinstall'; "
        "b = streamtag.make_backend('onnx'); "
        "clip = pathlib.Path(streamtag.__file__).parent / 'assets' / 'examples' / 'dog.flac'; "
        "r = streamtag.tag_file(b, clip); print(r.probs.shape, len(b.labels))"
    )
    r = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "(500, 57) 57"


def test_a_bad_output_path_truncates_nothing(cnn_dir, tmp_path):
    kept = tmp_path / "earlier.jsonl"
    kept.write_text('{"t": 1.0}\n')
    r = run_cli(
        "replay",
        EXAMPLES / "dog.flac",
        "--model",
        cnn_dir,
        "--fast",
        "--jsonl",
        kept,
        "--scores",
        tmp_path / "missing" / "s.tsv",
    )
    assert r.returncode == 2 and "does not exist" in r.stderr
    assert kept.read_text() == '{"t": 1.0}\n'


def test_jsonl_rows_carry_schema_source_and_wall_clock(cnn_dir, tmp_path):
    import datetime

    events, updates = tmp_path / "ev.jsonl", tmp_path / "up.jsonl"
    clip = EXAMPLES / "chainsaw.flac"
    r = run_cli(
        "replay", clip, "--model", cnn_dir, "--fast", "--quiet", "--events", events, "--jsonl", updates,
        "--on-threshold", "0.05", "--max-event-seconds", "1",
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    rows = [json.loads(line) for path in (events, updates) for line in path.read_text().splitlines()]
    assert rows and all(row["schema"] == 1 and row["source"] == str(clip) for row in rows)
    stamps = [datetime.datetime.fromisoformat(row["time"]) for row in rows]
    assert all(s.tzinfo is not None for s in stamps)
    closes = [row for row in rows if row.get("type") == "close"]
    assert closes and {row["reason"] for row in closes} <= {"ended", "max_duration", "stream_end"}
    assert any(row["reason"] == "max_duration" and row["offset"] - row["onset"] <= 1.0 + 1e-6 for row in closes)


def test_plain_lines_never_go_back_in_time(cnn_dir):
    r = run_cli("replay", EXAMPLES / "dog.flac", "--model", cnn_dir, "--fast", "--plain", "--on-threshold", "0.05")
    assert r.returncode == 0, r.stderr
    times = [float(line.split("s", 1)[0]) for line in r.stdout.splitlines() if line.strip()]
    assert any("open" in line for line in r.stdout.splitlines())
    assert times == sorted(times)


def _level(stderr: str) -> tuple[float, float]:
    line = next(line for line in stderr.splitlines() if line.startswith("level: "))
    rms, peak = re.findall(r"(-?[\d.]+) dBFS", line)
    return float(rms), float(peak)


def test_gain_and_level_in_the_summary(cnn_dir):
    clip = EXAMPLES / "rain.flac"
    plain = run_cli("replay", clip, "--model", cnn_dir, "--fast", "--quiet")
    quiet = run_cli("replay", clip, "--model", cnn_dir, "--fast", "--quiet", "--gain", "-50")
    assert plain.returncode == quiet.returncode == 0
    (rms, peak), (rms_q, peak_q) = _level(plain.stderr), _level(quiet.stderr)
    assert rms_q == pytest.approx(rms - 50, abs=0.2) and peak_q == pytest.approx(peak - 50, abs=0.2)
    assert "very quiet input: the input is silent" in quiet.stderr and "very quiet input" not in plain.stderr
    assert "after --gain -50 dB" in quiet.stderr


@pytest.mark.parametrize("columns", [40, 80, 100])
def test_live_view_keeps_labels_whole_on_narrow_terminals(columns):
    import io

    from rich.console import Console

    from streamtag.events import Event
    from streamtag.outputs import ClassSelection, LiveView
    from streamtag.worker import Step

    labels = ["door_wood_creaks", "children_playing", "rain"]
    screen = io.StringIO()
    console = Console(file=screen, width=columns, force_terminal=True, color_system=None)
    view = LiveView(ClassSelection(labels, 3, 0.0, None, None), 1, lambda: (0, 0.2, 10.0, -23.0), console=console)
    opened = Event("open", "children_playing", 0.5, None, 0.9, 0.8)
    step = Step(0, 0.01, np.array([0.9, 0.6, 0.1], np.float32), [opened], labels, 0.01)
    view.write(step)
    view.close()
    screen = io.StringIO()  # the frame itself, without the cursor codes of the in-place redraw
    Console(file=screen, width=columns, color_system=None).print(view._render(step))
    lines = [line for line in screen.getvalue().splitlines() if line.strip()]
    assert lines and all(len(line) <= columns for line in lines)
    text = screen.getvalue()
    assert all(label in text for label in labels) and "children_playing" in text
    if columns >= 80:  # the level meter and the p99 stay on an 80-column terminal
        assert "p99 0.2" in text and "#" in text


def test_the_package_and_the_command_line_start_without_numpy_and_every_exported_name_resolves():
    """`import streamtag` and the parser's module load nothing heavy (start-up is most of what tagging a short
    archive costs); the names of the API still import on first use."""
    code = (
        "import sys, streamtag, streamtag.cli\n"
        "heavy = [m for m in ('numpy', 'onnxruntime', 'torch', 'asyncio') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
        "missing = [n for n in streamtag.__all__ if getattr(streamtag, n, None) is None]\n"
        "assert not missing, missing\n"
        "assert 'numpy' in sys.modules and 'StreamTagger' in dir(streamtag)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr


def test_ctrl_c_in_a_command_that_keeps_nothing_still_says_so(tmp_path):
    """eval keeps no partial report: interrupted, it says so in one line (exit 130), no traceback."""
    import signal
    import subprocess
    import sys

    import soundfile as sf

    for label in ("dog", "rain"):
        (tmp_path / "data" / label).mkdir(parents=True)
        audio = np.tile(read_clip(EXAMPLES / f"{label}.flac"), 12)
        for i in range(6):
            sf.write(tmp_path / "data" / label / f"{i}.wav", audio, 16000)
    cmd = [sys.executable, "-m", "streamtag", "eval", "default", str(tmp_path / "data")]
    cmd += ["--levels", "0,-10,-20,-30,-40,-50", "--report", str(tmp_path / "report"), "--baseline-folds", "0"]
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True)
    lines = []
    for line in proc.stderr:  # stopped during the level sweep: minutes of audio still to go
        lines.append(line)
        if "level sweep" in line:
            proc.send_signal(signal.SIGINT)
            break
    err = "".join(lines) + proc.communicate(timeout=120)[1]
    assert proc.returncode == 130 and "streamtag eval: interrupted" in err and "Traceback" not in err, err


def test_outputs_are_checked_before_any_is_opened_and_export_keeps_the_model(cnn_dir, tmp_path):
    import shutil

    kept = tmp_path / "kept.jsonl"
    kept.write_text('{"precious": 1}\n')
    replay = ["replay", EXAMPLES / "dog.flac", "--model", cnn_dir, "--fast"]
    r = run_cli(*replay, "--events", kept, "--save-clips", "nodir")
    assert r.returncode == 2 and "--save-clips nodir" in r.stderr and "Traceback" not in r.stderr
    assert kept.read_text() == '{"precious": 1}\n'  # refused before it was opened (truncated)
    r = run_cli("replay", EXAMPLES / "dog.flac", "--model", cnn_dir, "--events", kept, "--scores", "/proc/x.tsv")
    assert r.returncode == 2 and "--scores /proc/x.tsv" in r.stderr and kept.read_text() == '{"precious": 1}\n'
    model = tmp_path / "model"
    shutil.copytree(cnn_dir, model)
    weights = (model / "model.safetensors").read_bytes()
    r = run_cli("export", model, "--onnx", model / "model.safetensors")
    assert r.returncode == 2 and "would replace the model's own model.safetensors" in r.stderr
    assert (model / "model.safetensors").read_bytes() == weights
    r = run_cli("export", model, "--onnx", tmp_path / "g.onnx", "--chunk-onnx", tmp_path / "g.onnx")
    assert r.returncode == 2 and "is also --onnx" in r.stderr and not (tmp_path / "g.onnx").exists()
    r = run_cli("export", model, "--onnx", "/proc/g.onnx")
    assert r.returncode == 2 and "cannot write in /proc" in r.stderr and "Traceback" not in r.stderr


def test_a_class_left_out_by_allow_or_deny_opens_no_events(tmp_path):
    def rain_events(*flags):
        events = tmp_path / "ev.jsonl"
        r = run_cli("replay", EXAMPLES / "rain.flac", "--fast", "--quiet", "--events", events, *flags)
        assert r.returncode == 0, r.stderr
        return [row["label"] for row in map(json.loads, events.read_text().splitlines()) if row["label"] == "rain"]

    assert rain_events("--allow", "rain,dog") == ["rain", "rain"]  # open and close
    assert rain_events("--deny", "rain") == [] and rain_events("--allow", "dog") == []


def test_a_reader_that_stops_reading_ends_the_run_quietly(cnn_dir, tmp_path):
    """replay ... | head: the closed pipe stops the run, exit 0, no error line (as for any Unix filter)."""
    import subprocess
    import sys

    import soundfile as sf

    long = tmp_path / "long.wav"
    sf.write(long, np.tile(read_clip(EXAMPLES / "dog.flac"), 12), 16000)  # 6000 lines: more than a pipe holds
    cmd = [sys.executable, "-m", "streamtag", "replay", str(long), "--model", str(cnn_dir), "--fast", "--plain"]
    proc = subprocess.Popen([*cmd, "--rate", "100"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout.readline()
    proc.stdout.close()  # as head does after its lines
    err = proc.stderr.read()
    assert proc.wait(timeout=120) == 0 and "error" not in err and "Exception ignored" not in err, err


def test_a_console_reader_leaving_does_not_cut_the_files_short(cnn_dir, tmp_path):
    """replay ... --scores F --events E | head: the console stops, the files go on to the end of the clip (they
    had stopped with the console, a few seconds in, exit 0: silently short), and the summary counts every hop."""
    import subprocess
    import sys

    import soundfile as sf

    long = tmp_path / "long.wav"
    sf.write(long, np.tile(read_clip(EXAMPLES / "dog.flac"), 12), 16000)  # 60 s: 6000 lines, more than a pipe holds
    scores, events = tmp_path / "s.tsv", tmp_path / "e.jsonl"
    cmd = [sys.executable, "-m", "streamtag", "replay", str(long), "--model", str(cnn_dir), "--fast", "--plain"]
    cmd += ["--rate", "100", "--scores", str(scores), "--events", str(events)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout.readline()
    proc.stdout.close()  # as head does after its lines
    err = proc.stderr.read()
    assert proc.wait(timeout=120) == 0 and "error" not in err and "Exception ignored" not in err, err
    assert len(scores.read_text().splitlines()) == 1 + 6000  # header, then every hop of the 60 s
    assert "6000 frames" in err and "hop compute" in err, err
    closes = [json.loads(line) for line in events.read_text().splitlines() if '"close"' in line]
    assert all(c["reason"] != "interrupted" for c in closes), closes


def test_an_output_fifo_is_written_and_its_reader_leaving_is_an_error(cnn_dir, tmp_path):
    """--events into a named pipe (mkfifo ev; jq . < ev &): the check before the run must not open it (that
    ends its reader); a reader that leaves mid-run is an error naming the file, unlike | head on stdout."""
    import os
    import subprocess
    import sys
    import threading

    import soundfile as sf

    fifo = tmp_path / "ev.fifo"
    os.mkfifo(fifo)
    got = []
    reader = threading.Thread(target=lambda: got.append(open(fifo).read()), daemon=True)
    reader.start()
    r = run_cli("replay", EXAMPLES / "rain.flac", "--fast", "--quiet", "--events", fifo)
    reader.join(30)
    assert r.returncode == 0 and got and '"label": "rain"' in got[0], r.stderr
    long = tmp_path / "long.wav"
    sf.write(long, np.tile(read_clip(EXAMPLES / "dog.flac"), 12), 16000)
    cmd = [sys.executable, "-m", "streamtag", "replay", str(long), "--model", str(cnn_dir), "--fast", "--quiet"]
    proc = subprocess.Popen([*cmd, "--scores", str(fifo)], stderr=subprocess.PIPE, text=True)
    with open(fifo) as f:
        f.read(1000)  # then gone, with megabytes of scores still to come
    err = proc.communicate(timeout=120)[1]
    assert proc.returncode == 1 and f"{fifo}: Broken pipe" in err, err


def test_a_sigterm_in_the_first_moments_is_a_stop_exit_0():
    """A service stopped right after its start: SIGTERM while the commands' modules were imported killed the
    process (exit 143) where the README promises exit 0."""
    script = (
        "import os, signal, sys\n"
        "import streamtag.cli as cli\n"
        "real = cli.build_parser\n"
        "def parser():\n"
        "    os.kill(os.getpid(), signal.SIGTERM)\n"
        "    return real()\n"
        "cli.build_parser = parser\n"
        "sys.exit(cli.main(['devices']))\n"
    )
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stderr.strip() == "streamtag: interrupted", (r.returncode, r.stderr)


def test_a_file_named_like_an_option_gets_the_way_to_give_it(tmp_path):
    """tag -x.flac said only 'the following arguments are required: INPUT', naming neither the file nor the fix."""
    import shutil

    shutil.copy(EXAMPLES / "dog.flac", tmp_path / "-x.flac")
    r = run_cli("replay", "-x.flac", "--fast", cwd=tmp_path)
    assert r.returncode == 2 and "a file whose name starts with - is given as ./-x.flac" in r.stderr, r.stderr
    assert run_cli("replay", "./-x.flac", "--fast", "--quiet", cwd=tmp_path).returncode == 0
    r = run_cli("replay", "-y.flac", "--fast", cwd=tmp_path)  # no such file: argparse's own words alone
    assert r.returncode == 2 and "starts with -" not in r.stderr, r.stderr


def test_score_threshold_hides_classes_below_it(cnn_dir, tmp_path):
    out = tmp_path / "u.jsonl"
    r = run_cli("replay", EXAMPLES / "rain.flac", "--model", cnn_dir, "--fast", "--quiet", "--jsonl", out,
                "--score-threshold", "0.3", "--max-results", "5")  # fmt: skip
    assert r.returncode == 0, r.stderr
    tops = [json.loads(line)["top"] for line in out.read_text().splitlines()]
    assert all(p >= 0.3 for top in tops for _, p in top)
    assert any(len(top) < 5 for top in tops) and any(top for top in tops)  # some hidden, some shown
    r = run_cli("replay", EXAMPLES / "rain.flac", "--model", cnn_dir, "--fast", "--plain", "--score-threshold", "1")
    lines = [line for line in r.stdout.splitlines() if line.strip().endswith("s  -")]
    assert r.returncode == 0 and len(lines) == 50, r.stdout  # a plain line with none above says so, not blank


def test_a_model_folder_s_own_events_toml_is_named_when_it_is_wrong(cnn_dir, tmp_path):
    """A model folder given another model's events.toml: the error names that file, not --event-config (which
    the user never gave)."""
    import shutil

    model = tmp_path / "model"
    shutil.copytree(cnn_dir, model)
    (model / "events.toml").write_text("[no_such_class]\non_threshold = 0.7\n")
    for command in (["replay", EXAMPLES / "dog.flac", "--fast"], ["tag", EXAMPLES / "dog.flac", "--out", tmp_path]):
        r = run_cli(*command, "--model", model)
        assert r.returncode == 2 and f"{model / 'events.toml'}: event settings: unknown class" in r.stderr
        assert "--event-config" not in r.stderr, r.stderr


def test_event_settings_name_the_wrong_key_and_the_likely_class(tmp_path):
    """[dog] min_gap = 0.8 said "'dog' must be a table with keys among [...]" without naming min_gap; [dgo] gave
    no "did you mean dog" where --allow dgo does."""
    from streamtag.errors import ConfigError
    from streamtag.events import EventDetector, EventParams, read_event_table

    wrong_key = tmp_path / "key.toml"
    wrong_key.write_text("[dog]\nmin_gap = 0.8\n")
    with pytest.raises(ConfigError, match=r"\[dog\] has an unknown key 'min_gap' \(did you mean min_gap_s\?\)"):
        read_event_table(wrong_key)
    with pytest.raises(ConfigError, match=r"unknown class 'dgo' \(did you mean dog\?\)"):
        EventDetector(list(LABELS), 0.01, per_class={"dgo": EventParams()})


BROKEN_ONNXRUNTIME = "raise ImportError('libonnxruntime.so: cannot open shared object file')\n"
# what pybind11 makes of a Ctrl-C that lands while onnxruntime's extension initialises
ONNXRUNTIME_IMPORT_INTERRUPTED = """
try:
    raise KeyboardInterrupt
except KeyboardInterrupt as exc:
    raise ImportError('initialization failed') from exc
"""


def _replay_with_fake_onnxruntime(tmp_path, source: str) -> subprocess.CompletedProcess:
    import os

    from .conftest import REPO

    fake = tmp_path / "onnxruntime"
    fake.mkdir()
    (fake / "__init__.py").write_text(source)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), str(REPO)])}
    return subprocess.run(
        [sys.executable, "-m", "streamtag", "replay", str(EXAMPLES / "dog.flac"), "--fast", "--quiet"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_an_onnxruntime_that_is_installed_but_fails_to_import_is_said_so(tmp_path):
    """Not "needs onnxruntime" (it is installed): what failed, in one line."""
    r = _replay_with_fake_onnxruntime(tmp_path, BROKEN_ONNXRUNTIME)
    assert r.returncode == 2 and "onnxruntime is installed but failed to import (libonnxruntime.so" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_a_ctrl_c_while_onnxruntime_imports_is_an_interruption_not_a_broken_install(tmp_path):
    """A Ctrl-C early in a run (CI caught it 0.6 s into `tag`) reached onnxruntime's import: it said the
    install was broken, exit 2, where the user had stopped the command (exit 130)."""
    r = _replay_with_fake_onnxruntime(tmp_path, ONNXRUNTIME_IMPORT_INTERRUPTED)
    assert r.returncode == 130 and "interrupted" in r.stderr, r.stderr
    assert "failed to import" not in r.stderr and "Traceback" not in r.stderr, r.stderr


def test_a_list_of_negative_levels_is_read_as_the_value_of_levels():
    """'--levels -10,-20' starts with a minus, which argparse takes for an option unless the value is glued on."""
    from streamtag.cli import _glue_negative_values

    glued = _glue_negative_values(["eval", "m", "d", "--levels", "-10,-20", "--report", "r"])
    assert glued == ["eval", "m", "d", "--levels=-10,-20", "--report", "r"]
    assert _glue_negative_values(["--levels", "-.5", "x"]) == ["--levels=-.5", "x"]
    assert _glue_negative_values(["--levels", "--quiet"]) == ["--levels", "--quiet"]  # an option stays one
    assert _glue_negative_values(["--", "--levels", "-10"]) == ["--", "--levels", "-10"]  # positional after --


def test_a_cache_that_cannot_be_written_is_one_line(cnn_dir):
    """A model without its exported step is exported into the cache: a service whose home is read-only
    (ProtectSystem=strict) got a traceback from that."""
    env = {**os.environ, "STREAMTAG_CACHE": "/proc/streamtag_cache"}
    r = run_cli("replay", EXAMPLES / "dog.flac", "--model", cnn_dir, "--fast", "--quiet", env=env)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert "cannot write the cache folder /proc/streamtag_cache/onnx" in r.stderr and "STREAMTAG_CACHE" in r.stderr


def test_default_names_the_bundled_model_for_every_command(cnn_dir, tmp_path):
    """eval and train --init took 'default'; replay, tag, bench and export said 'model folder not found'. Then a
    ./default folder (train --out default) was what --model default meant, but eval still took the bundled one."""
    import shutil

    shutil.copytree(cnn_dir, tmp_path / "default")  # a user's model in ./default: reached as ./default
    clip = str(EXAMPLES / "rain.flac")

    def events(model):
        r = run_cli("replay", clip, "--model", model, "--fast", "--quiet", "--events", "-", cwd=tmp_path)
        assert r.returncode == 0, r.stderr
        return [(e["label"], e["onset"], e["score_max"]) for e in map(json.loads, r.stdout.splitlines())]

    bundled = events("default")
    assert ("rain", 2.21) in [e[:2] for e in bundled]
    assert events("./default") != bundled and events(str(DEFAULT_MODEL_DIR)) == bundled
    r = run_cli("train", str(EXAMPLES), "--out", "default", cwd=tmp_path)
    assert r.returncode == 2 and "'default' names the bundled model" in r.stderr, r.stderr


def test_a_pipe_other_than_stdout_closing_is_an_error_not_a_quiet_exit(monkeypatch, capsys):
    """Only a stdout reader that left (| head) ends a command quietly with 0; any other closed pipe (a worker
    process gone) is an error: it had exited 0 with nothing written."""
    import streamtag.cli.devices as devices
    from streamtag.cli import main

    def broken(args):
        raise BrokenPipeError(32, "Broken pipe")

    monkeypatch.setattr(devices, "run", broken)
    assert main(["devices"]) == 1
    assert "streamtag devices: error: a pipe closed under it (Broken pipe)" in capsys.readouterr().err


def test_sigterm_stops_train_tag_and_eval_with_exit_0_and_ctrl_c_with_130(monkeypatch, capsys):
    """As live, replay and serve exit: tag, train and eval returned 130 for SIGTERM too (a service stopped by
    systemd read as failed), against the README's "exit 130 for SIGINT, 0 for SIGTERM"."""
    import signal

    import streamtag.cli.devices as devices
    from streamtag.cli import interrupt_on_signals, main

    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        for sig, code in ((signal.SIGTERM, 0), (signal.SIGINT, 130)):

            def stopped(args, sig=sig):  # a command that stops on the signal, as train, tag and eval do
                interrupt_on_signals()
                os.kill(os.getpid(), sig)
                time.sleep(5)  # the handler raises first
                raise AssertionError("no stop")

            monkeypatch.setattr(devices, "run", stopped)
            assert main(["devices"]) == code
            assert capsys.readouterr().err == "streamtag devices: interrupted\n"

            def turned(args, sig=sig):  # a library (Ray's calls) turning the stop into a plain KeyboardInterrupt
                try:
                    stopped(args, sig)
                except KeyboardInterrupt:
                    raise KeyboardInterrupt from None

            monkeypatch.setattr(devices, "run", turned)
            assert main(["devices"]) == code  # tag --ray stopped by SIGTERM exited 130 on the CI machine
            capsys.readouterr()
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)


def test_a_ctrl_c_while_the_commands_load_is_an_interruption(monkeypatch, capsys):
    """The first moments of a run import every subcommand's module: a Ctrl-C there is exit 130 and one line,
    not a traceback."""
    import streamtag.cli as cli

    def interrupted():
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "build_parser", interrupted)
    assert cli.main(["tag", "x"]) == 130
    assert capsys.readouterr().err == "streamtag: interrupted\n"


def test_only_an_interrupt_that_caused_an_import_error_is_taken_for_a_ctrl_c():
    """pybind11 gives the interrupt as the ImportError's cause; a broken install imported while an interrupt was
    being handled has it only as its context, and stays a broken install."""
    from streamtag.errors import raise_if_interrupted

    try:
        raise KeyboardInterrupt
    except KeyboardInterrupt as interrupt:
        caused = ImportError("initialization failed")
        caused.__cause__ = interrupt
        broken = ImportError("libonnxruntime.so: cannot open shared object file")  # raised here: context only
        try:
            raise broken
        except ImportError:
            pass
    assert isinstance(broken.__context__, KeyboardInterrupt)
    raise_if_interrupted(broken)  # returns: the caller reports the broken install
    with pytest.raises(KeyboardInterrupt):
        raise_if_interrupted(caused)
    from streamtag.errors import Terminated

    caused.__cause__ = Terminated()  # a SIGTERM while onnxruntime loads: still a SIGTERM (exit 0), not a Ctrl-C
    with pytest.raises(Terminated):
        raise_if_interrupted(caused)


def test_an_unknown_option_is_said_by_its_command_with_the_likely_one(capsys):
    """A typo went to the top level ("see 'streamtag --help'") with no hint; another command's option (live
    --plot) read as if it were no option at all."""
    from streamtag.cli import main

    with pytest.raises(SystemExit) as ended:
        main(["replay", "x.wav", "--fats"])
    err = capsys.readouterr().err
    assert ended.value.code == 2 and err.startswith("streamtag replay: error: unrecognized arguments: --fats")
    assert "(did you mean --fast?)" in err and "see 'streamtag replay --help'" in err
    with pytest.raises(SystemExit):
        main(["tag", "a.wav", "--out", "o", "--xyz"])
    assert "did you mean" not in capsys.readouterr().err  # --xyz is near nothing (it was "did you mean --ray?")
    with pytest.raises(SystemExit):
        main(["live", "--plot", "x.png"])
    assert "(--plot is an option of eval, replay, not of live); see 'streamtag live --help'" in capsys.readouterr().err
