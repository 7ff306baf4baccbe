"""A user's install without torch (`pip install streamtag`): replay and live run; torch-only commands name the extra.

`.ci/setup` makes `.venv-notorch` beside `.venv` with the runtime dependencies alone.
"""

import json
import signal
import subprocess

import pytest

from .conftest import EXAMPLES, REPO, read_clip
from .virtual_mic import ALSA_DEVICE, alsa_file_mic, wait_for_lines

LITE = REPO / ".venv-notorch" / "bin"


@pytest.fixture(scope="module")
def lite():
    if not (LITE / "streamtag").is_file():
        pytest.skip(f"{LITE.parent} absent (made by .ci/setup): no torch-free environment to test")
    return LITE


def _run(lite, *args, **kwargs):
    return subprocess.run(
        [str(lite / "streamtag"), *map(str, args)], capture_output=True, text=True, timeout=300, **kwargs
    )


def test_the_environment_really_lacks_torch(lite):
    r = subprocess.run([str(lite / "python"), "-c", "import torch"], capture_output=True, text=True)
    assert r.returncode != 0 and "No module named 'torch'" in r.stderr


def test_the_declared_minimum_python_is_the_one_tested(lite):
    """pyproject says >= 3.10; .ci/setup builds the torch-free environment on 3.10 when the machine has it."""
    import re

    declared = re.search(r'requires-python = ">=(3\.\d+)"', (REPO / "pyproject.toml").read_text()).group(1)
    version = subprocess.run(
        [str(lite / "python"), "-c", "import sys; print('%d.%d' % sys.version_info[:2])"],
        capture_output=True,
        text=True,
    ).stdout.strip()
    if version != declared:
        pytest.skip(f"the torch-free environment runs Python {version}; no Python {declared} on this machine")
    r = _run(lite, "replay", EXAMPLES / "dog.flac", "--fast", "--quiet")  # tomllib's fallback, 3.10 syntax
    assert r.returncode == 0, r.stderr


def test_replay_runs_without_torch(lite, tmp_path):
    events = tmp_path / "ev.jsonl"
    r = _run(lite, "replay", EXAMPLES / "rain.flac", "--fast", "--quiet", "--events", events)
    assert r.returncode == 0, r.stderr
    rows = [json.loads(line) for line in events.read_text().splitlines()]
    assert ("open", "rain") in [(row["type"], row["label"]) for row in rows]


def test_tag_runs_without_torch(lite, tmp_path):
    r = _run(lite, "tag", EXAMPLES, "--out", tmp_path / "out", "--jobs", "1")
    assert r.returncode == 0, r.stderr
    labels = (tmp_path / "out" / "examples" / "rain.flac.labels.txt").read_text()
    assert "\train" in labels


def test_ray_is_an_extra_named_when_missing(lite, tmp_path):
    r = _run(lite, "tag", EXAMPLES, "--out", tmp_path / "out", "--ray", "auto")
    assert r.returncode == 2 and "pip install '.[ray]'" in r.stderr and "Traceback" not in r.stderr


