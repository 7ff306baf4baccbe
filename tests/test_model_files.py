"""Model files are data, not code: pickles never run, a config that does not match its weights is named."""

import json
import os
import pickle

import pytest

from streamtag.errors import ModelFileError

from .conftest import EXAMPLES, run_cli


class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_pickled_code_is_never_run_as_weights(cnn_dir, tmp_path):
    import shutil

    bad = tmp_path / "evil_model"
    shutil.copytree(cnn_dir, bad)
    marker = tmp_path / "pwned"
    (bad / "model.safetensors").write_bytes(pickle.dumps({"w": _Payload(marker)}))
    for backend in ("torch", "onnx"):
        r = run_cli("replay", EXAMPLES / "dog.flac", "--model", bad, "--backend", backend, "--fast", "--quiet")
        assert r.returncode == 2 and "Traceback" not in r.stderr
        assert "is not a safetensors file" in r.stderr, r.stderr  # the file it names, and why
    assert not marker.exists()


def test_pickled_code_is_never_run_as_checkpoint(tmp_path):
    import torch

    from streamtag.training.trainer import _check_same_run  # where --resume reads the checkpoint

    marker = tmp_path / "pwned"
    ckpt = tmp_path / "checkpoint.pt"
    torch.save({"epoch": 1, "model": _Payload(marker)}, ckpt)
    with pytest.raises(ModelFileError, match="not a checkpoint"):
        _check_same_run(ckpt, ["a", "b"], [])
    assert not marker.exists()


def test_config_and_weights_mismatch_is_named(cnn_dir, tmp_path):
    import shutil

    bad = tmp_path / "mismatch"
    shutil.copytree(cnn_dir, bad)
    cfg = json.loads((bad / "config.json").read_text())
    cfg["labels"].append("extra_class")
    (bad / "config.json").write_text(json.dumps(cfg))
    r = run_cli("replay", EXAMPLES / "dog.flac", "--model", bad, "--fast", "--quiet")
    assert r.returncode == 2 and "head.proj.weight" in r.stderr and "(6, " in r.stderr
    cfg["features"]["n_mels"] = 40
    cfg["labels"].pop()
    (bad / "config.json").write_text(json.dumps(cfg))
    r = run_cli("replay", EXAMPLES / "dog.flac", "--model", bad, "--fast", "--quiet")
    assert r.returncode == 2 and "disagree" in r.stderr
    (bad / "config.json").write_text("{not json")
    r = run_cli("replay", EXAMPLES / "dog.flac", "--model", bad, "--fast", "--quiet")
    assert r.returncode == 2 and "not valid JSON" in r.stderr
