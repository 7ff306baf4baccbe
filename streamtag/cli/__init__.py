"""``streamtag`` command line: wires sources, backends, events and outputs together; no logic of its own.

Each subcommand module has ``add_parser(subparsers)`` and ``run(args) -> int``.
A :class:`~streamtag.errors.StreamtagError` becomes one line on stderr and a non-zero exit; a usage
error (a value out of range, a missing argument) is one line too, exit 2.
"""

from __future__ import annotations

import argparse
import errno
import importlib
import os
import sys
import warnings
from pathlib import Path
from typing import NoReturn

from ..errors import STOP_SIGNALS_SEEN, StreamtagError, Terminated, stop_exit_code

DISK_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EROFS)  # writing outputs cannot go on: one line, not a traceback
SUBCOMMANDS = ["run", "tag", "serve", "devices", "train", "evaluate", "export", "bench"]
# optional modules -> the extra that installs them (pip install '.[EXTRA]' in streamtag's folder)
EXTRAS = {
    "torch": "train",
    "torchaudio": "train",
    "onnx": "train",
    "safetensors": "train",
    "matplotlib": "plot",
    "aiohttp": "serve",
    "paho": "serve",
    "prometheus_client": "serve",
    "pyarrow": "archive",
    "ray": "ray",
}


def interrupt_on_signals() -> None:
    """Ctrl-C and SIGTERM raise KeyboardInterrupt, for a command that stops cleanly on it (train, tag, eval),
    also when started in the background from a script (where the shell sets SIGINT to be ignored, so Python
    never turns it into KeyboardInterrupt) and when stopped by a service manager (SIGTERM: :class:`Terminated`,
    exit 0 as for live, replay and serve)."""
    import signal

    def stop(signum, frame):
        STOP_SIGNALS_SEEN.append(signum)
        raise Terminated if signum == signal.SIGTERM else KeyboardInterrupt

    STOP_SIGNALS_SEEN.clear()  # a new command (main() runs more than one in a test's process)
    stop.raises_keyboard_interrupt = True  # main() lets go of it once the command has ended
    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)