def test_live_runs_without_torch(lite, tmp_path):
    env = alsa_file_mic(tmp_path, read_clip(EXAMPLES / "dog.flac"))
    out = tmp_path / "live.jsonl"
    proc = subprocess.Popen(
        [str(lite / "streamtag"), "live", "--device", ALSA_DEVICE, "--jsonl", out, "--quiet"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert wait_for_lines(out, 20, proc) >= 20
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err


@pytest.mark.parametrize(
    "args",
    [
        ["train", "{data}", "--out", "{tmp}/m"],
        ["replay", "{dog}", "--backend", "torch", "--fast", "--quiet"],
        ["replay", "{dog}", "--fast", "--quiet", "--plot", "{tmp}/p.png"],
        ["tag", "{dog}", "--out", "{tmp}/out", "--backend", "torch"],  # was one error per file, exit 1
        ["eval", "default", "{data}", "--plot", "--report", "{tmp}/out"],  # was after scoring every clip
    ],
)
def test_torch_only_commands_name_the_extra(lite, tmp_path, args):
    fill = {"data": EXAMPLES, "tmp": tmp_path, "dog": EXAMPLES / "dog.flac"}
    r = _run(lite, *[a.format(**fill) for a in args])
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "pip install '.[" in lines[0] and "Traceback" not in r.stderr
    assert not r.stdout and not (tmp_path / "out").exists()  # checked before any work or output


def test_eval_runs_without_torch_leaving_out_the_baseline_it_needs(lite, tmp_path):
    """The README's quick look (eval default DATA --levels 0) failed without torch once a dataset had 10 clips:
    the baseline, a comparison, needed it. Left out with a note now, unless --baseline-folds asks for it."""
    import soundfile as sf

    for name in ("dog", "rain"):
        (tmp_path / "data" / name).mkdir(parents=True)
        audio = read_clip(EXAMPLES / f"{name}.flac")
        for k in range(5):
            sf.write(tmp_path / "data" / name / f"{k}.wav", audio[k * 16000 : (k + 1) * 16000], 16000)
    r = _run(lite, "eval", "default", tmp_path / "data", "--levels", "0", "--report", tmp_path / "r")
    assert r.returncode == 0 and "note: no baseline (it needs torch" in r.stderr, r.stderr
    assert "baseline_acc" not in json.loads((tmp_path / "r" / "report.json").read_text())
    r = _run(lite, "eval", "default", tmp_path / "data", "--baseline-folds", "5", "--report", tmp_path / "r2")
    assert r.returncode == 2 and "the baseline needs torch" in r.stderr and not (tmp_path / "r2").exists(), r.stderr


def test_serve_runs_without_torch(lite, tmp_path):
    import asyncio
    import json
    import sys
    import time

    aiohttp = pytest.importorskip("aiohttp")
    port_file = tmp_path / "port"
    proc = subprocess.Popen(
        [str(lite / "streamtag"), "serve", "--port", "0", "--port-file", str(port_file)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 60
        while not (port_file.exists() and port_file.read_text().strip()) and proc.poll() is None:
            assert time.monotonic() < deadline, "serve did not start"
            time.sleep(0.05)
        port = int(port_file.read_text())
        pcm = (read_clip(EXAMPLES / "rain.flac") * 32767).astype("<i2").tobytes()

        async def client():
            async with aiohttp.ClientSession() as session:
                async with session.ws_connect(f"ws://127.0.0.1:{port}/v1/streams/porch") as ws:
                    await ws.send_bytes(pcm)
                    await ws.send_str(json.dumps({"type": "eof"}))
                    return [json.loads(m.data) async for m in ws if m.type == aiohttp.WSMsgType.TEXT]

        messages = asyncio.run(client())
        assert ("open", "rain") in [(m["type"], m.get("label")) for m in messages]
        r = subprocess.run([str(lite / "python"), "-c", "import torch"], capture_output=True)
        assert r.returncode != 0 and sys.executable not in str(lite)
    finally:
        proc.kill()
        proc.communicate(timeout=30)


def test_a_model_without_its_chunk_graph_runs_with_one_line_saying_so(lite, tmp_path):
    """A model exported with --onnx alone: backlogs go hop by hop (the same scores), said in one line, not as
    Python's RuntimeWarning with a source path and a line of code."""
    import shutil

    model = tmp_path / "model"
    model.mkdir()
    bundled = REPO / "streamtag" / "assets" / "default_model"
    for name in ("config.json", "model.safetensors", "model.onnx"):
        shutil.copy(bundled / name, model / name)
    env = {"STREAMTAG_CACHE": str(tmp_path / "cache"), "PATH": "/usr/bin:/bin"}
    r = _run(lite, "replay", EXAMPLES / "dog.flac", "--fast", "--quiet", "--model", model, env=env)
    assert r.returncode == 0, r.stderr
    assert "streamtag replay: warning: stepping backlogs hop by hop" in r.stderr, r.stderr
    assert "RuntimeWarning" not in r.stderr and ".py:" not in r.stderr
