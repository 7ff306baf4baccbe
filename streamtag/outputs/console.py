"""Terminal outputs: a live top-k view that updates in place, or plain lines when piped."""

from __future__ import annotations

import collections
import sys
from collections.abc import Callable
from typing import TextIO

from ..events import Event
from ..steps import Step
from .files import STDOUT, named_error
from .selection import ClassSelection

BAR_WIDTH = 30
LABEL_WIDTH = 18  # the longest bundled label is 16 characters
RECENT_EVENTS = 5


def format_event(event: Event, now: float) -> str:
    """One line stamped ``now`` (the stream time it is printed at, so lines never go back in time); the
    onset it is backdated to is in the text."""
    if event.kind == "open":
        return f"{now:8.2f}s  open   {event.label}  (from {event.onset:.2f} s)"
    reason = f"  ({event.reason})" if event.reason not in (None, "ended") else ""
    return (
        f"{now:8.2f}s  close  {event.label}  {event.onset:.2f}-{event.offset:.2f} s  max {event.score_max:.2f}{reason}"
    )


def _meter(dbfs: float, width: int = 10) -> str:
    """A bar for -60..0 dBFS, so a too-quiet input shows at a glance."""
    filled = 0 if dbfs != dbfs else int(round(max(0.0, min(1.0, (dbfs + 60.0) / 60.0)) * width))
    return "#" * filled + "." * (width - filled)


class PlainLines:
    """One line per update (``t  label p  label p ...``) and one per event; for pipes and logs."""

    def __init__(
        self, selection: ClassSelection, every_frames: int, stream: TextIO | None = None, show_events: bool = True
    ) -> None:
        self.selection, self.every, self.show_events = selection, every_frames, show_events
        self.stream = stream or sys.stdout

    def write(self, step: Step) -> None:
        try:
            if self.show_events:
                for event in step.events:
                    print(format_event(event, step.t), file=self.stream)
            if step.has_scores and (step.frame_index + 1) % self.every == 0:
                picks = "  ".join(f"{label} {p:.2f}" for label, p in self.selection.pick(step.probs))
                print(f"{step.t:8.2f}s  {picks or '-'}", file=self.stream, flush=True)  # -: none above the threshold
        except BrokenPipeError as exc:
            raise self._named(exc) from None

    def close(self) -> None:
        try:  # event lines wait in the buffer: a reader gone after the last score line is found here
            self.stream.flush()
        except BrokenPipeError as exc:
            raise self._named(exc) from None

    def _named(self, exc: BrokenPipeError) -> OSError:
        """Named as stdout's, as a file output at - is: its reader has left (| head); another stream's is its own."""
        return named_error(exc, STDOUT) if self.stream is sys.stdout else exc


class LiveView:
    """A rich panel redrawn in place: top-k bars, open and recent events, and a status line.

    ``status`` returns ``(dropped_samples, p99_ms, budget_ms, level_dbfs)`` for the status line.
    """

    def __init__(
        self,
        selection: ClassSelection,
        every_frames: int,
        status: Callable[[], tuple[int, float, float, float]],
        title: str = "streamtag",
        console=None,
    ) -> None:
        from rich.console import Console
        from rich.live import Live

        self.selection, self.every, self.status, self.title = selection, every_frames, status, title
        self.recent: collections.deque[Event] = collections.deque(maxlen=RECENT_EVENTS)
        self.open: dict[str, Event] = {}
        self.console = console or Console(stderr=False)
        self._live = Live(console=self.console, auto_refresh=False, transient=False)
        self._live.start()

    def write(self, step: Step) -> None:
        for event in step.events:
            if event.kind == "open":
                self.open[event.label] = event
            else:
                self.open.pop(event.label, None)
                self.recent.append(event)
        if step.has_scores and (step.frame_index + 1) % self.every == 0:
            self._live.update(self._render(step), refresh=True)

    def _render(self, step: Step):
        from rich.console import Group
        from rich.panel import Panel
        from rich.table import Table
        from rich.text import Text

        # the bars give way first, so labels stay whole down to a 40-column terminal
        width = self.console.width
        bar_width = max(4, min(BAR_WIDTH, width - 4 - LABEL_WIDTH - 5 - 2))
        table = Table.grid(padding=(0, 1))
        table.add_column(justify="right", no_wrap=True, min_width=LABEL_WIDTH)
        table.add_column(no_wrap=True, overflow="ellipsis")
        table.add_column(no_wrap=True)
        for label, p in self.selection.pick(step.probs):
            filled = round(p * bar_width)
            table.add_row(label, "[green]" + "█" * filled + "[/]" + "·" * (bar_width - filled), f"{p:5.2f}")
        lines = []  # events below the bars, wrapped rather than cut on a narrow terminal
        if self.open:
            lines.append(Text.from_markup("[bold]now:[/] " + ", ".join(sorted(self.open)), overflow="fold"))
        for event in list(self.recent)[::-1]:
            lines.append(Text(f"{event.label} {event.onset:.2f}-{event.offset:.2f} s", style="dim", overflow="fold"))
        dropped, p99, budget, level = self.status()
        status = (
            f"t {step.t:7.2f} s | level {level:5.1f} dBFS {_meter(level)} | dropped {dropped} | "
            f"p99 {p99:.3f} ms of {budget:.0f} ms | Ctrl-C stops"
        )
        if len(status) > width - 4:  # an 80-column terminal: the same, shorter
            meter = f"{level:.0f} dBFS {_meter(level)}"
            status = f"{step.t:.1f} s | {meter} | drop {dropped} | p99 {p99:.2f}/{budget:.0f} ms"
        if len(status) > width - 4:  # a narrow one: the essentials
            status = f"{step.t:.1f} s | {level:.0f} dBFS | drop {dropped}"
        return Panel(Group(table, *lines), title=self.title, subtitle=status)

    def close(self) -> None:
        self._live.stop()
