"""StreamTagger: the input contract, the guard, chunking, multi-hop calls, finish and reset."""

import warnings

import numpy as np
import pytest

from streamtag.backends import make_backend
from streamtag.engine import StreamTagger, as_mono_float32, one_thread
from streamtag.errors import ConfigError, InputError
from streamtag.events import EventParams
from streamtag.pipeline import tag_file

from .conftest import EXAMPLES, read_clip, run_cli

LOW = EventParams(on_threshold=0.2, min_duration_s=0.05)


def _probs(steps):
    return np.stack([s.probs for s in steps if s.has_scores])


def _events(steps):
    return [(e.kind, e.label, round(e.onset, 3), e.reason) for s in steps for e in s.events]


@pytest.fixture(scope="module")
def clip():
    return read_clip(EXAMPLES / "dog.flac")[: 16000 * 3]


def test_a_new_engine_on_an_open_backend_starts_a_new_stream(cnn_dir, clip):
    backend = make_backend("onnx", cnn_dir)
    first = _probs(StreamTagger(backend, events=None).feed(clip))
    second = _probs(StreamTagger(backend, events=None).feed(clip))  # the backend still held the first's state
    np.testing.assert_array_equal(first, second)


def test_two_engines_cannot_share_one_backend(cnn_dir, clip):
    """One backend holds one stream's state: fed in turn, two engines on it gave each other's scores."""
    backend = make_backend("onnx", cnn_dir)
    first = StreamTagger(backend, events=None)
    first.feed(clip[:1600])
    second = StreamTagger(backend, events=None)
    second.feed(clip[:1600])
    with pytest.raises(ConfigError, match="give each stream its own backend"):
        first.feed(clip[1600:3200])
    kept = second.feed(clip[1600:16000])
    for stop in (first.reset, first.finish):  # they wiped the newer engine's state and took the backend back
        with pytest.raises(ConfigError, match="give each stream its own backend"):
            stop()
    older = StreamTagger(backend, events=None, sample_rate=44100)  # a refused finish changes nothing, the
    older.feed(np.zeros(4410, np.float32))  # resampler's tail included
    held = older.pending_samples
    StreamTagger(backend, events=None)
    with pytest.raises(ConfigError, match="give each stream its own backend"):
        older.finish()
    assert older.pending_samples == held
    second = StreamTagger(backend, events=None)
    second.feed(clip[:1600]), second.feed(clip[1600:16000])
    alone = StreamTagger(make_backend("onnx", cnn_dir), events=None)
    alone.feed(clip[:1600]), alone.feed(clip[1600:16000])  # the same blocks: the same arithmetic
    np.testing.assert_array_equal(_probs(second.feed(clip[16000:])), _probs(alone.feed(clip[16000:])))
    assert kept


def _inside(obj, method: str, args: tuple, call):
    """Run ``call`` on this thread while another thread is inside ``obj.method(*args)`` (held there)."""
    import threading

    entered, leave = threading.Event(), threading.Event()
    real = getattr(type(obj), method).__wrapped__  # the method without its guard: the guard is taken here

    def held(self, *args):
        entered.set()
        leave.wait(10)
        return real(self, *args)

    worker = threading.Thread(target=one_thread(held), args=(obj, *args))
    worker.start()
    try:
        assert entered.wait(10)
        return call()
    finally:
        leave.set()
        worker.join(10)


def test_an_engine_refuses_a_second_thread_instead_of_scrambling_its_audio(cnn_dir, clip):
    """Two threads feeding one StreamTagger stepped some hops twice and others never, without a word; a feed
    while a MultiStreamTagger steps on another thread scrambled its streams; tag_file twice at once on one
    backend reset the state under the other's step (0.47 off in probability). Each is refused now."""
    from streamtag.multistream import MultiStreamTagger

    engine = StreamTagger(make_backend("onnx", cnn_dir), events=None)
    with pytest.raises(ConfigError, match=r"StreamTagger.feed_blocks\(\) was called while another thread is inside"):
        _inside(engine, "feed_blocks", (clip[:1600],), lambda: engine.feed(clip[:1600]))
    assert engine.frames == 10  # the held call went on; the refused one changed nothing
    multi = MultiStreamTagger(cnn_dir, capacity=2, events=False)
    multi.join("a")
    with pytest.raises(ConfigError, match=r"MultiStreamTagger.feed\(\) was called while another thread"):
        _inside(multi, "step_blocks", (), lambda: multi.feed("a", clip[:1600]))
    backend = make_backend("onnx", cnn_dir)
    first = StreamTagger(backend, events=None)
    with pytest.raises(ConfigError, match="its backend is stepping another thread's stream"):
        hops = np.zeros((1, first.hop), np.float32)
        _inside(first.hop_model, "step", (hops,), lambda: tag_file(backend, EXAMPLES / "dog.flac", events=False))
    np.testing.assert_array_equal(  # one thread after the other: as before, the same scores
        _probs(StreamTagger(backend, events=None).feed(clip)),
        _probs(StreamTagger(make_backend("onnx", cnn_dir), events=None).feed(clip)),
    )


