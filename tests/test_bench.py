"""`streamtag bench` (the real-time check) and the benchmark suite in benchmarks/ run (figures only, no timing
thresholds); the onnx path never imports torch."""

import json
import re
import subprocess
import sys

from .conftest import EXAMPLES, REPO, run_cli

SUMMARY_KEYS = [
    "frame_total_p50_ms",
    "frame_total_p99_ms",
    "deadline_misses",
    "cpu_ms_per_audio_s",
    "silero_cpu_ms_per_audio_s",
    "silero_raw_cpu_ms_per_audio_s",
    "streams_per_core",
    "e2e_p99_ms",
    "rss_growth_mb",
    "first_probability_s",
    "replay_over_silero_cpu",
    "tag_real_time_factor",
    "machine",
    "date",
]


def test_suite_quick_writes_report_and_plot(cnn_dir, tmp_path):
    out, png = tmp_path / "bench.json", tmp_path / "cdf.png"
    script = REPO / "benchmarks" / "run_benchmarks.py"
    r = subprocess.run(
        [sys.executable, str(script), "--quick", "--model", str(cnn_dir), "--out", str(out), "--plot", str(png)],
        capture_output=True,
        text=True,
        timeout=1200,
    )
    assert r.returncode == 0, r.stderr
    report = json.loads(out.read_text())
    assert list(report)[0] == "summary" and list(report["summary"]) == SUMMARY_KEYS
    s = report["summary"]
    assert s["frame_total_p50_ms"] > 0 and s["frame_total_p99_ms"] >= s["frame_total_p50_ms"]
    assert s["streams_per_core"] >= 1 and s["first_probability_s"] > 0
    assert set(report["architectures"]) == {"lstm", "attention", "cnn"}
    assert report["default_model"]["onnx"]["frames"] == 2000
    assert report["first_probability"]["torch_imported"] is False
    assert report["whole_process"]["audio_s"] == 60 and report["whole_process"]["replay_fast_cpu_s"] > 0
    assert "| default | onnx |" in r.stdout
    assert png.read_bytes()[:4] == b"\x89PNG"


def test_onnx_replay_does_not_import_torch(cnn_dir):
    from streamtag.backends.onnx_backend import open_session  # noqa: F401  (export cached before the check)
    from streamtag.modelfile import resolve_model_dir

    run_cli("replay", EXAMPLES / "dog.flac", "--model", resolve_model_dir(cnn_dir), "--fast", "--quiet")
    code = (
        "import sys, streamtag.cli as c; rc = c.main(sys.argv[1:]); "
        "assert 'torch' not in sys.modules, 'torch was imported'; sys.exit(rc)"
    )
    r = subprocess.run(
        [
            sys.executable,
            "-c",
            code,
            "replay",
            str(EXAMPLES / "dog.flac"),
            "--model",
            str(cnn_dir),
            "--fast",
            "--quiet",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr


def test_bench_says_whether_this_machine_runs_the_model_in_real_time(cnn_dir, tmp_path):
    """`streamtag bench` writes nothing without --out (run in an empty folder), and the figures with it; its exit
    code is its verdict (a script can use it as a check), judged only with the paced run."""
    r = run_cli("bench", "--model", cnn_dir, "--seconds", "2", "--paced-seconds", "0.5", cwd=tmp_path)
    assert r.returncode == (0 if "real time: yes" in r.stdout else 1), r.stderr
    assert "real time: " in r.stdout and "of a core, paced" in r.stdout and list(tmp_path.iterdir()) == []
    out = tmp_path / "b.json"
    r = run_cli("bench", "--model", cnn_dir, "--seconds", "2.3", "--paced-seconds", "0", "--out", out)
    assert r.returncode == 0 and "not judged" in r.stdout
    report = json.loads(out.read_text())
    assert report["engine"]["hops"] == 230 and report["paced"] is None and report["real_time"] is None  # not 229
    assert report["model"] == str(cnn_dir.resolve())  # where it was, not as typed
    assert report["engine"]["p99_ms"] >= report["engine"]["p50_ms"] > 0
    assert report["core_share_per_stream"] is None and report["core_share_back_to_back"] > 0
    r = run_cli("bench", "--model", cnn_dir, "--seconds", "1", "--paced-seconds", "0.5", "--out", "-", cwd=tmp_path)
    report = json.loads(r.stdout)  # the JSON alone on stdout, the text on stderr, no file named -
    assert report["paced"]["hops"] == 50 and report["core_share_per_stream"] > 0 and "real time: " in r.stderr
    assert list(tmp_path.iterdir()) == [out]
    r = run_cli("bench", "--model", cnn_dir, "--paced-seconds", "0.005")
    assert r.returncode == 2 and "--paced-seconds must be 0 (no paced run) or in 0.5..600 (0.005 given)" in r.stderr
    r = run_cli("bench", "--model", cnn_dir, "--seconds", "0.5")
    assert r.returncode == 2 and "--seconds must be in 1..3600 (0.5 given)" in r.stderr and "paced" not in r.stderr


def test_bench_checks_its_paths_before_measuring(tmp_path):
    for option, name in (("--out", "b.json"),):
        path = tmp_path / "missing" / name
        r = run_cli("bench", option, path, cwd=tmp_path)
        assert r.returncode == 2 and "Traceback" not in r.stderr and "measuring" not in r.stderr
        assert r.stderr.strip().startswith(f"streamtag bench: error: {option} {path}: output folder ")
    assert list(tmp_path.iterdir()) == []


def test_a_machine_too_slow_is_told_what_to_try(cnn_dir, monkeypatch, capsys):
    """A "no" said only the figure; it names what to try (the clock made slow here: every hop takes 20 ms)."""
    import itertools

    from streamtag.cli import bench, main

    ticks = itertools.count(0, 20_000_000)
    monkeypatch.setattr(bench.time, "perf_counter_ns", lambda: next(ticks))
    code = main(["bench", "--model", str(cnn_dir), "--seconds", "1", "--paced-seconds", "0.5", "--backend", "torch"])
    out = capsys.readouterr().out
    assert code == 1 and re.search(r"real time: no \(paced p99 [\d.]+ ms is \d+% of the 10 ms budget", out), out
    assert "a longer --paced-seconds" in out and "the onnx backend is faster" in out
