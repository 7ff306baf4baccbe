"""Model folders on disk, readable without torch.

A model folder holds ``config.json`` (a :class:`~streamtag.config.ModelConfig`),
``model.safetensors`` (the weights) and, optionally, ``model.onnx`` and ``chunk.onnx`` (the exported
hop and chunk steps, tagged with the fingerprint of the config and weights they came from).
The default model ships inside the package.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from .config import ModelConfig
from .errors import ConfigError, ModelFileError

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
ONNX_NAME = "model.onnx"
CHUNK_NAME = "chunk.onnx"  # the chunk step: many hops of one backlog in one call (optional; exported when missing)
FINGERPRINT_KEY = "streamtag_fingerprint"
CHUNK_KEY = "streamtag_chunk_hops"  # the most hops a chunk graph takes in one call
RING_KEY = "streamtag_delay_lines"  # JSON {"frames", "lags", "width"} when the step keeps rings (RingHopStep)
# Bumped whenever the exported step's inputs, outputs or state layout change, so graphs
# exported by an older streamtag (shipped or cached) are exported again rather than misread.
EXPORT_LAYOUT = "step-v3"

DEFAULT_MODEL_DIR = Path(__file__).parent / "assets" / "default_model"


def resolve_model_dir(path: str | os.PathLike | None) -> Path:
    """The folder a ``--model`` option names (the bundled default when ``None``), checked to exist."""
    # the word "default" is the bundled model in every command (a folder of that name is ./default): eval and
    # train --init took it so while --model default took a ./default folder first. A Path is always a folder
    # (Path("./default") reads as "default": a folder resolved once is passed on as one)
    folder = DEFAULT_MODEL_DIR if path is None or path == "default" else Path(path)
    if folder.is_file() and folder.name in (CONFIG_NAME, WEIGHTS_NAME, ONNX_NAME):
        folder = folder.parent
    if not folder.is_dir():
        what = "is a file, not a model folder" if folder.exists() else "model folder not found"
        raise ModelFileError(
            f"{folder}: {what} (give a folder holding {CONFIG_NAME} and {WEIGHTS_NAME}, or default for the bundled "
            "model: --model DIR for live, replay, tag, bench and serve, the first argument for eval and export)"
        )
    for name in (CONFIG_NAME, WEIGHTS_NAME):
        if not (folder / name).is_file():
            fix = "train one with 'streamtag train', or give another model folder"
            if (folder / ONNX_NAME).is_file():  # an exported graph alone: it runs from beside its model's files
                fix = f"an exported graph runs from a copy of its model's folder: copy {CONFIG_NAME}, {WEIGHTS_NAME} in"
            raise ModelFileError(f"model folder {folder} lacks {name} ({fix})")
    return folder


def load_config(folder: Path) -> ModelConfig:
    try:
        data = json.loads((folder / CONFIG_NAME).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelFileError(f"{folder / CONFIG_NAME} is not valid JSON: {exc}") from None
    try:
        return ModelConfig.from_dict(data)
    except ConfigError as exc:
        raise ModelFileError(f"{folder / CONFIG_NAME}: {exc}") from None


def fingerprint(folder: Path) -> str:
    """SHA-256 over config, weights and export layout: an exported graph is reused only for this exact triple."""
    digest = hashlib.sha256(EXPORT_LAYOUT.encode())
    for name in (CONFIG_NAME, WEIGHTS_NAME):
        digest.update((folder / name).read_bytes())
    return digest.hexdigest()


def cache_dir() -> Path:
    """Where exported ONNX graphs of user models are cached (``$STREAMTAG_CACHE`` or XDG cache)."""
    if os.environ.get("STREAMTAG_CACHE"):
        return Path(os.environ["STREAMTAG_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "streamtag"


def writable_cache(folder: Path, option: str = "STREAMTAG_CACHE") -> Path:
    """``folder`` made if need be, or ConfigError naming the fix: a service with a read-only home (systemd's
    ProtectSystem=strict) or a typo in ``--cache`` must get a line, not a traceback mid-run."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".write-test.{os.getpid()}"
        probe.touch()
        probe.unlink()
    except OSError as exc:
        why = exc.strerror or type(exc).__name__
        raise ConfigError(
            f"cannot write the cache folder {folder} ({why}): set {option} to a folder you can write"
        ) from None
    return folder
