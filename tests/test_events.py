"""The event detector's state machine on synthetic probabilities, and on a real clip."""

import json

import numpy as np
import pytest

from streamtag.errors import ConfigError
from streamtag.events import EventDetector, EventParams, load_event_settings

HOP = 0.01


def run(scores, **params):
    """scores: probabilities of class "a"; class "b" stays at 0 and must never fire."""
    det = EventDetector(["a", "b"], HOP, EventParams(**params))
    events = []
    for f, p in enumerate(scores):
        events += [(f, e) for e in det.update(f, np.array([p, 0.0], np.float32))]
    events += [(len(scores), e) for e in det.flush(len(scores))]
    return events


def test_onset_offset_and_open_close_pairing():
    scores = [0.0] * 10 + [0.9] * 30 + [0.0] * 60
    events = run(scores, min_duration_s=0.05, min_gap_s=0.1)
    kinds = [(e.kind, e.label) for _, e in events]
    assert kinds == [("open", "a"), ("close", "a")]
    (f_open, opened), (f_close, closed) = events
    assert opened.onset == pytest.approx(0.10) and f_open == 14  # confirmed after 5 frames, backdated
    assert closed.onset == pytest.approx(0.10) and closed.offset == pytest.approx(0.40)
    assert f_close == 40 + 9  # closes once the gap has lasted min_gap
    assert closed.score_max == pytest.approx(0.9) and closed.score_mean == pytest.approx(0.9)


def test_hysteresis_keeps_event_between_on_and_off():
    scores = [0.9] * 20 + [0.4] * 20 + [0.9] * 20 + [0.0] * 40  # 0.4 is above off = 0.35
    closes = [e for _, e in run(scores, min_duration_s=0.05, min_gap_s=0.05) if e.kind == "close"]
    assert len(closes) == 1 and closes[0].offset == pytest.approx(0.60)


def test_short_blips_are_not_events():
    scores = [0.0] * 10 + [0.9] * 4 + [0.0] * 30
    assert run(scores, min_duration_s=0.1) == []


def test_gap_shorter_than_min_gap_merges():
    scores = [0.9] * 20 + [0.0] * 10 + [0.9] * 20 + [0.0] * 50
    closes = [e for _, e in run(scores, min_duration_s=0.05, min_gap_s=0.2) if e.kind == "close"]
    assert [(c.onset, c.offset) for c in closes] == [(0.0, pytest.approx(0.5))]
    split = [e for _, e in run(scores, min_duration_s=0.05, min_gap_s=0.05) if e.kind == "close"]
    assert len(split) == 2


def test_patience_needs_consecutive_frames():
    flicker = [0.9, 0.5] * 20 + [0.0] * 30  # never two frames in a row above 0.5... 0.5 counts as on
    assert run(flicker, on_threshold=0.6, patience_frames=2, min_duration_s=0.01) == []
    steady = [0.0] * 5 + [0.9] * 3 + [0.0] * 30
    events = run(steady, on_threshold=0.6, patience_frames=3, min_duration_s=0.01)
    assert [e.kind for _, e in events] == ["open", "close"]
    assert events[0][1].onset == pytest.approx(0.05)


def test_flush_closes_open_events_at_stream_end():
    events = run([0.0] * 5 + [0.9] * 50, min_duration_s=0.05)
    assert [e.kind for _, e in events] == ["open", "close"]
    assert events[-1][1].offset == pytest.approx(0.55)


def test_per_class_settings_file(tmp_path):
    path = tmp_path / "events.toml"
    path.write_text("[default]\non_threshold = 0.7\n\n[dog]\nmin_gap_s = 1.0\n")
    default, per_class = load_event_settings(path)
    assert default.on_threshold == 0.7
    assert per_class["dog"].on_threshold == 0.7 and per_class["dog"].min_gap_s == 1.0
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"dog": {"on_treshold": 0.5}}))
    with pytest.raises(ConfigError, match="unknown key 'on_treshold' \\(did you mean on_threshold"):
        load_event_settings(bad)
    with pytest.raises(ConfigError, match="unknown class 'dog'"):
        EventDetector(["a"], HOP, per_class={"dog": EventParams()})


