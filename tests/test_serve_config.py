"""serve's per-stream settings: the layers (config file, run-time changes) and their checks, no server."""

import pytest

from streamtag.errors import ConfigError
from streamtag.modelfile import load_config, resolve_model_dir
from streamtag.serve.config import ServeConfig, SettingsBook, StreamSettings, read_serve_config

LABELS = load_config(resolve_model_dir(None)).labels


def _book(**streams) -> SettingsBook:
    return SettingsBook(LABELS, 0.01, [{"default": {"on_threshold": 0.5}}], ServeConfig(streams=streams))


def test_run_time_changes_layer_over_the_config_file_and_an_empty_list_clears():
    book = _book(porch=StreamSettings(allow=("dog",)))
    assert sum(book.settings("porch").enabled(LABELS)) == 1
    book.change("porch", {"allow": ["dog", "cat"]})
    assert sum(book.settings("porch").enabled(LABELS)) == 2
    book.change("porch", {"events": {"dog": {"on_threshold": 0.7}}})  # lists untouched by an events change
    assert sum(book.settings("porch").enabled(LABELS)) == 2
    book.change("porch", {"allow": []})  # clears the config file's list too
    assert all(book.settings("porch").enabled(LABELS)) and book.settings("porch").as_dict()["allow"] == []
    book.change("porch", {"deny": ["rain"]})
    assert not book.settings("porch").enabled(LABELS)[LABELS.index("rain")]
    book.change("porch", {"reset": True})  # back to the config file's settings
    assert sum(book.settings("porch").enabled(LABELS)) == 1
    with pytest.raises(ConfigError, match="reset comes alone"):
        book.change("porch", {"reset": True, "allow": ["cat"]})
    with pytest.raises(ConfigError, match="reset takes true, as"):  # it said "reset comes alone" to a lone reset
        book.change("porch", {"reset": False})


def test_a_class_name_holding_a_comma_stays_whole_in_a_config_string_as_in_allow():
    labels = ["dog", "rain", "glass, broken"]
    assert StreamSettings.parse({"allow": "glass, broken"}, labels, "x").allow == ("glass, broken",)
    assert StreamSettings.parse({"deny": "dog, rain"}, labels, "x").deny == ("dog", "rain")


def test_a_refused_change_leaves_the_settings_as_they_were():
    book = _book()
    book.change("porch", {"events": {"dog": {"on_threshold": 0.6}}})
    before = book.settings("porch")
    for change, message in [
        ({"allow": ["raain"]}, "unknown class 'raain'"),
        ({"allow": ["dog"], "deny": ["cat"]}, "allow or deny, not both"),
        ({"events": {"dog": {"on_threshold": 2.0}}}, "on_threshold must be in (0, 1]"),
        ({"colour": 1}, "unknown setting 'colour'"),
        ("dog", "must be a table/object"),
    ]:
        with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
            book.change("porch", change)
        assert book.settings("porch") == before


def test_a_disabled_label_opens_no_event_and_the_detector_follows_the_settings():
    import numpy as np

    book = _book(porch=StreamSettings(deny=("dog",)))
    probs = np.zeros(len(LABELS), np.float32)
    probs[LABELS.index("dog")] = probs[LABELS.index("rain")] = 0.99
    detector = book.detector("porch")
    opened = [e.label for f in range(50) for e in detector.update(f, probs) if e.kind == "open"]
    assert opened == ["rain"]


def test_streams_without_settings_of_their_own_share_the_defaults_and_the_others_keep_theirs():
    """The defaults' event settings are built once for every plain stream (a join cost 0.8 ms, most of it that);
    a stream from the file, or changed at run time, still gets its own, and a plain one after it the defaults."""
    import numpy as np

    book = _book(porch=StreamSettings(deny=("dog",)))
    probs = np.zeros(len(LABELS), np.float32)
    probs[LABELS.index("dog")] = 0.6

    def opened(name: str) -> list[str]:
        detector = book.detector(name)
        return [e.label for f in range(50) for e in detector.update(f, probs) if e.kind == "open"]

    assert opened("a") == opened("b") == ["dog"] and opened("porch") == []
    book.change("c", {"events": {"dog": {"on_threshold": 0.7}}})
    assert opened("c") == [] and opened("d") == ["dog"] and opened("a") == ["dog"]
    first, second = book.detector("a"), book.detector("b")
    assert first._on is second._on  # the settings made once, shared
    assert [e.kind for f in range(50) for e in first.update(f, probs)] == ["open"]
    assert second.flush(50) == [] and [e.kind for e in first.flush(50)] == ["close"]  # each its own events


