"""MQTT for ``serve``: event messages, per-label ON/OFF states, levels, and Home Assistant discovery.

Topics (``prefix`` defaults to ``streamtag``), the layout Frigate's audio users already automate on:

- ``<prefix>/availability``: ``online`` / ``offline`` (retained; the broker sends ``offline`` as our last
  will when the server dies); ``<prefix>/<stream>/availability``: ``online`` while the stream is
  connected and, for a pulled source or sound card, giving audio; ``offline`` once it has left or while its
  source gives none (retained), so a camera that drops shows as unavailable;
- ``<prefix>/<stream>/audio/<label>``: ``ON`` while an event of that label is open, ``OFF`` after (retained);
- ``<prefix>/<stream>/audio/level``: the stream's level in dBFS, a few times a second;
- ``<prefix>/events``: one JSON object per event open and close (type, stream, label, onset, offset,
  score, wall-clock time in ISO 8601);
- ``homeassistant/binary_sensor/<prefix>_<stream>_<label>/config``: discovery (retained), one device per
  stream, one ``binary_sensor`` with ``device_class: sound`` per enabled label, available while both the
  server and the stream are (a label turned off gets an empty config, which removes its sensor; in the
  topic, characters Home Assistant does not take in an id, such as the ``/`` of ``home/audio``, are ``_``),
  and its level as a ``sensor`` (disabled until enabled in Home Assistant); published again when Home
  Assistant's birth message (``homeassistant/status`` ``online``) comes;
- ``<prefix>/<stream>/set`` (subscribed): a JSON settings change (``allow``, ``deny``, ``events``), as
  ``PUT /v1/streams/<stream>/settings`` takes it; the settings in force are retained on
  ``<prefix>/<stream>/settings`` (sent when the stream joins and after every change, over MQTT or HTTP),
  a refused change comes on ``<prefix>/<stream>/settings/error``.

paho-mqtt runs its own network thread, reconnects with backoff when the broker goes away and queues
up to ``queue_limit`` event messages (QoS 1) meanwhile; states and levels (QoS 0) sent while it is away
are counted in ``dropped``, and every state is published again on reconnect, so Home Assistant never
keeps an ``ON`` the broker missed the end of. Losing and regaining the broker is said on stderr, once
each way. ``serve`` runs this publisher in a process of its own (:mod:`streamtag.outputs.mqtt_process`), so
its Python (a join is 117 messages) never runs in the tagging worker's process.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import re
import socket
import sys
import threading
from collections.abc import Callable, Sequence
from typing import Any
from urllib.parse import unquote, urlparse

from .. import __version__
from ..errors import BackendUnavailable, ConfigError
from ..events import Event
from ..serve.config import parse_change

UNSPECIFIED = 128  # paho's reason code "Unspecified error": what it gives for a connection it lost
LOGIN_REFUSED = ("Bad user name or password", "Not authorized")  # paho's names of MQTT 3.1.1's and 5's codes
OBJECT_ID_UNSAFE = re.compile(r"[^A-Za-z0-9_-]")  # Home Assistant's discovery topics take ids of these only


def check_prefix(prefix: str, flag: str = "--mqtt-prefix") -> str:
    """A topic prefix we can publish under: no MQTT wildcards, no empty levels."""
    if not prefix or any(c in prefix for c in "+#\0") or "" in prefix.split("/"):
        example = "homeassistant" if flag == "--discovery-prefix" else "home/audio"
        raise ConfigError(f"{flag} {prefix!r}: give topic levels without + or # and none empty, e.g. {example}")
    return prefix


ONLINE_AFTER_STALE_S = 3.0  # a sweep says the server online this long after the last retained stream availability
LEVEL = "level"  # <prefix>/<stream>/audio/level: the stream's level, beside its labels' states


def topic_clash(labels: Sequence[str]) -> tuple[str, str | None] | None:
    """The first label that cannot have topics and a Home Assistant id of its own: ``(label, None)`` for one named
    ``level`` (the stream's level topic), ``(other, label)`` for two that give one id (``rain hail`` and
    ``rain_hail``); ``None`` when there is none. ``train`` and ``serve --mqtt`` each say it their own way."""
    ids: dict[str, str] = {}
    for label in labels:
        if label == LEVEL:
            return label, None
        other = ids.setdefault(OBJECT_ID_UNSAFE.sub("_", label), label)
        if other != label:
            return other, label
    return None


def check_labels(labels: Sequence[str], model: str = "the model") -> None:
    """Labels that can each be a topic level and a Home Assistant id of their own. A model trained before
    ``train`` refused such labels, or a hand-edited config.json, had MQTT die at its first join (a ``+`` is a
    wildcard), a label ``level`` get the level readings as its state, and two labels share one discovery topic."""
    for label in labels:
        bad = sorted({c for c in label if c in "+#/" or not c.isprintable()})
        if bad:
            raise ConfigError(
                f"--mqtt: {model}'s label {label!r} holds {' '.join(repr(c) for c in bad)}: a label is an MQTT "
                "topic level; rename it in the labels of the model's config.json (the names only: the model is "
                "unchanged)"
            )
    clash = topic_clash(labels)
    if clash is not None and clash[1] is None:
        raise ConfigError(
            f"--mqtt: {model}'s label {clash[0]!r} is the stream's level topic: a label is an MQTT topic level; "
            "rename it in the labels of the model's config.json (the names only: the model is unchanged)"
        )
    if clash is not None:
        raise ConfigError(
            f"--mqtt: {model}'s labels {clash[0]!r} and {clash[1]!r} give one Home Assistant id: rename one in the "
            "labels of the model's config.json"
        )


PASSWORD_VARIABLE = "STREAMTAG_MQTT_PASSWORD"  # a broker's password, kept out of the process list


@dataclasses.dataclass(frozen=True)
class Broker:
    """Where and how to connect: ``mqtt://[USER[:PASSWORD]@]HOST[:PORT]``, or ``mqtts://`` for TLS (8883 by
    default, the system's CA certificates); a password may come from ``$STREAMTAG_MQTT_PASSWORD`` instead."""

    host: str
    port: int
    username: str | None = None
    password: str | None = dataclasses.field(default=None, repr=False)
    tls: bool = False