@pytest.mark.parametrize(
    "kwargs",
    [
        {"on_threshold": 0},
        {"on_threshold": 0.5, "off_threshold": 0.6},
        {"patience_frames": 0},
        {"min_gap_s": -1},
        {"min_duration_s": float("nan")},
        {"min_gap_s": float("inf")},
        {"on_threshold": "high"},
        {"patience_frames": 2.5},
    ],
)
def test_bad_params_are_refused(kwargs):
    with pytest.raises(ConfigError):
        EventParams(**kwargs)


def test_an_off_threshold_above_on_names_the_on_threshold_in_force():
    """Layered settings (a model's, a file's, a change) leave the user guessing which on_threshold applied."""
    with pytest.raises(ConfigError, match=r"on_threshold 0\.35 here \(0\.4 given\)"):
        EventParams(on_threshold=0.35, off_threshold=0.4)


def test_settings_file_must_be_json_or_toml(tmp_path):
    for name in ("events.yaml", "events"):
        path = tmp_path / name
        path.write_text('{"default": {"on_threshold": 0.5}}')
        with pytest.raises(ConfigError, match=r"give a \.json or \.toml file"):
            load_event_settings(path)
    upper = tmp_path / "EVENTS.TOML"
    upper.write_text("[default]\non_threshold = 0.6\n")
    assert load_event_settings(upper)[0].on_threshold == 0.6


@pytest.mark.parametrize("clip, label", [("rain.flac", "rain"), ("chainsaw.flac", "chainsaw")])
def test_bundled_model_tags_the_example_clips(tmp_path, clip, label):
    """Each example clip gives one event of its own class, open until the clip ends, and no other event."""
    from .conftest import EXAMPLES, run_cli

    out = tmp_path / "events.jsonl"
    r = run_cli("replay", EXAMPLES / clip, "--fast", "--quiet", "--events", out)
    assert r.returncode == 0, r.stderr
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(row["type"], row["label"]) for row in rows] == [("open", label), ("close", label)]
    close = rows[1]
    # rain's calibrated threshold (0.7, events.toml) is reached a little after 2 s
    assert close["onset"] < 2.5 and close["offset"] == 5.0 and close["reason"] == "stream_end"
    assert close["score_max"] >= 0.8


def test_bundled_model_stays_quiet_on_silence_and_hiss(tmp_path):
    """Digital silence and a -60 dBFS hiss are nothing the model knows: no event, every class low."""
    import soundfile as sf

    from streamtag.backends import make_backend
    from streamtag.training.evaluate import stream_probs

    rng = np.random.default_rng(0)
    backend = make_backend("onnx")
    for audio in (np.zeros(16000 * 4, np.float32), rng.normal(0, 1e-3, 16000 * 4).astype(np.float32)):
        probs = stream_probs(backend, audio)
        assert probs[50:].max() < 0.5
    path = tmp_path / "hiss.wav"
    sf.write(path, rng.normal(0, 1e-3, 16000 * 4), 16000)
    from .conftest import run_cli

    out = tmp_path / "events.jsonl"
    assert run_cli("replay", path, "--fast", "--quiet", "--events", out).returncode == 0
    assert out.read_text() == ""


def test_two_classes_open_at_once():
    """Multi-label scores: a dog over rain gives two events that overlap in time, each with its own close."""
    det = EventDetector(["dog", "rain"], HOP, EventParams(min_duration_s=0.05, min_gap_s=0.1))
    rain = [0.9] * 100
    dog = [0.0] * 30 + [0.8] * 30 + [0.0] * 40
    events = []
    for f, (d, r) in enumerate(zip(dog, rain)):
        events += det.update(f, np.array([d, r], np.float32))
    events += det.flush(100)
    spans = {e.label: (e.onset, e.offset) for e in events if e.kind == "close"}
    assert [(e.kind, e.label) for e in events] == [
        ("open", "rain"),
        ("open", "dog"),
        ("close", "dog"),
        ("close", "rain"),
    ]
    assert spans["rain"][0] < spans["dog"][0] < spans["dog"][1] < spans["rain"][1]