def test_the_config_file_names_its_sources(tmp_path):
    path = tmp_path / "serve.toml"
    path.write_text('[streams.cam]\nurl = "rtsp://x/y"\nallow = ["dog"]\n[streams.mic]\ndevice = "USB"\n[streams.ws]\n')
    config = read_serve_config(path, LABELS)
    assert [(s.name, s.url, s.device) for s in config.sources] == [("cam", "rtsp://x/y", None), ("mic", None, "USB")]
    assert set(config.streams) == {"cam", "mic", "ws"} and config.streams["cam"].allow == ("dog",)


def test_a_higher_layer_s_default_moves_every_class_below_it_and_json_of_the_wrong_shape_is_one_line(tmp_path):
    """The config file's [defaults] overrides the layers below key by key, the class entries they hold included:
    --on-threshold 0.3 (copied into every class the model's events.toml names) under a file's default 0.8 left
    dog and rain at 0.3 and the rest at 0.8. A class entry of the same or a higher layer still wins."""
    from streamtag.cli.run import event_tables

    config = ServeConfig(
        defaults=StreamSettings(events={"default": {"on_threshold": 0.8}}),
        streams={"porch": StreamSettings(events={"dog": {"on_threshold": 0.6}})},
    )
    book = SettingsBook(LABELS, 0.01, event_tables(None, None, 0.3), config)
    thresholds = {name: book.detector(name)._on for name in ("porch", "other")}
    for name, dog in (("porch", 0.6), ("other", 0.8)):
        assert thresholds[name][LABELS.index("dog")] == pytest.approx(dog)
        assert thresholds[name][LABELS.index("rain")] == pytest.approx(0.8)
        assert thresholds[name][LABELS.index("chainsaw")] == pytest.approx(0.8)
    # the same between the config file's own layers and a change at run time
    config = ServeConfig(
        defaults=StreamSettings(events={"dog": {"on_threshold": 0.9}}),
        streams={"porch": StreamSettings(events={"default": {"on_threshold": 0.6}})},
    )
    book = SettingsBook(LABELS, 0.01, event_tables(None), config)
    assert book.detector("porch")._on[LABELS.index("dog")] == pytest.approx(0.6)
    assert book.detector("other")._on[LABELS.index("dog")] == pytest.approx(0.9)
    book.change("other", {"events": {"default": {"on_threshold": 0.7}}})
    assert book.detector("other")._on[LABELS.index("dog")] == pytest.approx(0.7)
    for text, message in (('[{"a": 1}]', "give an object of tables"), ('{"streams": {}, "streams": {}}', "twice")):
        path = tmp_path / "serve.json"
        path.write_text(text)
        with pytest.raises(ConfigError, match=message):
            read_serve_config(path, LABELS)


def test_a_broker_url_takes_a_login_and_tls_and_never_shows_the_password(monkeypatch):
    from streamtag.outputs.mqtt import parse_broker

    monkeypatch.delenv("STREAMTAG_MQTT_PASSWORD", raising=False)
    plain = parse_broker("mqtt://127.0.0.1")
    assert (plain.host, plain.port, plain.username, plain.password, plain.tls) == ("127.0.0.1", 1883, None, None, False)
    login = parse_broker("mqtts://ha:p%40ss@broker.local")
    assert (login.port, login.username, login.password, login.tls) == (8883, "ha", "p@ss", True)
    assert "p@ss" not in repr(login)
    monkeypatch.setenv("STREAMTAG_MQTT_PASSWORD", "from-env")
    assert parse_broker("mqtt://ha@broker.local:1884").password == "from-env"
    for url, message in (("mqtt://:secret@host", "needs a user name"), ("http://ha:secret@host", "give mqtt://")):
        with pytest.raises(ConfigError, match=message) as caught:
            parse_broker(url)
        assert "secret" not in str(caught.value)


def test_a_broker_that_cannot_be_reached_is_said_with_its_cause():
    """paho's connect failure has no cause: a typo in the host, a broker down and a TLS port mismatch each say
    what to check."""
    import socket

    pytest.importorskip("paho.mqtt")
    from streamtag.outputs.mqtt import MqttPublisher

    with socket.socket() as closed:  # a free loopback port, then nothing listening on it
        closed.bind(("127.0.0.1", 0))
        free = closed.getsockname()[1]
    assert "connection refused" in MqttPublisher(f"mqtt://127.0.0.1:{free}", LABELS)._why_unreachable()
    assert "no such host" in MqttPublisher("mqtt://no-such-broker.invalid", LABELS)._why_unreachable()
    with socket.socket() as listening:  # something listens, but the TLS handshake does not happen
        listening.bind(("127.0.0.1", 0))
        listening.listen()
        port = listening.getsockname()[1]
        assert "TLS handshake" in MqttPublisher(f"mqtts://127.0.0.1:{port}", LABELS)._why_unreachable()
