"""Live capture from a sound device through sounddevice (PortAudio).

Imported only where a microphone is used. The callback contract, as sounddevice
documents for ``InputStream``::

    callback(indata: numpy.ndarray, frames: int, time: CData, status: CallbackFlags) -> None

It runs on PortAudio's real-time thread and must not allocate, block, touch files
or take locks. Ours does three things: downmix into a preallocated buffer, copy
into the ring (dropping and counting what does not fit), and count status flags.
"""

from __future__ import annotations

import threading

import numpy as np

from ..errors import BackendUnavailable, DeviceError, UnknownDeviceError
from ..ring import SpscRing
from .base import SourceStatus

MAX_CHANNELS = 8  # downmix at most this many device channels
STOP_TIMEOUT_S = 2.0  # stopping a stream waits this long for the device at most


def import_sounddevice():
    """``import sounddevice``, with the fix named when PortAudio is missing."""
    try:
        import sounddevice
    except OSError:
        raise BackendUnavailable(
            "PortAudio library not found: install it with 'apt-get install libportaudio2' "
            "(replay, train, eval and bench work without it)"
        ) from None
    return sounddevice


def list_input_devices() -> list[tuple[int, str, int, float]]:
    """``(index, name, input channels, default rate)`` of every device that can record."""
    sd = import_sounddevice()
    return [
        (i, d["name"], d["max_input_channels"], d["default_samplerate"])
        for i, d in enumerate(sd.query_devices())
        if d["max_input_channels"] > 0
    ]


def _device_choices() -> str:
    try:
        rows = list_input_devices()
    except Exception:  # listing is best-effort inside an error message
        return ""
    return "; input devices: " + (", ".join(f"[{i}] {name}" for i, name, _, _ in rows) or "none")


def _parse_device(device: str | int | None) -> str | int | None:
    if isinstance(device, str) and device.strip().isdigit():
        return int(device)
    if isinstance(device, str) and not device.strip():
        raise UnknownDeviceError(f"--device {device!r}: give a device name or index{_device_choices()}")
    return device