def test_new_settings_close_only_the_events_of_classes_they_change():
    """serve changes a stream's settings at run time: a new threshold for dog must not close (and, in Home
    Assistant, switch OFF and ON again) the rain event open meanwhile."""
    params = EventParams(min_duration_s=0.05, min_gap_s=0.1)
    det = EventDetector(["dog", "rain"], HOP, params)
    events = []
    for f in range(50):
        events += det.update(f, np.array([0.8, 0.9], np.float32))
    assert [(e.kind, e.label) for e in events] == [("open", "dog"), ("open", "rain")]
    new = EventDetector(["dog", "rain"], HOP, params, {"dog": EventParams(on_threshold=0.95, min_duration_s=0.05)})
    closed = new.take_over(det, 50, "settings")
    assert [(e.kind, e.label, e.reason) for e in closed] == [("close", "dog", "settings")]
    later = [e for f in range(50, 100) for e in new.update(f, np.array([0.0, 0.9 if f < 80 else 0.0], np.float32))]
    later += new.flush(100)
    assert [(e.kind, e.label) for e in later] == [("close", "rain")]  # the rain event went on, and closed once
    assert later[0].onset == pytest.approx(0.0)


def test_close_says_why():
    """ended (the score fell), max_duration (then a new event opens), stream_end / reset / interrupted (flush)."""
    det = EventDetector(["a", "b"], HOP, EventParams(min_duration_s=0.05, min_gap_s=0.1, max_duration_s=0.5))
    events = []
    for f, p in enumerate([0.9] * 80 + [0.0] * 20 + [0.9] * 20):
        events += det.update(f, np.array([p, 0.0], np.float32))
    events += det.flush(120, "interrupted")
    closes = [(e.reason, round(e.onset, 2), round(e.offset, 2)) for e in events if e.kind == "close"]
    assert closes == [("max_duration", 0.0, 0.5), ("ended", 0.5, 0.8), ("interrupted", 1.0, 1.2)]
    assert all(e.reason is None for e in events if e.kind == "open")
    assert [e.as_dict().get("reason") for e in events].count("max_duration") == 1
    with pytest.raises(ValueError):
        det.flush(0, "because")
    with pytest.raises(ConfigError, match="max_duration_s must be longer"):
        EventParams(max_duration_s=0.05)


def test_an_alarm_s_beeps_stay_one_event_with_the_bundled_settings():
    """A smoke alarm (T3: three 0.5 s beeps 0.5 s apart, then 1.5 s quiet) is one event, not one per beep."""
    from streamtag.events import build_event_settings, model_event_table
    from streamtag.modelfile import DEFAULT_MODEL_DIR, load_config

    labels = load_config(DEFAULT_MODEL_DIR).labels
    alarm = labels.index("clock_alarm")
    cycle = ([0.9] * 50 + [0.05] * 50) * 2 + [0.9] * 50 + [0.05] * 150  # 4 s
    probs = np.zeros((len(cycle) * 3, len(labels)), np.float32)
    probs[:, alarm] = cycle * 3

    def opened(detector):
        events = [e for f, row in enumerate(probs) for e in detector.update(f, row)]
        return [e for e in events + detector.flush(len(probs)) if e.kind == "open"]

    assert len(opened(EventDetector(labels, 0.01))) == 9  # the plain defaults: one event per beep
    shipped = EventDetector(labels, 0.01, *build_event_settings(model_event_table(DEFAULT_MODEL_DIR)))
    assert len(opened(shipped)) == 1


def test_the_model_settings_apply_by_default_and_flags_override_them(tmp_path):
    from streamtag.cli.run import event_settings
    from streamtag.engine import StreamTagger

    tagger = StreamTagger()  # events=True: the bundled folder's events.toml
    alarm = tagger.labels.index("clock_alarm")
    assert tagger.detector._gap_frames[alarm] == 200 and tagger.detector._gap_frames[tagger.labels.index("rain")] == 30
    mine = tmp_path / "mine.toml"
    mine.write_text("[default]\non_threshold = 0.7\n\n[clock_alarm]\nmin_gap_s = 0.5\n")
    default, per_class = event_settings(None, mine, on_threshold=0.3)
    assert default.on_threshold == 0.3 and per_class["clock_alarm"].on_threshold == 0.3  # the flag moves every class
    assert per_class["clock_alarm"].min_gap_s == 0.5 and per_class["siren"].min_gap_s == 2.0  # the file wins per key


