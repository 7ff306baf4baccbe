"""streamtag: a real-time streaming audio tagger.

API overview
------------
Data flows top to bottom; each stage is one module.

Sources (push float32 mono blocks into the ring)
    :class:`~streamtag.sources.WavReplaySource`, ``streamtag.sources.device.MicrophoneSource``
    (imported on demand: it needs PortAudio), :func:`~streamtag.sources.read_audio`.

Ring buffer
    :class:`~streamtag.ring.SpscRing`: lock-free, one writer (the audio callback), one reader (the worker).

Features
    :class:`~streamtag.features.LogMel` (inside the hop step), :func:`~streamtag.features.log_mel_offline`.

Models and backends
    ``streamtag.models`` (torch: LSTM, attention, CNN; training and export) and
    :func:`~streamtag.backends.make_backend` (``"onnx"``, the fast default, or ``"torch"``).

The engine (one per stream; every runner below drives it)
    :class:`~streamtag.engine.StreamTagger`: ``feed(samples) -> [Step]``, ``finish()``, ``reset()``;
    hops, input guard, model, :class:`~streamtag.events.EventDetector`; :class:`~streamtag.steps.Step`.

Runners and outputs
    :class:`~streamtag.worker.Worker` (a thread: ring -> engine -> outputs, for ``live`` and ``replay``),
    :func:`~streamtag.pipeline.tag_file` (a file in a plain loop),
    :class:`~streamtag.multistream.MultiStreamTagger` (many engines, one batched model call a round),
    ``streamtag.outputs`` (each a class with ``write(step)`` and ``close()``).

Importing :mod:`streamtag` imports neither torch nor sounddevice.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from .errors import (
    AudioFileError,
    BackendUnavailable,
    ConfigError,
    DatasetError,
    DeviceError,
    InputError,
    ModelFileError,
    StreamtagError,
    UnknownDeviceError,
)

if TYPE_CHECKING:
    from .backends import Backend, make_backend
    from .config import FeatureConfig, ModelConfig
    from .engine import StreamTagger
    from .events import Event, EventDetector, EventParams
    from .multistream import MultiStreamTagger
    from .pipeline import FileResult, tag_file
    from .ring import SpscRing
    from .sources import Source, WavReplaySource, read_audio
    from .steps import Output, Step, StepBlock
    from .worker import Summary, Worker

# the rest of the API is imported on first use (PEP 562): a command-line process loads only the modules
# its command needs, which is most of its start-up time when it tags a file in a fraction of a second
_LAZY = {
    "Backend": "backends",
    "make_backend": "backends",
    "FeatureConfig": "config",
    "ModelConfig": "config",
    "StreamTagger": "engine",
    "Event": "events",
    "EventDetector": "events",
    "EventParams": "events",
    "MultiStreamTagger": "multistream",
    "FileResult": "pipeline",
    "tag_file": "pipeline",
    "SpscRing": "ring",
    "WavReplaySource": "sources",
    "read_audio": "sources",
    "Source": "sources",
    "Output": "steps",
    "Step": "steps",
    "StepBlock": "steps",
    "Summary": "worker",
    "Worker": "worker",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'streamtag' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


__version__ = "0.1.0"

__all__ = [
    "AudioFileError",
    "Backend",
    "BackendUnavailable",
    "ConfigError",
    "DatasetError",
    "DeviceError",
    "Event",
    "EventDetector",
    "EventParams",
    "FeatureConfig",
    "FileResult",
    "InputError",
    "ModelConfig",
    "ModelFileError",
    "MultiStreamTagger",
    "Output",
    "Source",
    "SpscRing",
    "Step",
    "StepBlock",
    "StreamTagger",
    "StreamtagError",
    "Summary",
    "UnknownDeviceError",
    "WavReplaySource",
    "Worker",
    "make_backend",
    "read_audio",
    "tag_file",
]