def parse_broker(url: str) -> Broker:
    shown = USERINFO.sub(r"\1***@", url)  # an error line never shows the password
    parsed = urlparse(url if "://" in url else f"mqtt://{url}")
    if parsed.scheme not in ("mqtt", "mqtts") or not parsed.hostname:
        raise ConfigError(f"--mqtt {shown!r}: give mqtt://[USER[:PASSWORD]@]HOST[:PORT] (mqtts:// for TLS)")
    tls = parsed.scheme == "mqtts"
    try:
        port = parsed.port or (8883 if tls else 1883)
    except ValueError:
        raise ConfigError(f"--mqtt {shown!r}: the port is not a number in 1..65535") from None
    username = unquote(parsed.username) if parsed.username else None
    password = unquote(parsed.password) if parsed.password is not None else None
    if password is not None and username is None:
        raise ConfigError(f"--mqtt {shown!r}: a password needs a user name, as mqtt://USER:PASSWORD@HOST")
    if password is None and username is not None:  # the environment's, for a login named in the URL only
        password = os.environ.get(PASSWORD_VARIABLE) or None
    return Broker(parsed.hostname, port, username, password, tls)


USERINFO = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*://)[^/@\s]+@")  # scheme://user:password@


class MqttPublisher:
    """Publishes what the server's streams hear. Thread-safe calls: the worker thread makes them."""

    def __init__(
        self,
        url: str,
        labels: Sequence[str],
        prefix: str = "streamtag",
        discovery_prefix: str = "homeassistant",
        queue_limit: int = 10_000,
    ) -> None:
        try:
            import paho.mqtt.client as mqtt
        except ImportError:
            raise BackendUnavailable("--mqtt needs paho-mqtt: pip install '.[serve]' (streamtag's folder)") from None
        broker = parse_broker(url)
        check_labels(labels)
        self.host, self.port, self.tls = broker.host, broker.port, broker.tls
        self.labels, self.prefix, self.discovery_prefix = list(labels), prefix, discovery_prefix
        self.availability = f"{prefix}/availability"
        self.published = 0
        self.dropped = 0
        self._said_down = False  # a lost or unreachable broker is said once, until it is back
        self._connected_once = False
        # the server is said online only once the streams a crashed run left "online" are set offline (the sweep,
        # on connections until one finishes it): the retained server availability, subscribed to last, marks the
        # end of theirs. ``_online_lock`` orders saying online against close()'s offline
        self._swept = False
        self._sweep = 0  # which connection's sweep a timer or a retained message belongs to
        self._online_after_stale = False
        self._online_lock = threading.Lock()
        self._timer: threading.Timer | None = None
        # Home Assistant's birth message: on its own topic, homeassistant/status unless its settings changed it,
        # which some set beside their discovery prefix
        self.birth_topics = {"homeassistant/status", f"{discovery_prefix}/status"}
        self._mqtt = mqtt
        # a client id of its own: two servers on one broker with the same id would throw each other off
        client_id = f"streamtag-{socket.gethostname()}-{os.getpid()}"[:64]
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id)
        self.client.max_queued_messages_set(queue_limit)
        self.client.reconnect_delay_set(min_delay=1, max_delay=30)
        self.client.will_set(self.availability, "offline", qos=1, retain=True)
        if broker.username is not None:
            self.client.username_pw_set(broker.username, broker.password)
        if broker.tls:
            self.client.tls_set()  # the system's CA certificates
        self.client.on_connect = self._on_connect
        self.client.on_connect_fail = self._on_connect_fail
        self.client.on_disconnect = self._on_disconnect
        self.client.on_message = self._on_message
        # joined streams: which labels each reports, and those with an event open (state ON)
        self._streams: dict[str, tuple[list[bool], set[str]]] = {}
        self._unavailable: set[str] = set()  # joined streams whose source gives no audio now (a camera that dropped)
        self._settings: dict[str, str] = {}  # each stream's settings in force, as published (retained)
        # state topic -> the payload the broker missed (it was away) and must get: an ON, or an OFF of a topic the
        # broker holds ON. Every state of every stream that joined during an outage was kept (and sent on
        # reconnect, 60,000 messages in 5 s after 2,000 joins)
        self._unsent_states: dict[str, str] = {}
        self._broker_on: set[str] = set()  # state topics whose last state the broker got is ON
        self._queued = 0  # QoS 1 messages (events, availability, settings) waiting for a broker that is away
        self._lock = threading.Lock()  # _streams and the counters: the worker and paho's thread both use them
        self._closing = False
        # (stream, change, reply) -> applies a settings change; set by serve to hand it to its worker
        self.on_settings: Callable[[str, Any, Callable[[dict], None]], None] | None = None

    def start(self) -> None:
        self.client.connect_async(self.host, self.port, keepalive=30)
        self.client.loop_start()

    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:
        if reason_code.is_failure:
            if reason_code in LOGIN_REFUSED:  # a wrong login, or a broker not ready to check it yet: said once
                if not self._said_down:
                    self._said_down = True
                    print(
                        f"streamtag serve: the MQTT broker {self.host}:{self.port} refused the login "
                        f"({reason_code}): check the user in --mqtt and the password (in the URL or "
                        f"${PASSWORD_VARIABLE}); tagging goes on, the login is tried again every 30 s at most",
                        file=sys.stderr,
                        flush=True,
                    )
                return
            self._down(f"the MQTT broker {self.host}:{self.port} refused the connection ({reason_code})")
            return
        with self._lock:
            self._queued = 0  # sent now, on this connection
        if self._said_down:
            self._said_down = False
            again = " again" if self._connected_once else ""  # a broker down at the start was never connected
            print(f"streamtag serve: MQTT broker {self.host}:{self.port} connected{again}", file=sys.stderr, flush=True)
        self._connected_once = True
        client.subscribe(f"{self.prefix}/+/set", qos=1)
        client.subscribe([(topic, 1) for topic in sorted(self.birth_topics)])
        # Streams a crashed run left "online" with a state ON (its last will covers the server, not each stream)
        # are set OFF and offline. Until then the server stays offline, or Home Assistant would show that stale
        # ON as live for a moment (an automation on "to: on" fires). Published offline first, the server's
        # availability is sure to be retained; subscribed to after the streams', it comes after theirs (in
        # the order the filters are given, as mosquitto sends them) and says the server online.
        with self._online_lock:
            self._sweep += 1
            sweep, sweeping = self._sweep, not self._swept
            self._online_after_stale = sweeping
        if sweeping:
            self._send(self.availability, "offline", retain=True, qos=1)
            client.subscribe([(f"{self.prefix}/+/availability", 1), (self.availability, 1)])
        else:  # a broker back after the sweep: nothing stale to wait for
            client.subscribe(f"{self.prefix}/+/availability", qos=1)
        self._republish()
        if sweeping:  # after the republish, which may take seconds: the retained messages come once it is done
            self._arm_timer(sweep)
        else:
            self._say_online(sweep)

    def _arm_timer(self, sweep: int) -> None:
        """While connection ``sweep`` sweeps, say online ``ONLINE_AFTER_STALE_S`` after the last retained stream
        availability came (a broker that does not send the server's back, an ACL refusing the subscription, must
        not keep it offline; one still sending stale streams must not see it online before they are done)."""
        with self._online_lock:
            if sweep != self._sweep or self._closing or not self._online_after_stale:
                return
            if self._timer is not None:
                self._timer.cancel()
            self._timer = threading.Timer(ONLINE_AFTER_STALE_S, self._say_online, (sweep,))
            self._timer.daemon = True
            self._timer.start()

    def _say_online(self, sweep: int) -> None:
        """The server online on connection ``sweep``: once its stale streams are set offline (or at once, swept
        before), unless a later connection has come or gone, or the publisher is closing (whose offline must
        come last: a clean disconnect has no last will)."""
        with self._online_lock:
            if sweep != self._sweep or self._closing or not (self._online_after_stale or self._swept):
                return
            self._online_after_stale, self._swept = False, True
            if self._timer is not None:
                self._timer.cancel()
            self._send(self.availability, "online", retain=True, qos=1)

    def _republish(self) -> None:
        """Every joined stream's discovery, availability, settings and states again: after every (re)connect (the
        broker may have lost retained messages, and states changed meanwhile) and when Home Assistant starts."""
        down, settings, streams = self._published()
        for stream, (enabled, _) in streams.items():
            self._discovery(stream, enabled)
            self._send(self._stream_availability(stream), "offline" if stream in down else "online", retain=True, qos=1)
        for stream, payload in settings.items():  # a broker without persistence lost the retained settings too
            self._send(f"{self.prefix}/{stream}/settings", payload, retain=True, qos=1)
        self._resend_states()
        # published outside the lock: what the worker changed meanwhile may have been overtaken by the values sent
        # here, which the broker would then keep; sent once more as it stands now
        now_down, now_settings, now_streams = self._published()
        for stream in set(streams) | set(now_streams):
            if stream not in now_streams or (stream in down) != (stream in now_down):
                up = stream in now_streams and stream not in now_down
                self._send(self._stream_availability(stream), "online" if up else "offline", retain=True, qos=1)
        for stream, payload in now_settings.items():
            if settings.get(stream) != payload:
                self._send(f"{self.prefix}/{stream}/settings", payload, retain=True, qos=1)

    def _on_connect_fail(self, client, userdata) -> None:
        if not self._said_down:  # paho gives no cause: find it once (a typo in the name, a broker down, TLS)
            self._down(f"cannot reach the MQTT broker {self.host}:{self.port} ({self._why_unreachable()})")

    def _why_unreachable(self) -> str:
        try:
            socket.getaddrinfo(self.host, self.port, type=socket.SOCK_STREAM)
        except OSError:
            return f"no such host {self.host!r}: check the name in --mqtt"
        try:
            socket.create_connection((self.host, self.port), timeout=3).close()
        except ConnectionRefusedError:
            return "connection refused: is the broker running, and on this port?"
        except OSError as exc:
            return f"{exc.strerror or exc}: check the address and any firewall"
        if self.tls:
            return "the TLS handshake failed: is it an mqtts:// port, with a certificate this machine trusts?"
        return "the connection was closed at once: is it an MQTT port?"

    def _on_disconnect(self, client, userdata, flags, reason_code, properties) -> None:
        with self._online_lock:  # a sweep cut short is not done: its timer must not say online, nor mark it swept
            self._sweep += 1
            self._online_after_stale = False
            if self._timer is not None:
                self._timer.cancel()
        if not self._closing:  # paho says "Unspecified error" for a connection it lost (closed, reset, TLS)
            why = "the connection was lost" if getattr(reason_code, "value", None) == UNSPECIFIED else str(reason_code)
            self._down(f"lost the MQTT broker {self.host}:{self.port} ({why})")

    def _down(self, what: str) -> None:
        if not self._said_down:
            self._said_down = True
            print(
                f"streamtag serve: {what}; tagging goes on, retrying (events are queued, states sent again once back)",
                file=sys.stderr,
                flush=True,
            )

    def _on_message(self, client, userdata, message) -> None:
        if message.topic == self.availability:  # the end of the retained stream availabilities (_on_connect)
            if message.retain:
                self._say_online(self._sweep)
            return
        if message.topic in self.birth_topics:  # Home Assistant started: it asks for discovery again
            if message.payload == b"online" and not message.retain:  # a retained one comes at every (re)connect
                self._republish()
            return
        if message.topic.endswith("/availability"):
            if message.retain and message.payload == b"online":
                self._sweep_stale(message.topic[len(self.prefix) + 1 : -len("/availability")])
            if message.retain:  # more of the retained burst: the timer waits from here
                self._arm_timer(self._sweep)
            return
        if message.retain:  # a retained change would be applied again at every reconnect: changes are events
            return
        stream = message.topic[len(self.prefix) + 1 : -len("/set")]
        if not message.payload:  # an empty message clears a retained one: not a change
            return
        try:
            change = parse_change(message.payload, "the payload")
        except ConfigError as exc:
            self._settings_error(stream, {"error": str(exc)})
            return
        if self.on_settings is not None:  # the settings in force are published by the server once applied
            self.on_settings(stream, change, lambda reply: self._settings_error(stream, reply))

    def _sweep_stale(self, stream: str) -> None:
        """A stream a crashed run left online: every state OFF, then offline. A stream of that name that joins
        meanwhile (a pulled source starts at once) is published again after it, or the sweep's OFF and offline
        would overwrite its own online."""
        with self._lock:
            if stream in self._streams:
                return
        for label in self.labels:
            self._send(f"{self.prefix}/{stream}/audio/{label}", "OFF", retain=True)
        self._send(self._stream_availability(stream), "offline", retain=True, qos=1)
        with self._lock:
            entry = self._streams.get(stream)
            down, settings = stream in self._unavailable, self._settings.get(stream)
        if entry is None:
            return
        enabled, on = entry
        self._discovery(stream, enabled)
        for label, shown in zip(self.labels, enabled):
            if shown:
                self._state(stream, label, label in on)
        if settings is not None:
            self._send(f"{self.prefix}/{stream}/settings", settings, retain=True, qos=1)
        self._send(self._stream_availability(stream), "offline" if down else "online", retain=True, qos=1)

    def _settings_error(self, stream: str, reply: dict) -> None:
        if "error" in reply:
            self._send(f"{self.prefix}/{stream}/settings/error", json.dumps(reply), qos=1)

    def settings(self, stream: str, settings: dict) -> None:
        """The settings in force for ``stream`` (retained), at its join and after every change."""
        payload = json.dumps(settings)
        with self._lock:  # published again on reconnect while it is joined (a name never connected: sent once)
            if stream in self._streams:
                self._settings[stream] = payload
        self._send(f"{self.prefix}/{stream}/settings", payload, retain=True, qos=1)

    def settings_forgotten(self, stream: str) -> None:
        """The server forgot the run-time settings of a stream not connected: its retained settings go too."""
        self._send(f"{self.prefix}/{stream}/settings", "", retain=True, qos=1)

    def _send(self, topic: str, payload: str, retain: bool = False, qos: int = 0) -> bool:
        """Hand one message to paho; whether it went (or, QoS 1, waits in paho's queue for the broker)."""
        info = self.client.publish(topic, payload, qos=qos, retain=retain)
        sent = info.rc == self._mqtt.MQTT_ERR_SUCCESS or (info.rc == self._mqtt.MQTT_ERR_NO_CONN and qos > 0)
        with self._lock:  # with no connection paho queues QoS 1 and sends it on reconnect, and drops QoS 0
            if sent:
                self.published += 1
            else:
                self.dropped += 1
            if info.rc == self._mqtt.MQTT_ERR_NO_CONN and qos > 0:
                self._queued += 1
        return sent

    def _published(self) -> tuple[set[str], dict[str, str], dict[str, tuple[list[bool], set[str]]]]:
        """The streams that are down, the settings in force and every stream's labels and states, as they are."""
        with self._lock:
            down, settings = set(self._unavailable), dict(self._settings)
        return down, settings, self._snapshot()

    def _snapshot(self) -> dict[str, tuple[list[bool], set[str]]]:
        with self._lock:
            return {s: (list(enabled), set(on)) for s, (enabled, on) in self._streams.items()}

    def _state(self, stream: str, label: str, on: bool) -> None:
        self._state_topic(f"{self.prefix}/{stream}/audio/{label}", "ON" if on else "OFF")

    def _state_topic(self, topic: str, payload: str) -> bool:
        """Publish a state; one the broker missed is sent on reconnect, even for a stream gone or a label off, if
        the broker needs it (an ON, or the OFF of an ON it holds)."""
        sent = self._send(topic, payload, retain=True)
        with self._lock:
            if sent:
                self._unsent_states.pop(topic, None)
                self._broker_got(topic, payload)
            elif self._broker_needs(topic, payload):
                self._unsent_states[topic] = payload
            else:  # the broker holds OFF or nothing there: nothing to put right
                self._unsent_states.pop(topic, None)
        return sent

    def _broker_got(self, topic: str, payload: str) -> None:
        """(Under the lock.) A state the broker now holds."""
        (self._broker_on.add if payload == "ON" else self._broker_on.discard)(topic)

    def _broker_needs(self, topic: str, payload: str) -> bool:
        """(Under the lock.) Whether a state the broker missed must reach it: an ON, or the OFF of an ON it holds."""
        return payload == "ON" or topic in self._broker_on

    def _resend_states(self) -> None:
        """Every stream's state again (on paho's thread, after a reconnect). Published outside the lock (paho
        may call back while publishing), so an event the worker publishes meanwhile could be overtaken by
        the stale state sent here: what changed during the pass is sent once more, after it."""
        with self._lock:  # first what the broker missed (an OFF of a stream that left meanwhile), then the rest
            missed, self._unsent_states = self._unsent_states, {}
        for topic, payload in missed.items():
            sent = self._send(topic, payload, retain=True)
            with self._lock:  # what the worker published meanwhile (it failed too) is the newer: kept
                if sent:
                    self._broker_got(topic, payload)
                elif self._broker_needs(topic, payload):
                    self._unsent_states.setdefault(topic, payload)
        before = self._snapshot()
        for stream, (enabled, on) in before.items():
            for label, shown in zip(self.labels, enabled):
                if shown:
                    self._state(stream, label, label in on)
        for stream, (_, on) in self._snapshot().items():
            if stream in before:
                for label in on ^ before[stream][1]:
                    self._state(stream, label, label in on)

    # -- what the server calls ---------------------------------------------------------------------------
    def stream_joined(self, stream: str, enabled: Sequence[bool] | None = None) -> None:
        """A stream joined: discovery for the labels it reports, every state OFF, the stream available."""
        enabled = self._shown(enabled)
        with self._lock:
            self._streams[stream] = (enabled, set())
            self._unavailable.discard(stream)
        self._discovery(stream, enabled)
        for label, shown in zip(self.labels, enabled):  # a label left out gets no sensor, and no state to keep
            if shown:
                self._state(stream, label, False)
        self._send(self._stream_availability(stream), "online", retain=True, qos=1)

    def labels_changed(self, stream: str, enabled: Sequence[bool] | None) -> None:
        """A running stream's labels changed: discovery again; a label turned on starts OFF. The states of the
        others stay as they are (a label turned off had its open event closed, OFF, by the server)."""
        enabled = self._shown(enabled)
        with self._lock:
            before, on = self._streams.get(stream, ([False] * len(self.labels), set()))
            self._streams[stream] = (enabled, on)
        self._discovery(stream, enabled)
        for label, was, now in zip(self.labels, before, enabled):
            if now and not was:
                self._state(stream, label, label in on)

    def _shown(self, enabled: Sequence[bool] | None) -> list[bool]:
        """Per label, whether the stream reports it (``None``: all of them)."""
        return [bool(x) for x in enabled] if enabled is not None else [True] * len(self.labels)

    def stream_available(self, stream: str, up: bool) -> None:
        """A pulled source or sound card of the server's own stopped giving audio (``up`` false: its sensors show
        unavailable in Home Assistant, not a quiet OFF) or gives it again."""
        with self._lock:
            (self._unavailable.discard if up else self._unavailable.add)(stream)
        self._send(self._stream_availability(stream), "online" if up else "offline", retain=True, qos=1)

    def stream_left(self, stream: str) -> None:
        with self._lock:
            self._streams.pop(stream, None)
            self._unavailable.discard(stream)
            self._settings.pop(stream, None)  # published again when it joins; kept by the broker meanwhile
        self._send(self._stream_availability(stream), "offline", retain=True, qos=1)

    def _stream_availability(self, stream: str) -> str:
        return f"{self.prefix}/{stream}/availability"

    def event(self, stream: str, event: Event) -> None:
        opened = event.kind == "open"
        with self._lock:
            on = self._streams[stream][1] if stream in self._streams else set()
            if opened:
                on.add(event.label)
            else:
                on.discard(event.label)
        self._state(stream, event.label, opened)
        row = {
            "type": event.kind,
            "stream": stream,
            "label": event.label,
            "onset": round(event.onset, 3),
            "offset": None if event.offset is None else round(event.offset, 3),
            "score": round(event.score_max, 4),
            "reason": event.reason,
            "time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="milliseconds"),
        }
        self._send(f"{self.prefix}/events", json.dumps(row), qos=1)

    def level(self, stream: str, dbfs: float) -> None:
        self._send(f"{self.prefix}/{stream}/audio/{LEVEL}", f"{max(dbfs, -120.0):.1f}")

    def flush(self) -> None:
        """Nothing waits here: each call was handed to paho as it came (an MqttLink, the worker's other
        publisher, sends a round's calls at its end)."""

    def close(self) -> None:
        """States OFF were sent by the events' closes; say offline, flush, disconnect."""
        with self._online_lock:  # an online said after this offline would stay: a clean disconnect has no last will
            self._closing = True
            if self._timer is not None:
                self._timer.cancel()
        if self._said_down and self._queued:  # the broker is away: what waited for it is lost with the process
            print(
                f"streamtag serve: the MQTT broker {self.host}:{self.port} is unreachable: {self._queued} messages "
                "(events, availability) queued for it since it went away are not delivered",
                file=sys.stderr,
                flush=True,
            )
        info = self.client.publish(self.availability, "offline", qos=1, retain=True)
        try:
            info.wait_for_publish(timeout=2.0)
        except (RuntimeError, ValueError):  # not connected: the last will says it for us
            pass
        self.client.disconnect()
        self.client.loop_stop()

    def _discovery(self, stream: str, enabled: Sequence[bool]) -> None:
        device = {
            "identifiers": [f"{self.prefix}_{stream}"],
            "name": f"{self.prefix} {stream}",
            "model": "streamtag",
            "sw_version": __version__,
        }
        common = {
            "availability": [{"topic": self.availability}, {"topic": self._stream_availability(stream)}],
            "availability_mode": "all",
            "device": device,
            "origin": {"name": "streamtag", "sw_version": __version__},
        }
        # the level, in dBFS (no sound_pressure device class: Home Assistant takes dB and dBA for it), disabled
        # until a user enables it: two readings a second a stream would fill its recorder
        level_uid = f"{self.prefix}_{stream}_{LEVEL}"
        level = {
            "name": LEVEL,
            "unique_id": level_uid,
            "state_topic": f"{self.prefix}/{stream}/audio/{LEVEL}",
            "unit_of_measurement": "dBFS",
            "state_class": "measurement",
            "suggested_display_precision": 1,
            "entity_category": "diagnostic",
            "enabled_by_default": False,
            **common,
        }
        self._send(
            f"{self.discovery_prefix}/sensor/{OBJECT_ID_UNSAFE.sub('_', level_uid)}/config",
            json.dumps(level),
            retain=True,
        )
        for label, on in zip(self.labels, enabled):
            uid = f"{self.prefix}_{stream}_{label}"
            topic = f"{self.discovery_prefix}/binary_sensor/{OBJECT_ID_UNSAFE.sub('_', uid)}/config"
            if not on:  # an empty retained config removes the sensor from Home Assistant
                self._send(topic, "", retain=True)
                continue
            config = {
                "name": label.replace("_", " "),
                "unique_id": uid,
                "state_topic": f"{self.prefix}/{stream}/audio/{label}",
                "device_class": "sound",
                "payload_on": "ON",
                "payload_off": "OFF",
                **common,
            }
            self._send(topic, json.dumps(config), retain=True)