def test_any_chunking_gives_the_same_steps_as_one_call(cnn_dir, clip):
    tagger = StreamTagger(cnn_dir, events=LOW)
    whole = tagger.feed(clip) + tagger.finish()  # 300 hops in one call: stepped as a block
    rng = np.random.default_rng(0)
    cuts = np.sort(rng.integers(0, clip.size, 40))
    pieces = [s for part in np.split(clip, cuts) for s in tagger.feed(part)] + tagger.finish()
    hop_by_hop = StreamTagger(make_backend("onnx", cnn_dir), events=LOW)
    single = [s for i in range(0, clip.size, 160) for s in hop_by_hop.feed(clip[i : i + 160])] + hop_by_hop.finish()
    assert len(_probs(whole)) == 300
    # a backlog goes through the chunk graph, single hops through the hop graph: equal to float rounding
    np.testing.assert_allclose(_probs(whole), _probs(pieces), atol=1e-5)
    np.testing.assert_allclose(_probs(whole), _probs(single), atol=1e-5)
    assert _events(whole) == _events(pieces) == _events(single) and _events(whole)
    assert [s.frame_index for s in whole if s.has_scores] == list(range(300))
    assert whole[-1].events and all(e.reason == "stream_end" for e in whole[-1].events if e.kind == "close")


def test_finish_starts_a_fresh_stream(cnn_dir, clip):
    tagger = StreamTagger(cnn_dir, events=None)
    first = tagger.feed(clip[:16000])
    tagger.feed(clip)
    tagger.finish()
    again = tagger.feed(clip[:16000])
    assert again[0].frame_index == 0
    np.testing.assert_array_equal(_probs(first), _probs(again))


def test_audio_after_a_gap_keeps_its_place_on_the_clock(cnn_dir, clip):
    """live --reconnect: a microphone away for 2.5 s; what it hears after is stamped 2.5 s later than if the gap
    had been closed up, and scored as a fresh stream would score it."""
    tagger = StreamTagger(cnn_dir, events=None)
    tagger.feed(clip[:16000])  # 100 hops
    tagger.reset("gap")
    tagger.skip(2.5)
    after = [s for s in tagger.feed(clip[:16000]) if s.has_scores]
    assert after[0].frame_index == 350 and abs(after[0].t - 3.51) < 1e-9
    np.testing.assert_array_equal(_probs(after), _probs(StreamTagger(cnn_dir, events=None).feed(clip[:16000])))
    for _ in range(3):  # three drops of 15 ms: 4.5 hops in all, not 3 hops rounded down, nor 6 rounded up
        tagger.skip(0.015)
    assert tagger.frames == 450 + 4
    moved = StreamTagger(cnn_dir, events=None)  # the half hop carried goes with a snapshot (it was lost)
    moved.restore(tagger.snapshot())
    for engine in (tagger, moved):
        engine.skip(0.005)
    assert tagger.frames == moved.frames == 455
    for bad in (float("inf"), float("nan"), -1, "1", None, True):  # inf broke the engine for good
        with pytest.raises(ConfigError, match="skip takes seconds"):
            tagger.skip(bad)
    tagger.skip(0.01)
    assert tagger.frames == 456


def test_reset_every_equals_a_fresh_engine_on_each_piece(cnn_dir, clip):
    tagger = StreamTagger(cnn_dir, events=None, reset_every_s=1.0)
    probs = _probs(tagger.feed(clip))
    fresh = StreamTagger(cnn_dir, events=None)
    for k in range(3):
        piece = _probs(fresh.feed(clip[k * 16000 : (k + 1) * 16000]) + fresh.finish())
        np.testing.assert_allclose(probs[k * 100 : (k + 1) * 100], piece, atol=1e-6)