class MicrophoneSource:
    """Args:
    sample_rate (int): the model rate. The device is opened at it when supported,
        otherwise at the device's default rate (the worker then resamples).
    device (str, int or None): name substring or index; the system default when ``None``.
    block_size (int): frames per callback at the model rate. (Default: one hop)
    """

    is_live = True

    def __init__(self, sample_rate: int, device: str | int | None = None, block_size: int = 160) -> None:
        sd = self._sd = import_sounddevice()
        device = _parse_device(device)
        try:
            info = sd.query_devices(device, "input")
        except ValueError as exc:  # no name matches, or several do (sounddevice lists them on lines of its own)
            lines = str(exc).splitlines()
            first, matches = lines[0].rstrip(":"), [line.strip() for line in lines[1:] if line.strip()]
            if matches:  # the ones the name matched, then how to pick one (the full list follows)
                first += f" ({'; '.join(matches)}): give more of the name, or the index"
            raise UnknownDeviceError(f"--device {device}: {first}{_device_choices()}") from None
        except sd.PortAudioError as exc:
            if device is not None:  # an index with no device behind it
                raise UnknownDeviceError(f"--device {device}: no device has this index{_device_choices()}") from None
            raise DeviceError(
                f"no input device available ({exc}); plug in a microphone or see 'streamtag devices'"
            ) from None
        if device is not None and info["max_input_channels"] < 1:
            raise UnknownDeviceError(f"--device {device}: '{info['name']}' cannot record{_device_choices()}")
        self.device_name = info["name"]
        self.channels, self.sample_rate = self._choose_format(
            device, int(info["max_input_channels"]), sample_rate, int(info["default_samplerate"])
        )
        self.block_size = max(1, round(block_size * self.sample_rate / sample_rate))
        self.description = f"{self.device_name} @ {self.sample_rate} Hz"
        self.status = SourceStatus()
        self.error: str | None = None
        self._device = device
        self._ring: SpscRing | None = None
        self._mono = np.zeros(self.block_size * 16, dtype=np.float32)
        self._stream = None
        self.abandoned = False  # a stop that timed out: the device is left to the process's end
        self._stopping = False

    def _choose_format(self, device, max_channels: int, model_rate: int, device_rate: int) -> tuple[int, int]:
        """Mono at the model rate if the device takes it; else fewer channels (downmixed), else its own rate."""
        channel_options = sorted({1, min(2, max_channels), max(1, min(max_channels, MAX_CHANNELS))})
        for rate in (model_rate, device_rate):
            for channels in channel_options:
                try:
                    self._sd.check_input_settings(device=device, channels=channels, samplerate=rate, dtype="float32")
                    return channels, rate
                except Exception:  # PortAudio says no to this combination: try the next
                    continue
        raise DeviceError(
            f"input device '{self.device_name}' accepts neither {model_rate} Hz nor {device_rate} Hz "
            f"with 1-{max_channels} channels"
        )

    def _callback(self, indata: np.ndarray, frames: int, time, status) -> None:
        if status.input_overflow:
            self.status.input_overflows += 1
        if status.input_underflow:
            self.status.input_underflows += 1
        if self.channels == 1:
            self._ring.push(indata[:, 0])
            return
        step = self._mono.shape[0]  # downmix into a preallocated buffer, a buffer's worth at a time
        for start in range(0, frames, step):
            part = indata[start : start + step]
            np.mean(part, axis=1, out=self._mono[: part.shape[0]])
            self._ring.push(self._mono[: part.shape[0]])

    def _finished(self) -> None:
        if not self._stopping:
            self.error = f"input device '{self.device_name}' stopped delivering audio (unplugged or server gone)"
            if self._ring is not None:
                self._ring.doorbell.ring()

    def restart(self) -> None:
        """Open the device again after it was lost (``live --reconnect``): PortAudio re-scans its devices,
        so a replugged USB microphone is found again by name. Raises :class:`DeviceError` while it is absent,
        and for good once a stop was abandoned: PortAudio's re-scan would wait on the stuck stream for ever."""
        self.stop()
        if self.abandoned:
            raise DeviceError(f"the sound device '{self.device_name}' did not stop (is the sound server hung?)")
        self._stopping = False
        self.error = None
        sd = self._sd
        try:
            sd._terminate()  # sounddevice's documented way to re-enumerate: terminate, then initialize
            sd._initialize()
            info = sd.query_devices(self._device if self._device is not None else None, "input")
        except (ValueError, sd.PortAudioError) as exc:
            raise DeviceError(f"input device '{self.device_name}' not back yet ({exc})") from None
        if info["name"] != self.device_name and isinstance(self._device, int):
            raise DeviceError(f"device index {self._device} is now '{info['name']}', not '{self.device_name}'")
        self.start(self._ring)

    def start(self, ring: SpscRing) -> None:
        self._ring = ring
        sd = self._sd
        try:
            self._stream = sd.InputStream(
                device=self._device,
                channels=self.channels,
                samplerate=self.sample_rate,
                dtype="float32",
                blocksize=self.block_size,
                callback=self._callback,
                finished_callback=self._finished,
            )
            self._stream.start()
        except sd.PortAudioError as exc:
            raise DeviceError(f"could not open input device '{self.device_name}': {exc}") from None

    def stop(self) -> None:
        """Stop and close the stream, waiting at most :data:`STOP_TIMEOUT_S`: PortAudio waits for the device,
        and a frozen sound server (a hung PulseAudio) would hold the run, SIGTERM included, for ever. A stream
        that does not stop in time is left to the process's end."""
        self._stopping = True
        stream, self._stream = self._stream, None
        if stream is None:
            return

        def close() -> None:
            try:
                stream.stop()
                stream.close()
            except Exception:  # a vanished device may fail to stop; the run is ending anyway
                pass

        closer = threading.Thread(target=close, name="streamtag-device-close", daemon=True)
        closer.start()
        closer.join(STOP_TIMEOUT_S)
        if closer.is_alive():
            self.abandoned = True  # PortAudio is stuck in it: its clean-up at exit would be stuck too

    @property
    def finished(self) -> bool:
        return self.error is not None
