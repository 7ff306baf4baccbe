"""The WebSocket protocol of ``serve``, ``ws://HOST:PORT/v1/streams/<name>``: the first message's format and the
close codes a client is told why with.

An optional first text message ``{"sample_rate": 16000, "format": "s16le" | "s32le" | "f32le", "channels": 1}``
(the defaults), then binary PCM of any size; ``{"type": "eof"}`` ends the stream. The server sends ``{"type":
"scores", "t", "top": [[label, p], ...]}`` ``rate`` times a second, ``{"type": "open" | "close", "label", "onset",
"offset", ...}`` for events, and a last ``{"type": "summary", ...}`` before it closes.
"""

from __future__ import annotations

import json

from ..errors import ConfigError
from ..sources.pipe import RAW_FORMATS, PcmFormat

# close codes (4000-4999 are the application's)
CLOSE_BAD_REQUEST, CLOSE_NAME_TAKEN, CLOSE_FULL, CLOSE_IDLE, CLOSE_UNAUTHORISED = 4400, 4409, 4429, 4408, 4401
CLOSE_TOO_MANY_MESSAGES = 4420
CLOSE_STALLED = 4410  # the client does not read what the server sends: its messages would pile up without end


def _whole(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)  # JSON true is no channel count


def parse_hello(text: str) -> PcmFormat:
    """The optional first text message -> the stream's PCM format; ConfigError says what is wrong."""
    try:
        hello = json.loads(text)
    except ValueError:
        raise ConfigError(
            'the first text message must be JSON, e.g. {"sample_rate": 16000, "format": "s16le"}'
        ) from None
    if not isinstance(hello, dict):
        raise ConfigError("the first text message must be a JSON object")
    if "type" in hello and not set(hello) & {"sample_rate", "format", "channels"}:  # a format message may be typed
        raise ConfigError(
            f"no message has type {hello['type']!r}: the first message gives the format without a type, e.g. "
            '{"sample_rate": 16000, "format": "s16le"}, and {"type": "eof"} ends the stream'
        )
    unknown = set(hello) - {"sample_rate", "format", "channels", "type"}
    if unknown:
        raise ConfigError(f"unknown keys {sorted(unknown)} (sample_rate, format, channels)")
    rate, fmt, channels = hello.get("sample_rate", 16000), hello.get("format", "s16le"), hello.get("channels", 1)
    if not _whole(rate) or not 8000 <= rate <= 192000:
        raise ConfigError(f"sample_rate must be a whole number in 8000..192000 ({rate!r} given)")
    if fmt not in RAW_FORMATS:
        raise ConfigError(f"format must be one of {', '.join(RAW_FORMATS)} ({fmt!r} given)")
    if not _whole(channels) or not 1 <= channels <= 8:
        raise ConfigError(f"channels must be 1..8 ({channels!r} given)")
    return PcmFormat.raw(rate, fmt, channels)