class Parser(argparse.ArgumentParser):
    """Usage errors are one line too, exit 2: ``streamtag replay: error: argument --rate: ... (nan given)``."""

    given: tuple[str, ...] = ()  # the command line, set by main(): for the hint below

    def error(self, message: str) -> NoReturn:
        dashed = next((a for a in self.given if a.startswith("-") and a != "-" and os.path.exists(a)), None)
        taken = "arguments are required" in message or "unrecognized arguments" in message
        if dashed is not None and taken:  # argparse took a file named -x.wav for an option
            message += f"; a file whose name starts with - is given as ./{dashed}"
        self.exit(2, f"{self.prog}: error: {message}; see '{self.prog} --help'\n")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="streamtag",
        description="Real-time streaming audio tagger: a causal model scores every 10 ms hop, live or on replay.",
    )
    from .. import __version__

    parser.add_argument("--version", action="version", version=f"streamtag {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    subparsers.required = True
    for name in SUBCOMMANDS:
        importlib.import_module(f"{__name__}.{name}").add_parser(subparsers)
    parser.commands = subparsers.choices  # each command's own parser: an unknown option is said by it
    return parser


def _unknown_options(parser, command: str, extra: list[str]) -> NoReturn:
    """An option the command does not take, said by the command (``see 'streamtag replay --help'``, not the top
    level's), with the option it likely meant, or the commands that take it."""
    import difflib

    message = f"unrecognized arguments: {' '.join(extra)}"
    sub = parser.commands[command]
    wrong = next((a.split("=")[0] for a in extra if a.startswith("--")), None)
    if wrong is not None:
        options = {o[2:]: o for action in sub._actions for o in action.option_strings if o.startswith("--")}
        close = [options[o] for o in difflib.get_close_matches(wrong[2:], sorted(options), n=1, cutoff=0.7)]
        others = sorted(
            name
            for name, other in parser.commands.items()
            if name != command and any(wrong in action.option_strings for action in other._actions)
        )
        if others:  # exactly another command's option: more likely than a typo of one of this command's
            message += f" ({wrong} is an option of {', '.join(others)}, not of {command})"
        elif close:
            message += f" (did you mean {close[0]}?)"
    sub.error(message)


def _one_line_warnings(command: str) -> None:
    """streamtag's own warnings (a model without a chunk graph, ...) as one line a user reads, not Python's
    file:line and source line."""
    plain = warnings.formatwarning

    def formatted(message, category, filename, lineno, line=None):
        if Path(filename).resolve().is_relative_to(PACKAGE):
            return f"streamtag {command}: warning: {message}\n"
        return plain(message, category, filename, lineno, line)

    warnings.formatwarning = formatted


PACKAGE = Path(__file__).resolve().parents[1]


# options whose value is a list that may start with a minus ('--levels -10,-20'): argparse reads only a
# plain negative number as a value and anything else starting with '-' as an option
NEGATIVE_LIST_OPTIONS = ("--levels",)


def _glue_negative_values(argv: list[str]) -> list[str]:
    """``--levels -10,-20`` as ``--levels=-10,-20``: the one spelling argparse takes without being told."""
    out: list[str] = []
    for i, arg in enumerate(argv):
        if arg == "--":  # what follows is positional
            return out + argv[i:]
        if out and out[-1] in NEGATIVE_LIST_OPTIONS and arg[:1] == "-" and (arg[1:2].isdigit() or arg[1:2] == "."):
            out[-1] = f"{out[-1]}={arg}"
        else:
            out.append(arg)
    return out


def _stdout_closed() -> bool:
    """Whether the reader of stdout has gone (a flush fails); stdout then points at /dev/null so that Python's own
    flush at exit does not print a second error."""
    try:
        sys.stdout.flush()
        return False
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return True
    except (OSError, ValueError):  # stdout closed or detached: nothing to tell apart
        return False


def main(argv: list[str] | None = None) -> int:
    # numpy's BLAS starts a thread per core when imported (about 40 ms of CPU a process, paid again by every
    # `tag --jobs` worker), and no command does BLAS work in numpy: models run in onnxruntime or torch, with
    # thread pools of their own. One thread, unless the environment already says otherwise.
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    interrupt_on_signals()  # from the start: a SIGTERM before a command sets its own stop is a stop too, exit 0
    try:
        parser = build_parser()  # imports every subcommand's module: a Ctrl-C in the first moments lands here
    except KeyboardInterrupt as stop:
        print("streamtag: interrupted", file=sys.stderr)
        return stop_exit_code(stop)
    given = _glue_negative_values(sys.argv[1:] if argv is None else list(argv))
    Parser.given = tuple(given)
    args, extra = parser.parse_known_args(given)
    if extra:
        _unknown_options(parser, args.command, extra)
    _one_line_warnings(args.command)
    STOP_SIGNALS_SEEN.clear()
    try:
        return args.handler(args)
    except StreamtagError as exc:
        print(f"streamtag {args.command}: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except ModuleNotFoundError as exc:
        extra = EXTRAS.get((exc.name or "").split(".")[0])
        if extra is None:
            raise
        print(
            f"streamtag {args.command}: error: this needs {exc.name}, which is not installed; "
            f"install it with: pip install '.[{extra}]' (streamtag's folder)",
            file=sys.stderr,
        )
        return 2
    except KeyboardInterrupt as stop:  # a command that stops cleanly says what it kept itself; the rest say this much
        print(f"streamtag {args.command}: interrupted", file=sys.stderr)
        return stop_exit_code(stop)
    except BrokenPipeError as exc:
        if _stdout_closed():  # piped into head, which has seen enough: not an error
            return 0
        print(f"streamtag {args.command}: error: a pipe closed under it ({exc.strerror or exc})", file=sys.stderr)
        return 1
    except OSError as exc:
        if exc.errno not in DISK_FULL:
            raise
        where = f"{exc.filename}: " if exc.filename else ""
        print(
            f"streamtag {args.command}: error: {where}{exc.strerror} (writing outputs); make room there, or write "
            "them elsewhere, and run it again",
            file=sys.stderr,
        )
        return 1
    finally:
        while True:
            try:
                _done_with_signals()
                break
            except KeyboardInterrupt:  # it came as the command ended: that has been said already
                continue


def _done_with_signals() -> None:
    """The command has ended and said how: a Ctrl-C or SIGTERM from here on (as the process exits, while
    multiprocessing's clean-up runs) would only turn that into a traceback or a death by signal."""
    import signal

    for sig in (signal.SIGINT, signal.SIGTERM):
        if getattr(signal.getsignal(sig), "raises_keyboard_interrupt", False):
            signal.signal(sig, signal.SIG_IGN)
