"""Outputs: each is one class with ``write(step)`` and ``close()`` (see :class:`streamtag.steps.Output`)."""

from .console import LiveView, PlainLines
from .files import EventsJsonl, ScoresTsv, UpdatesJsonl
from .selection import ClassSelection

__all__ = ["ClassSelection", "EventsJsonl", "LiveView", "PlainLines", "ScoresTsv", "UpdatesJsonl"]
