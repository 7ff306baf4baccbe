"""Per-stream settings for ``serve``: which labels a stream reports and at what event thresholds, from
``serve --config`` and changed while the server runs (HTTP ``PUT /v1/streams/<name>/settings`` or MQTT
``<prefix>/<name>/set``).

A stream's settings are layered: the model's ``events.toml``, then ``--event-config`` and the flags, then
the config file's ``[defaults]``, then its ``[streams.<name>]``, then run-time changes, each overriding
the one before key by key (a layer's ``events.default`` overrides the class entries below it too). A
label left out by ``allow`` or ``deny`` opens no events, gets no Home Assistant sensor and is left out of
the scores a client sees; the model still runs on every class, so turning a label back on needs no
restart and loses no state.

    [defaults]                      # every stream
    deny = ["breathing"]
    [defaults.events.default]       # event settings, as in --event-config
    on_threshold = 0.5

    [streams.porch]                 # one stream by name
    url = "rtsp://camera.local/stream"   # pulled through ffmpeg (or device = "USB": a sound card by name)
    allow = ["dog", "glass_breaking", "speech"]
    [streams.porch.events.dog]
    on_threshold = 0.6
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from ..events import EventDetector, EventParams, build_event_settings, merge_event_tables
from ..outputs.selection import check_class_names, split_class_names

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")  # a stream's name: in MQTT topics, Home Assistant ids and URLs


def valid_name(name: str) -> bool:
    """Whether ``name`` is a stream name (fullmatch: ``$`` would let a trailing newline through, and a newline
    in a topic gets the server thrown off the broker)."""
    return NAME.fullmatch(name) is not None


SETTING_KEYS = ("allow", "deny", "events")
SOURCE_KEYS = ("url", "device")  # a [streams.NAME] table's too: what the server pulls
EVENT_KEYS = {f.name for f in dataclasses.fields(EventParams)}


@dataclasses.dataclass(frozen=True)
class StreamSettings:
    """One layer of settings: ``allow``/``deny`` (label lists, at most one of them; ``None`` leaves the layer
    below in force, ``[]`` clears it) and ``events`` (``{"default" | label: {key: value}}``)."""

    allow: tuple[str, ...] | None = None
    deny: tuple[str, ...] | None = None
    events: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)

    @classmethod
    def parse(cls, data: Any, labels: Sequence[str], where: str, also_known: Sequence[str] = ()) -> StreamSettings:
        """Checked settings from a TOML table or a JSON body; one line naming ``where`` and the fix if wrong.
        ``also_known``: keys the caller took out before (a stream's url), named when a key is unknown."""
        if not isinstance(data, dict):
            raise ConfigError(f"{where}: settings must be a table/object with keys among {list(SETTING_KEYS)}")
        unknown = sorted(set(data) - set(SETTING_KEYS))
        if unknown:
            known = ", ".join((*SETTING_KEYS, *also_known))
            raise ConfigError(f"{where}: unknown setting {unknown[0]!r} (known: {known})")
        lists = {}
        for key in ("allow", "deny"):
            value = data.get(key)
            if value is None:
                continue
            if isinstance(value, str):
                value = split_class_names([value], labels, f"{where}: {key}") if value.strip() else []
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                raise ConfigError(f"{where}: {key} must be a list of class names")
            check_class_names(value, labels, f"{where}: {key}")
            lists[key] = tuple(value)
        if lists.get("allow") and lists.get("deny"):
            raise ConfigError(f"{where}: give allow or deny, not both")
        events = data.get("events", {})
        if not isinstance(events, dict):
            raise ConfigError(f"{where}: events must map 'default' or a class name to event settings")
        check_class_names([k for k in events if k != "default"], labels, f"{where}: events")
        for key, value in events.items():
            if not isinstance(value, dict):
                raise ConfigError(f"{where}: events.{key} must be a table with keys among {sorted(EVENT_KEYS)}")
            wrong = sorted(set(value) - EVENT_KEYS)
            if wrong:
                known = ", ".join(sorted(EVENT_KEYS))
                raise ConfigError(f"{where}: events.{key}: unknown key {wrong[0]!r} (known: {known})")
        return cls(lists.get("allow"), lists.get("deny"), {k: dict(v) for k, v in events.items()})

    def over(self, below: StreamSettings) -> StreamSettings:
        """This layer on top of ``below``: lists replace (either one given replaces both; an empty one stays,
        so it clears what is below), events merge by key, and this layer's ``default`` keys clear the same keys
        from the class entries below (as :func:`~streamtag.events.build_event_settings` does between tables)."""
        if self.allow is not None or self.deny is not None:
            allow, deny = self.allow, self.deny
        else:
            allow, deny = below.allow, below.deny
        return StreamSettings(allow, deny, merge_event_tables(below.events, self.events))

    def enabled(self, labels: Sequence[str]) -> list[bool]:
        if self.allow:
            return [label in self.allow for label in labels]
        deny = set(self.deny or ())
        return [label not in deny for label in labels]

    def as_dict(self) -> dict[str, Any]:
        return {"allow": list(self.allow or []), "deny": list(self.deny or []), "events": self.events}


@dataclasses.dataclass(frozen=True)
class PulledSource:
    """A stream the server opens itself: ``url`` through ffmpeg, or a sound card ``device`` (by name)."""

    name: str
    url: str | None = None
    device: str | None = None


@dataclasses.dataclass
class ServeConfig:
    """``serve --config``: layers of settings and the sources to pull."""

    defaults: StreamSettings = dataclasses.field(default_factory=StreamSettings)
    streams: dict[str, StreamSettings] = dataclasses.field(default_factory=dict)
    sources: list[PulledSource] = dataclasses.field(default_factory=list)
    path: str | None = None  # the file, named in the errors found later (a bad combination of layers)


def read_serve_config(path: str | os.PathLike, labels: Sequence[str]) -> ServeConfig:
    """Parse and check a config file (TOML, or JSON of the same shape)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8-sig")
        data = json.loads(text, object_pairs_hook=_no_twice) if path.suffix.lower() == ".json" else tomllib.loads(text)
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise ConfigError(f"--config {path}: cannot read it ({str(exc).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise ConfigError(f'--config {path}: give an object of tables, {{"defaults": {{...}}, "streams": {{...}}}}')
    unknown = sorted(set(data) - {"defaults", "streams"})
    if unknown:
        raise ConfigError(f"--config {path}: unknown table [{unknown[0]}] (known: [defaults], [streams.NAME])")
    config = ServeConfig(
        StreamSettings.parse(data.get("defaults", {}), labels, f"--config {path}: [defaults]"), path=str(path)
    )
    streams = data.get("streams", {})
    if not isinstance(streams, dict):
        raise ConfigError(f"--config {path}: streams must be tables, [streams.NAME]")
    for name, table in streams.items():
        where = f"--config {path}: [streams.{name}]"
        if not valid_name(name):
            raise ConfigError(f"{where}: stream names are 1-64 of A-Z a-z 0-9 _ -")
        if not isinstance(table, dict):
            raise ConfigError(f"{where}: must be a table")
        table = dict(table)
        url, device = table.pop("url", None), table.pop("device", None)
        if url is not None and device is not None:
            raise ConfigError(f"{where}: give url or device, not both")
        for key, value in (("url", url), ("device", device)):
            if value is not None and (not isinstance(value, str) or not value):
                raise ConfigError(f"{where}: {key} must be a non-empty string")
        config.streams[name] = StreamSettings.parse(table, labels, where, also_known=SOURCE_KEYS)
        if url or device:
            config.sources.append(PulledSource(name, url, device))
    return config


class SettingsBook:
    """Every stream's settings while the server runs: the base event tables, the config file's layers and
    run-time changes, kept by name (a stream that reconnects keeps what was set for it)."""

    def __init__(
        self, labels: Sequence[str], frame_seconds: float, base_tables: Sequence[dict], config: ServeConfig
    ) -> None:
        self.labels, self.frame_seconds = list(labels), frame_seconds
        self.base_tables = list(base_tables)
        self.config = config
        self.changes: dict[str, StreamSettings] = {}
        # the event detector of a stream with no settings of its own (most), made once: building one was most of a
        # join's cost, and hundreds of clients joining at once held up every stream for a quarter of a second
        self._shared: EventDetector | None = None
        for name in config.streams:  # a bad combination in the file fails at start, not at the stream's join
            self.detector(name)
        self.detector("")  # the defaults' (no stream has an empty name)

    def settings(self, name: str) -> StreamSettings:
        merged = self.config.defaults
        for layer in (self.config.streams.get(name), self.changes.get(name)):
            if layer is not None:
                merged = layer.over(merged)
        return merged

    def change(self, name: str, data: Any) -> StreamSettings:
        """Apply a run-time change (a JSON object) to ``name``; checked in full before anything changes.
        ``{"reset": true}`` drops the run-time changes made so far: the config file's settings again."""
        if isinstance(data, dict) and "reset" in data:
            if data.get("reset") is not True:  # {"reset": false} would read as "change nothing": a mistake
                raise ConfigError(
                    f"settings for '{name}': reset takes true, as {{\"reset\": true}} (back to the config file's "
                    f"settings); to change settings, send them without it ({data['reset']!r} given)"
                )
            if data != {"reset": True}:
                raise ConfigError(f"settings for '{name}': reset comes alone, as {{\"reset\": true}}")
            self.changes.pop(name, None)
            return self.settings(name)
        layer = StreamSettings.parse(data, self.labels, f"settings for '{name}'")
        previous = self.changes.get(name)
        self.changes[name] = layer if previous is None else layer.over(previous)
        try:
            self.detector(name)
        except ConfigError:
            if previous is None:
                del self.changes[name]
            else:
                self.changes[name] = previous
            raise
        return self.settings(name)

    def detector(self, name: str) -> EventDetector:
        own = name in self.config.streams or name in self.changes
        if not own and self._shared is not None:  # the defaults' detector, made once, not at every join
            return self._shared.fresh()
        settings = self.settings(name)
        try:
            default, per_class = build_event_settings(*self.base_tables, settings.events)
            enabled = settings.enabled(self.labels)
        except ConfigError as exc:  # name where the bad value is: a change, a stream's table, or the defaults
            where = f"--config {self.config.path}: [defaults]"
            if name in self.changes:
                where = f"settings for '{name}'"
            elif name in self.config.streams:
                where = f"--config {self.config.path}: [streams.{name}]"
            raise ConfigError(f"{where}: {exc}") from None
        detector = EventDetector(self.labels, self.frame_seconds, default, per_class, enabled=enabled)
        if not own:
            self._shared = detector
        return detector.fresh()


class _KeyTwice(ValueError):
    """A JSON object naming a key twice (its own message: the generic hint would hide it)."""


def parse_change(body: str | bytes, what: str = "the body") -> dict:
    """A settings change sent over HTTP or MQTT (``what``: the body, the payload) -> its JSON object; ConfigError
    says what is wrong with it."""
    hint = f'{what} must be a JSON object, e.g. {{"allow": ["dog"]}}'
    try:
        change = json.loads(body, object_pairs_hook=_no_twice)
    except _KeyTwice as exc:
        raise ConfigError(str(exc)) from None
    except ValueError:
        raise ConfigError(hint) from None
    if not isinstance(change, dict):
        raise ConfigError(hint)
    return change


def _no_twice(pairs: list) -> dict:
    """A JSON object, refusing a key given twice (json keeps the last one without a word)."""
    keys = [key for key, _ in pairs]
    twice = sorted({key for key in keys if keys.count(key) > 1})
    if twice:
        raise _KeyTwice(f"{twice[0]!r} is given twice in one object")
    return dict(pairs)