def test_silence_is_judged_after_the_gain(cnn_dir, clip):
    """--reset-on-silence looks at what the model hears: a quiet input raised by --gain is not silence."""
    quiet = np.random.default_rng(0).normal(0, 10 ** (-80 / 20), 48000).astype(np.float32)  # peaks near -68 dBFS

    def resets(**options):
        tagger = StreamTagger(cnn_dir, events=None, reset_on_silence_s=0.5, **options)
        count = []
        reset = tagger.reset
        tagger.reset = lambda *a, **k: count.append(1) or reset(*a, **k)
        tagger.feed(quiet)
        return len(count)

    assert resets() >= 1  # silence as heard
    assert resets(gain_db=40.0) == 0  # -30 dBFS as the model hears it


def test_input_contract_conversions_and_errors():
    x = np.linspace(-0.5, 0.5, 320, dtype=np.float32)
    assert as_mono_float32(x) is x  # the common case is not copied
    np.testing.assert_array_equal(as_mono_float32(x.astype(np.float64)), x)
    np.testing.assert_array_equal(as_mono_float32(list(x)), x)
    np.testing.assert_array_equal(as_mono_float32(x[:, None]), x)
    pcm = (x * 32768).astype(np.int16)
    np.testing.assert_allclose(as_mono_float32(pcm), x, atol=1 / 32768)
    pcm32 = (x.astype(np.float64) * 2**31).astype(np.int32)
    np.testing.assert_allclose(as_mono_float32(pcm32), x, atol=1e-7)
    with pytest.raises(InputError, match=r"mono.*shape \(160, 2\).*mean\(axis=1\)"):
        as_mono_float32(np.zeros((160, 2), np.float32))
    with pytest.raises(InputError, match="got dtype uint8"):
        as_mono_float32(np.zeros(160, np.uint8))
    with pytest.raises(InputError, match="non-numbers"):
        as_mono_float32(["a", None])
    import array

    np.testing.assert_array_equal(as_mono_float32(array.array("f", x)), x)  # anything np.asarray takes
    for wrong in (None, "abc", b"\0\0"):  # not "must be mono ... shape ()"
        with pytest.raises(InputError, match=f"numpy array .*got {type(wrong).__name__}"):
            as_mono_float32(wrong)


def test_an_event_detector_for_other_labels_is_refused_in_one_line(cnn_dir):
    from streamtag.events import EventDetector

    with pytest.raises(ConfigError, match="labels are not the model's"):
        StreamTagger(cnn_dir, events=EventDetector(["a", "b"], 0.01))


def test_int16_is_scaled_so_it_tags_like_float(cnn_dir, clip):
    pcm = np.round(clip * 32767).astype(np.int16)
    as_float = _probs(StreamTagger(cnn_dir, events=None).feed(pcm.astype(np.float32) / 32768))
    np.testing.assert_allclose(_probs(StreamTagger(cnn_dir, events=None).feed(pcm)), as_float, atol=1e-6)


def test_a_poisoned_sample_never_reaches_the_model_state(cnn_dir, clip):
    """One sample of 1e30 (or NaN) is clipped (replaced), counted, and the stream carries on as if it were
    a full-scale click: every row finite, and the rows after it match the audio with a real click there."""
    bad = clip.copy()
    bad[12345] = 1e30
    bad[23456] = np.nan
    tagger = StreamTagger(cnn_dir, events=None)
    probs = _probs(tagger.feed(bad))
    assert np.isfinite(probs).all()
    assert tagger.stats.clipped == 1 and tagger.stats.nonfinite == 1
    assert "1 NaN/Inf" in tagger.stats.problems() and "1 samples beyond full scale" in tagger.stats.problems()
    click = clip.copy()
    click[12345], click[23456] = 1.0, 0.0
    np.testing.assert_array_equal(probs, _probs(StreamTagger(cnn_dir, events=None).feed(click)))
    assert bad[12345] == 1e30  # the caller's array is left as it was
    wide = bad.astype(np.float64)
    wide[12345] = 1e300  # beyond float32: it became Inf on the cast (a RuntimeWarning, then "NaN/Inf")
    other = StreamTagger(cnn_dir, events=None)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        np.testing.assert_array_equal(_probs(other.feed(wide)), probs)
    assert other.stats.clipped == 1 and other.stats.nonfinite == 1


