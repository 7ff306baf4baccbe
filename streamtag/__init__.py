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
    :class:`~streamtag.features.StreamingLogMel`, :func:`~streamtag.features.log_mel_offline`.

Models and backends
    ``streamtag.models`` (torch: LSTM, attention, CNN; training and export) and
    :func:`~streamtag.backends.make_backend` (``"onnx"``, the fast default, or ``"torch"``).

Worker and outputs
    :class:`~streamtag.worker.Worker` (ring -> features -> model -> events -> outputs),
    :class:`~streamtag.events.EventDetector`, ``streamtag.outputs``.

Conveniences
    :func:`~streamtag.pipeline.tag_file` (a file through the whole streaming path),
    :class:`~streamtag.multistream.MultiStreamTagger` (many streams, one batched call).

Importing :mod:`streamtag` imports neither torch nor sounddevice.
"""

from .backends import make_backend
from .config import FeatureConfig, ModelConfig
from .errors import (
    AudioFileError,
    BackendUnavailable,
    ConfigError,
    DatasetError,
    DeviceError,
    ModelFileError,
    StreamtagError,
    UnknownDeviceError,
)
from .events import Event, EventDetector, EventParams
from .multistream import MultiStreamTagger
from .pipeline import FileResult, tag_file
from .ring import SpscRing
from .sources import WavReplaySource, read_audio
from .worker import Step, Summary, Worker

__version__ = "0.1.0"

__all__ = [
    "AudioFileError",
    "BackendUnavailable",
    "ConfigError",
    "DatasetError",
    "DeviceError",
    "Event",
    "EventDetector",
    "EventParams",
    "FeatureConfig",
    "FileResult",
    "ModelConfig",
    "ModelFileError",
    "MultiStreamTagger",
    "SpscRing",
    "Step",
    "StreamtagError",
    "Summary",
    "UnknownDeviceError",
    "WavReplaySource",
    "Worker",
    "make_backend",
    "read_audio",
    "tag_file",
]