def test_a_stream_pool_gives_each_stream_its_own_detector_with_the_model_settings():
    """MultiStreamTagger reads the model's events.toml once, but every stream still gets a detector of its
    own (event state must never be shared between streams)."""
    from streamtag.multistream import MultiStreamTagger

    pool = MultiStreamTagger(capacity=2)  # events=True: the bundled folder's events.toml
    a, b = pool.join("a"), pool.join("b")
    alarm, rain = pool.labels.index("clock_alarm"), pool.labels.index("rain")
    for engine in (a, b):
        assert engine.detector._gap_frames[alarm] == 200 and engine.detector._gap_frames[rain] == 30
    assert a.detector is not b.detector and a.detector._tracks is not b.detector._tracks


def test_tag_file_gives_the_events_replay_gives_and_a_detector_template_is_copied_per_stream():
    from streamtag import make_backend, tag_file
    from streamtag.multistream import MultiStreamTagger

    from .conftest import EXAMPLES

    backend = make_backend("onnx")
    result = tag_file(backend, EXAMPLES / "rain.flac")  # as the README shows it
    assert [(e.kind, e.label, round(e.onset, 2)) for e in result.events][:1] == [("open", "rain", 2.21)]
    template = EventDetector(backend.labels, 0.01)
    pool = MultiStreamTagger(capacity=2, events=template)
    first, second = pool.join("x").detector, pool.join("y").detector
    assert first is not second and first is not template and first._tracks is not second._tracks


