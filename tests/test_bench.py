"""The benchmark suite runs (no timing thresholds: figures only) and the onnx path never imports torch."""

import importlib.util
import json
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
    "machine",
    "date",
]


def test_bench_quick_writes_report_and_plot(cnn_dir, tmp_path):
    out, png = tmp_path / "bench.json", tmp_path / "cdf.png"
    r = run_cli("bench", "--quick", "--model", cnn_dir, "--out", out, "--plot", png, timeout=600)
    assert r.returncode == 0, r.stderr
    report = json.loads(out.read_text())
    assert list(report)[0] == "summary" and list(report["summary"]) == SUMMARY_KEYS
    s = report["summary"]
    assert s["frame_total_p50_ms"] > 0 and s["frame_total_p99_ms"] >= s["frame_total_p50_ms"]
    assert s["streams_per_core"] >= 1 and s["first_probability_s"] > 0
    assert set(report["architectures"]) == {"lstm", "attention", "cnn"}
    assert report["default_model"]["onnx"]["frames"] == 2000
    assert report["first_probability"]["torch_imported"] is False
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


def test_bench_writes_a_report_only_where_asked(tmp_path, monkeypatch):
    """`streamtag bench` writes nothing without --out; run_benchmarks.py keeps benchmarks/results/bench.json."""
    import streamtag.bench
    from streamtag.cli import main

    calls = []
    monkeypatch.setattr(streamtag.bench, "run", lambda quick, out, *rest: calls.append(out))
    monkeypatch.chdir(tmp_path)
    assert main(["bench", "--quick"]) == 0 and calls == [None]
    assert list(tmp_path.iterdir()) == []
    spec = importlib.util.spec_from_file_location("run_benchmarks", REPO / "benchmarks" / "run_benchmarks.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    assert script.bench_argv(["--quick"]) == ["bench", "--quick", "--out", str(REPO / "benchmarks/results/bench.json")]
    assert script.bench_argv(["--out", "x.json"]) == ["bench", "--out", "x.json"]


def test_bench_checks_its_paths_before_measuring(tmp_path):
    for option, name in (("--out", "b.json"), ("--plot", "cdf.png")):
        path = tmp_path / "missing" / name
        r = run_cli("bench", "--quick", option, path, cwd=tmp_path)
        assert r.returncode == 2 and "Traceback" not in r.stderr and "measuring" not in r.stderr
        assert r.stderr.strip().startswith(f"streamtag bench: error: {option} {path}: output folder ")
    assert list(tmp_path.iterdir()) == []