def test_other_rates_and_bad_settings(cnn_dir, clip):
    import soxr

    at_44k = soxr.resample(clip, 16000, 44100).astype(np.float32)
    tagger = StreamTagger(cnn_dir, sample_rate=44100, events=None)
    steps = tagger.feed(at_44k) + tagger.finish()
    assert abs(len(_probs(steps)) - 300) <= 1
    for kwargs, match in (
        ({"sample_rate": -1}, "sample_rate"),
        ({"sample_rate": 1}, "sample_rate"),  # 80,000 samples at 1 Hz: soxr crashed the interpreter
        ({"sample_rate": True}, "sample_rate"),
        ({"sample_rate": 0}, "sample_rate"),
        ({"sample_rate": 44100.5}, "sample_rate"),
        ({"sample_rate": "16000"}, "sample_rate"),
        ({"gain_db": float("nan")}, "gain_db"),
        ({"gain_db": "3"}, "gain_db"),  # a TypeError from a comparison
        ({"gain_db": 61.0}, "gain_db"),  # --gain's range: one range for the API and the CLI
        ({"reset_every_s": 0}, "reset_every_s"),
        ({"events": "yes"}, "events must be"),
    ):
        with pytest.raises(ConfigError, match=match):
            StreamTagger(cnn_dir, **kwargs)


def test_cli_reports_a_poisoned_float_wav_and_stays_finite(cnn_dir, tmp_path, clip):
    import json

    import soundfile as sf

    bad = clip.copy()
    bad[20000] = 1e30
    path = tmp_path / "spike.wav"
    sf.write(path, bad, 16000, subtype="FLOAT")
    out = tmp_path / "s.jsonl"
    r = run_cli("replay", path, "--model", cnn_dir, "--fast", "--quiet", "--jsonl", out, "--all")
    assert r.returncode == 0, r.stderr
    assert "1 samples beyond full scale (|x| > 1) were clipped" in r.stderr
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) >= 29 and all(np.isfinite(list(row["probs"].values())).all() for row in rows if "probs" in row)


def test_a_scheduled_reset_closes_open_events_with_reason_reset(cnn_dir):
    """README: --reset-every and --reset-on-silence close the events open at the reset first (reason reset)."""
    rain = read_clip(EXAMPLES / "rain.flac")
    tagger = StreamTagger(cnn_dir, events=EventParams(on_threshold=0.05, min_duration_s=0.05), reset_every_s=2.0)
    steps = tagger.feed(rain) + tagger.finish()
    closes = [e for s in steps for e in s.events if e.kind == "close"]
    resets = [e for e in closes if e.reason == "reset"]
    assert resets and all(abs(e.offset % 2.0) < 0.02 or abs(e.offset % 2.0 - 2.0) < 0.02 for e in resets)


def test_simple_api_mistakes_are_one_clear_error(cnn_dir):
    """An int for a model, a backend's name for tag_file, a batch of 0, a rate of 0: each named, not an
    AttributeError or a numpy reshape error."""
    from streamtag.pipeline import tag_file
    from streamtag.sources import read_audio

    for call, message in (
        (lambda: StreamTagger(123), "model must be a model folder or an open backend"),
        (lambda: tag_file("onnx", EXAMPLES / "dog.flac"), "tag_file takes an open backend"),
        (lambda: tag_file(make_backend("onnx", cnn_dir), EXAMPLES / "dog.flac", outputs=[1]), "need write"),
        (lambda: make_backend("onnx", cnn_dir, batch_size=0), "batch_size must be a whole number >= 1"),
        (lambda: read_audio(EXAMPLES / "dog.flac", 0), "sample_rate must be a whole number of Hz"),
    ):
        with pytest.raises(ConfigError, match=message):
            call()


