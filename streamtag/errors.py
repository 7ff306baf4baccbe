"""Exceptions a user can meet. Each message names the problem and the fix.

The CLI turns any :class:`StreamtagError` into one line on stderr and a non-zero
exit; anything else is a bug and keeps its traceback. Beside them, the few helpers their checks and
messages share.
"""

import numbers


class StreamtagError(Exception):
    """Base class: a user-facing problem with a one-line explanation."""

    exit_code = 2


class ConfigError(StreamtagError, ValueError):
    """An option or a config value is out of range or inconsistent."""


class AudioFileError(StreamtagError):
    """An audio file is missing, unreadable, empty or not audio."""


class DeviceError(StreamtagError):
    """No sound device is available, it cannot be opened, or it went away mid-stream (exit 1)."""

    exit_code = 1


class UnknownDeviceError(DeviceError):
    """``--device`` names no input device (or several): a usage error, exit 2 like any other."""

    exit_code = 2


class ModelFileError(StreamtagError):
    """A model folder is missing, incomplete, unsafe, or its config and weights disagree."""


class BackendUnavailable(StreamtagError, ImportError):
    """A runtime (torch, onnxruntime, PortAudio) is not installed; the message names the package."""


class DatasetError(StreamtagError):
    """A training or evaluation dataset is missing, empty or malformed."""


class InputError(StreamtagError, ValueError):
    """Samples handed to an engine are not what it takes (not mono, not audio, wrong type)."""


class Terminated(KeyboardInterrupt):
    """SIGTERM, as a command that stops cleanly sees it: a stop like Ctrl-C's, asked for by a service manager,
    so the command exits 0 once it has stopped cleanly (Ctrl-C: 130)."""


STOP_SIGNALS_SEEN: list[int] = []  # the signals cli.interrupt_on_signals' handler took, in order, this command


def stop_exit_code(stop: KeyboardInterrupt) -> int:
    """The exit status of a command stopped cleanly by ``stop``: 0 for SIGTERM, 130 for Ctrl-C. A SIGTERM that a
    library turned into a plain KeyboardInterrupt on its way up (Ray's calls do) is known by the signal seen."""
    import signal

    first = STOP_SIGNALS_SEEN[0] if STOP_SIGNALS_SEEN else None
    return 0 if isinstance(stop, Terminated) or first == signal.SIGTERM else 130


def is_real(value) -> bool:
    """A number, not a bool (True is 1 to Python, and no one means 1 by it): the type check of numeric settings."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def is_whole(value) -> bool:
    """A whole number, not a bool (a count: capacity, block size, hops)."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def some(names, most: int) -> str:
    """The first ``most`` of ``names`` in a message, and how many more: "a, b, c and 54 more" (a model's 57
    classes written out make a line hundreds of characters long)."""
    names = list(names)
    return ", ".join(names[:most]) + (f" and {len(names) - most} more" if len(names) > most else "")


def count(n: int, one: str, many: str | None = None) -> str:
    """``n`` things in a message: "1 file", "2 files" (``many`` for a plural that is not ``one`` + s)."""
    return f"{n} {one if n == 1 else many or one + 's'}"


def raise_if_interrupted(exc: BaseException) -> None:
    """A Ctrl-C that lands while a compiled extension initialises comes back as pybind11's
    ``ImportError("initialization failed")`` caused by the KeyboardInterrupt: raise that as the user's stop
    it is, before a caller reports the import as a broken install."""
    seen, passed = exc, set()
    while seen is not None and id(seen) not in passed:  # causes only: an interrupt being handled is a __context__
        if isinstance(seen, KeyboardInterrupt):
            raise (Terminated if isinstance(seen, Terminated) else KeyboardInterrupt)() from None  # exit 0 or 130
        passed.add(id(seen))
        seen = seen.__cause__