def _calibration_recipe():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "recipes" / "calibrate_events.py"
    spec = importlib.util.spec_from_file_location("calibrate_events", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_event_calibration_counts_events_per_threshold_and_keeps_the_other_settings(tmp_path):
    """recipes/calibrate_events.py: events per hour fall as the threshold rises, the settings file keeps its
    comments and other keys, and the streamtag reader takes what it writes."""
    from streamtag.events import read_event_table

    cal = _calibration_recipe()
    labels = ["dog", "rain", "speech"]
    probs = np.zeros((36_000, 3), np.float32)  # 6 minutes at 10 ms
    for start, peak in ((1000, 0.55), (9000, 0.75), (20000, 0.95)):  # three dog-like bursts of different heights
        probs[start : start + 50, 0] = peak
    rates = {t: cal.events_per_hour([probs], labels, 0.01, {"dog": {"min_gap_s": 1.0}}, t) for t in (0.5, 0.7, 0.9)}
    assert rates[0.5][0] == pytest.approx(30.0) and rates[0.7][0] == pytest.approx(20.0)
    assert rates[0.9][0] == pytest.approx(10.0) and rates[0.5][1:].sum() == 0

    settings = tmp_path / "events.toml"
    settings.write_text(
        "# shipped settings\n# second line\n\n[default]\non_threshold = 0.5\n\n[dog]\nmin_gap_s = 1.0\n"
        "\n[speech]\non_threshold = 0.9\n"  # from an earlier calibration: speech is at the default now
    )
    cal.write_thresholds(settings, {"dog": 0.8, "rain": 0.65, "speech": 0.5}, "calibrated\non two lines")
    text = settings.read_text()
    assert text.startswith("# shipped settings\n# second line\n") and "# calibrated\n# on two lines" in text
    table = read_event_table(settings)
    assert table["dog"] == {"min_gap_s": 1.0, "on_threshold": 0.8} and table["rain"] == {"on_threshold": 0.65}
    assert table["default"] == {"on_threshold": 0.5} and "speech" not in table


def test_event_calibration_puts_a_class_above_its_highest_score_unless_told_to_count_events_only():
    """A class whose short peaks open no event on the calibration audio still gets a threshold above them (a
    few hours are too few to count on its silence elsewhere); --events-only counts events. A class that never
    fits gets the top of the grid; the classes expected there are left out."""
    cal = _calibration_recipe()
    labels = ["dog", "drinking", "siren", "speech"]
    grid = np.array(cal.GRID)
    rates = np.zeros((grid.size, 4))
    rates[:, 0] = np.where(grid < 0.7, 3.0, 0.0)  # dog: events below 0.7, none above
    rates[:, 2] = 5.0  # siren: over the budget everywhere
    peaks = np.array([0.65, 0.82, 1.0, 0.99])  # drinking: peaks at 0.82 but opens no event
    chosen = cal.choose_thresholds(rates, peaks, labels, 0.5, keep={"speech"})
    assert chosen == {"dog": 0.7, "drinking": 0.85, "siren": 0.99}
    counted = cal.choose_thresholds(rates, peaks, labels, 0.5, keep={"speech"}, events_only=True)
    assert counted == {"dog": 0.7, "drinking": 0.5, "siren": 0.99}


@pytest.mark.parametrize("max_duration_s", [None, 0.7])
def test_blocks_of_any_size_give_the_events_of_row_by_row(max_duration_s):
    """update_block (what engines call for several hops) equals update row by row, scores included, also for
    events that stay above their threshold through whole blocks (added up in bulk) and ones cut at a limit."""
    rng = np.random.default_rng(3)
    frames, labels = 3000, ["a", "b", "c", "d"]
    probs = np.clip(rng.normal(0.2, 0.1, (frames, 4)), 0, 1).astype(np.float32)
    probs[200:1400, 0] = rng.uniform(0.6, 1.0, 1200)  # steady for many blocks
    probs[500:2500, 1] = rng.uniform(0.45, 0.9, 2000)  # dips below on now and then, not below off
    probs[800:820, 2] = 0.9  # a short one inside
    for start in range(1000, 2900, 97):  # short bursts
        probs[start : start + 8, 3] = 0.95
    params = EventParams(min_duration_s=0.05, max_duration_s=max_duration_s)

    row = EventDetector(labels, 0.01, params)
    expected = [e for f in range(frames) for e in row.update(f, probs[f])] + row.flush(frames)
    block = EventDetector(labels, 0.01, params)
    got, f = [], 0
    while f < frames:
        k = int(rng.integers(1, 40))
        found = block.update_block(f, probs[f : f + k])
        got += [e for r in sorted(found) for e in found[r]]
        f += k
    got += block.flush(frames)
    assert {e.label for e in expected} == set(labels)
    assert got == expected  # the same events, exact scores (frozen dataclasses compare every field)


def test_event_calibration_refuses_a_manifest_without_a_path_column_in_one_line(tmp_path):
    """A user mistake in the recipe's manifest is one line naming the column and exit 1, before the model loads."""
    import subprocess
    import sys
    from pathlib import Path

    recipe = Path(__file__).resolve().parents[1] / "recipes" / "calibrate_events.py"
    manifest = tmp_path / "calibration.csv"
    manifest.write_text("file,group\na.wav,x\n")
    r = subprocess.run(
        [sys.executable, str(recipe), "default-model-not-needed", str(manifest)], capture_output=True, text=True
    )
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert r.stderr.strip() == f"calibrate_events: error: {manifest}: the header must name a 'path' column"


def test_a_fresh_detector_has_the_settings_and_none_of_the_events():
    """fresh(): what a server makes for each joining stream from one detector; the settings are shared, an open
    event of the one it came from is not, and the new one runs as a detector made from scratch does."""
    template = EventDetector(["a", "b"], HOP, EventParams(on_threshold=0.3, min_duration_s=0.05))
    template._taken = True  # an engine's already
    loud = np.array([0.9, 0.0], np.float32)
    assert [e.kind for f in range(10) for e in template.update(f, loud)] == ["open"]
    fresh = template.fresh()
    assert not getattr(fresh, "_taken", False) and fresh._on is template._on
    assert fresh.flush(10) == []  # the template's open event is not its own
    scratch = EventDetector(["a", "b"], HOP, EventParams(on_threshold=0.3, min_duration_s=0.05))
    scores = [0.0] * 5 + [0.5] * 20 + [0.0] * 30
    for f, p in enumerate(scores):
        row = np.array([p, 0.0], np.float32)
        assert fresh.update(f, row) == scratch.update(f, row), f
    assert [e.kind for e in template.flush(10)] == ["close"]  # and the template's own goes on as it was