def test_big_endian_pcm_is_pcm_a_channels_first_array_gets_the_right_hint_and_a_huge_feed_is_not_kept(cnn_dir, clip):
    pcm = (clip * 32767).astype(np.int16)
    little = StreamTagger(cnn_dir, events=None)
    big = StreamTagger(cnn_dir, events=None)
    np.testing.assert_array_equal(_probs(big.feed(pcm.astype(">i2"))), _probs(little.feed(pcm)))
    with pytest.raises(InputError, match=r"samples.mean\(axis=0\) for \(channels, frames\)"):
        little.feed(np.stack([clip, clip]))
    little.feed(np.tile(clip, 20))  # a minute in one call (3.8 MB): the hop buffer grows for it, then shrinks back
    assert little._pending.nbytes < 1_000_000
    with pytest.raises(ConfigError, match="tag_file takes gain_db"):
        tag_file(little.backend, EXAMPLES / "dog.flac", bogus=1)


def test_misuse_of_the_python_api_is_one_streamtag_error_and_changes_nothing(cnn_dir, clip, tmp_path):
    """Each was a numpy, Python or broadcast error, or took effect half-way (found by trying the API as a user)."""
    from streamtag.multistream import MultiStreamTagger

    tagger = StreamTagger(cnn_dir, events=None)
    with pytest.raises(InputError, match="rows of different lengths"):
        tagger.feed([[0.1], [0.1, 0.2]])
    with pytest.raises(InputError, match="got generator"):  # "got shape ()"
        tagger.feed(x for x in (0.1, 0.2))
    with pytest.raises(InputError, match="a list of whole numbers is floats in -1..1 or PCM, say which"):
        tagger.feed([0] * 160)
    assert tagger.feed(np.zeros((0, 2), np.float32)) == []  # an empty stereo chunk is nothing, not a mix-down
    tagger.feed(clip[:1600])
    for stop in (tagger.finish, tagger.reset):
        with pytest.raises(ConfigError, match="unknown close reason 'bogus'"):
            stop("bogus")
    assert tagger.frames == 10  # nothing was cleared
    for bad in ({}, {"pending": [1, 2]}, None):
        with pytest.raises(ConfigError, match="not an engine snapshot"):
            tagger.restore(bad)
    tagger.feed(clip[1600:1640])  # 40 samples pending: a restore refused part-way had lost them
    snap = tagger.snapshot()
    for part, value in (("pending", np.zeros((3, 3), np.float32)), ("stats", None), ("frames", "x"), ("frames", -5)):
        with pytest.raises(ConfigError, match=rf"not an engine snapshot \(wrong: {part}\)"):
            tagger.restore({**snap, part: value})
    assert tagger.pending_samples == 40 and tagger.frames == 10
    for option in ({"reset_every_s": "1"}, {"reset_every_s": True}, {"gain_db": "3"}):
        with pytest.raises(ConfigError, match="must be a"):
            StreamTagger(cnn_dir, **option)
    for backend, options in ((["onnx"], {}), ("onnx", {"threads": "x"}), ("onnx", {"threads": 0})):
        with pytest.raises(ConfigError, match="unknown backend|threads must be"):
            make_backend(backend, cnn_dir, **options)
    backend = make_backend("onnx", cnn_dir)
    owner = StreamTagger(backend, events=None)
    with pytest.raises(ConfigError):
        StreamTagger(backend, gain_db=99)  # refused: the backend stays the first engine's
    owner.feed(clip[:1600])
    for capacity in ("4", None, 2.5, True, 0, 10**12):  # the last was a bare MemoryError ("873 TiB")
        with pytest.raises(ConfigError, match="capacity must be a whole number"):
            MultiStreamTagger(cnn_dir, capacity=capacity)
    with pytest.raises(ConfigError, match="gain_db must be"):  # at creation, not at every join
        MultiStreamTagger(cnn_dir, capacity=2, engine_options={"gain_db": 100})
    with pytest.raises(ConfigError, match=r"events must be .*\(str given\)"):  # at creation: every join failed
        MultiStreamTagger(cnn_dir, capacity=2, events="yes")

    class Counted:
        closed = 0

        def write(self, step):
            pass

        def close(self):
            self.closed += 1

    from streamtag import Output

    out = Counted()
    assert isinstance(out, Output)  # the protocol can be checked (it raised TypeError)
    with pytest.raises(Exception, match="no such file"):
        tag_file(make_backend("onnx", cnn_dir), tmp_path / "missing.wav", outputs=[out])
    assert out.closed == 1  # the docstring's "closed at the end", a file that cannot be opened included
