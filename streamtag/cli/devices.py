"""``streamtag devices``: list input devices."""

from __future__ import annotations

import sys

from ..sources.device import import_sounddevice, list_input_devices


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "devices",
        help="list sound input devices",
        description="List sound input devices "
        "(index, name, channels, default rate); pass the index or a name to 'live --device'.",
    )
    p.set_defaults(handler=run)


def run(args) -> int:
    sd = import_sounddevice()
    rows = list_input_devices()
    if not rows:
        print(
            "streamtag devices: no input devices found: plug in a microphone, or check that this user may use "
            "audio (the audio group) and that PortAudio sees the sound server (PulseAudio, PipeWire, ALSA)",
            file=sys.stderr,
        )
        return 1
    try:
        default_in = sd.default.device[0]
    except Exception:
        default_in = -1
    for index, name, channels, rate in rows:
        mark = "*" if index == default_in else " "
        print(f"{mark} [{index}] {name} ({channels} ch, {rate:g} Hz)")
    return 0
