"""MultiStreamTagger: many engines, one batched call a round, the same steps as each stream alone."""

import threading

import numpy as np
import pytest

from streamtag.backends import make_backend
from streamtag.engine import StreamTagger
from streamtag.errors import ConfigError, InputError
from streamtag.events import EventParams
from streamtag.multistream import MultiStreamTagger

from .conftest import EXAMPLES, read_clip

LOW = EventParams(on_threshold=0.2, min_duration_s=0.05)  # untrained test models: low scores, still events


def _alone(model_dir, backend, audio, events=LOW):
    """The same audio through one engine of its own: probabilities and events."""
    tagger = StreamTagger(make_backend(backend, model_dir), events=events)
    steps = tagger.feed(audio) + tagger.finish()
    return _split(steps)


def _split(steps):
    probs = np.stack([s.probs for s in steps if s.has_scores])
    events = [(e.kind, e.label, round(e.onset, 3), e.reason) for s in steps for e in s.events]
    return probs, events


class _WorkerMetrics:
    """What a running ServeWorker reports, for the tests that watch one: the hops each round stepped
    (``rounds``) and those a leave stepped alone (``alone``). ``done`` is set once ``hops_until`` hops were
    stepped in rounds, or once ``done_when()`` holds after a stream left."""

    def __init__(self, hops_until=None, done_when=None):
        self.rounds, self.alone, self.done = [], [], threading.Event()
        self.hops = self  # a leave counts its hops with metrics.hops.inc
        self._until, self._done_when = hops_until, done_when

    def stepped(self, hops, seconds):
        self.rounds.append(hops)
        if self._until is not None and sum(self.rounds) >= self._until:
            self.done.set()

    def inc(self, hops):
        self.alone.append(hops)

    def latency(self, seconds):
        pass

    def event(self, label):
        pass

    def left(self, account):
        if self._done_when is not None and self._done_when():
            self.done.set()


@pytest.mark.parametrize("backend", ["onnx", "torch"])
def test_batched_streams_equal_separate_runs_with_joins_and_leaves(model_dir, backend):
    clips = [read_clip(EXAMPLES / n)[: 16000 * 2] for n in ("dog.flac", "rain.flac", "chainsaw.flac")]
    tagger = MultiStreamTagger(model_dir, backend, capacity=2, events=LOW)
    got: dict[str, list] = {"a": [], "b": [], "c": []}
    rng = np.random.default_rng(0)
    tagger.join("a")
    tagger.join("b")
    pos = {"a": 0, "b": 0, "c": 0}
    src = {"a": clips[0], "b": clips[1], "c": clips[2]}
    while tagger.streams:
        for name in list(tagger.streams):
            n = int(rng.integers(1, 700))  # ragged arrival, different per stream
            tagger.feed(name, src[name][pos[name] : pos[name] + n])
            pos[name] += n
        for name, step in tagger.step():
            got[name].append(step)
        for name in list(tagger.streams):
            if pos[name] >= src[name].size:
                got[name] += tagger.leave(name)
                if name == "a":
                    tagger.join("c")  # takes a's slot, which must start from a clean state
    for name in ("a", "b", "c"):
        probs, events = _split(got[name])
        ref_probs, ref_events = _alone(model_dir, backend, src[name])
        assert probs.shape == ref_probs.shape
        np.testing.assert_allclose(probs, ref_probs, atol=1e-5, err_msg=f"stream {name}")
        assert events == ref_events, f"stream {name}"
    assert any(got[n][-1].events for n in "abc")  # the low threshold does give events to compare


def test_capacity_names_and_input_are_checked(cnn_dir):
    tagger = MultiStreamTagger(cnn_dir, capacity=1)
    tagger.join("x")
    with pytest.raises(ConfigError, match="slots are in use"):
        tagger.join("y")
    with pytest.raises(ConfigError, match="already joined"):
        tagger.join("x")
    with pytest.raises(ConfigError, match="no stream named"):
        tagger.feed("y", np.zeros(10, np.float32))
    with pytest.raises(InputError, match="mono"):
        tagger.feed("x", np.zeros((100, 2), np.float32))
    tagger.leave("x")
    tagger.join("y")  # the slot came back


@pytest.mark.parametrize("backend", ["onnx", "torch"])
def test_rounds_keep_their_rows_and_slots_step_in_any_subset(cnn_dir, backend):
    """Several hop rounds in one step() call keep their own rows; streams stepped in place and gathered agree."""
    clips = [read_clip(EXAMPLES / n)[:16000] for n in ("dog.flac", "rain.flac", "chainsaw.flac")]
    tagger = MultiStreamTagger(cnn_dir, backend, capacity=4, events=None)
    for name in "abc":
        tagger.join(name)
    got: dict[str, list] = {n: [] for n in "abc"}
    for start in range(0, 16000, 800):  # five hops per feed: five rounds per step() call
        for name, clip in zip("abc", clips):
            if name != "b" or start % 1600 == 0:  # "b" lags, so rounds alternate between slots 0..2 and {0, 2}
                tagger.feed(name, clip[start : start + (800 if name != "b" else 1600)])
        rows = list(tagger.step())  # collected without copying
        for name, step in rows:
            got[name].append(step.probs)
    for name, clip in zip("abc", clips):
        ref, _ = _alone(cnn_dir, backend, clip, events=None)
        np.testing.assert_allclose(np.stack(got[name]), ref, atol=1e-5, err_msg=f"stream {name}")


@pytest.mark.parametrize("backend", ["onnx", "torch"])
def test_rounds_of_gathered_slots_step_as_hop_by_hop_and_leave_the_others_alone(model_dir, backend):
    """step_rounds: k hops of streams that are not slots 0..n-1 (a server's round), their state gathered and
    scattered once: the probabilities and state of k step calls, the slots not named untouched, and the pool
    goes on from there alike; each stream's probabilities and state are those of the stream stepped alone. The slots
    have stepped different numbers of hops before (their delay lines at different places), as a server's streams
    have."""
    b = make_backend(backend, model_dir)
    hop = b.config.features.hop_length
    rng = np.random.default_rng(0)
    warm = (rng.standard_normal((6, 5, hop)) * 0.1).astype(np.float32)
    audio = (rng.standard_normal((7, 3, hop)) * 0.1).astype(np.float32)
    slots, others = np.array([1, 3, 4]), [0, 2, 5]
    pools = [b.new_state(6), b.new_state(6)]
    for pool in pools:  # every slot with some history first, slots 1 and 4 two hops more
        for r in range(5):
            b.step(pool, np.arange(6), warm[:, r])
        b.step(pool, np.array([1, 4]), warm[[1, 4], 4])
        b.step(pool, np.array([4]), warm[[4], 3])
    before = [b.snapshot(pools[0], s) for s in others]
    start = [b.snapshot(pools[0], s) for s in slots]
    assert b.step_rounds(pools[0], slots, audio[:0]).shape == (0, 3, len(b.labels))  # no hops: nothing stepped
    rounds = b.step_rounds(pools[0], slots, audio)
    one_by_one = np.stack([np.array(b.step(pools[1], slots, audio[r])) for r in range(7)])
    np.testing.assert_allclose(rounds, one_by_one, atol=1e-6)
    for i, s in enumerate(slots):  # each stream alone in a pool of its own, stepped in place (nothing gathered)
        alone = b.new_state(1)
        b.restore(alone, 0, start[i])
        probs = np.stack([np.array(b.step(alone, np.array([0]), audio[r, i : i + 1]))[0] for r in range(7)])
        np.testing.assert_allclose(rounds[:, i], probs, atol=1e-6)
        for u, v in zip(b.snapshot(alone, 0), b.snapshot(pools[0], s)):
            np.testing.assert_allclose(u, v, atol=1e-6)
    for s, rows in zip(others, before):
        for u, v in zip(b.snapshot(pools[0], s), rows):
            np.testing.assert_array_equal(u, v)
    for s in range(6):
        for u, v in zip(b.snapshot(pools[0], s), b.snapshot(pools[1], s)):
            np.testing.assert_allclose(u, v, atol=1e-6)
    after = (rng.standard_normal((6, hop)) * 0.1).astype(np.float32)
    np.testing.assert_allclose(b.step(pools[0], np.arange(6), after), b.step(pools[1], np.arange(6), after), atol=1e-6)


class _OlderBackend:
    """A backend written before step_slot_hops and step_rounds: everything else of the real one."""

    def __init__(self, backend) -> None:
        self._backend = backend

    def __getattr__(self, name):
        if name in ("step_slot_hops", "step_rounds"):
            raise AttributeError(name)
        return getattr(self._backend, name)


@pytest.mark.parametrize("backend", ["onnx", "torch", "older"])
def test_a_leaving_stream_s_backlog_is_stepped_in_chunks_exactly_and_leaves_the_others_alone(cnn_dir, backend):
    """A stream that leaves with seconds of audio not yet stepped has them stepped at once, alone (the chunk
    graph, from its slot's state and delay lines): the same steps as the stream alone, and the streams that
    stay go on as if it had never been there. A backend without step_slot_hops steps them a hop a call."""
    clips = {n: read_clip(EXAMPLES / f"{n}.flac") for n in ("dog", "rain", "chainsaw")}
    older = backend == "older"
    tagger = MultiStreamTagger(cnn_dir, "onnx" if older else backend, capacity=3, events=LOW)
    hop_calls = []
    if backend != "torch":  # count the one-hop calls a leaving stream makes
        one_hop = tagger.backend._step_pool
        tagger.backend._step_pool = lambda *args: hop_calls.append(1) or one_hop(*args)
    if older:
        tagger.backend, backend = _OlderBackend(tagger.backend), "onnx"
    got = {name: [] for name in clips}
    for name, clip in clips.items():
        tagger.join(name)
        tagger.feed(name, clip[:3200])  # 20 hops each, stepped together
    for name, step in tagger.step():
        got[name].append(step)
    tagger.feed("rain", clips["rain"][3200:51200])  # 300 hops more: a backlog of several chunks
    stepped_together = len(hop_calls)
    got["rain"] += tagger.leave("rain")
    if backend == "onnx":  # 300 hops: on the chunk graph, or a call a hop for the older backend
        assert len(hop_calls) - stepped_together == (300 if older else 0)
    for name in ("dog", "chainsaw"):
        tagger.feed(name, clips[name][3200:6400])
    for name, step in tagger.step():
        got[name].append(step)
    for name, n in (("rain", 51200), ("dog", 6400), ("chainsaw", 6400)):
        probs, events = _split(got[name])
        ref_probs, ref_events = _alone(cnn_dir, backend, clips[name][:n])
        if name != "rain":  # still joined: its open events are not closed yet
            ref_events = [e for e in ref_events if e[0] != "close" or e[3] != "stream_end"]
        np.testing.assert_allclose(probs, ref_probs, atol=1e-5, err_msg=name)
        assert events == ref_events, name


def test_a_round_of_max_hops_leaves_a_stream_far_ahead_for_the_next_rounds(cnn_dir):
    """step_blocks(max_hops): one round, at most that many hops a stream; `behind` says hops are left, and the
    rounds that follow give each stream exactly the steps of a stream alone."""
    clips = {"far": read_clip(EXAMPLES / "rain.flac")[:8000], "near": read_clip(EXAMPLES / "dog.flac")[:480]}
    tagger = MultiStreamTagger(cnn_dir, "onnx", capacity=2, events=LOW)
    for name, clip in clips.items():
        tagger.join(name)
        tagger.feed(name, clip)  # 50 hops and 3
    first = list(tagger.step_blocks(max_hops=10))
    assert sorted((name, len(block)) for name, block in first) == [("far", 10), ("near", 3)] and tagger.behind
    got = {name: [] for name in clips}
    for name, block in first:
        got[name] += block.steps()
    rounds = 1
    while tagger.behind:
        for name, block in tagger.step_blocks(max_hops=10):
            got[name] += block.steps()
        rounds += 1
    assert rounds == 5 and not tagger.behind  # 40 hops of "far" left, 10 a round
    for name in clips:
        got[name] += tagger.leave(name)
    for name, clip in clips.items():
        probs, events = _split(got[name])
        ref_probs, ref_events = _alone(cnn_dir, "onnx", clip)
        np.testing.assert_allclose(probs, ref_probs, atol=1e-5, err_msg=name)
        assert events == ref_events, name
    # silence resets step a stream one hop a block: still behind until every ready hop is stepped
    tagger = MultiStreamTagger(cnn_dir, "onnx", capacity=1, events=None, engine_options={"reset_on_silence_s": 1.0})
    tagger.join("quiet")
    tagger.feed("quiet", clips["near"])
    blocks = [len(block) for _, block in tagger.step_blocks(max_hops=10)]
    while tagger.behind:
        blocks += [len(block) for _, block in tagger.step_blocks(max_hops=10)]
    assert blocks == [1, 1, 1]


def test_a_round_of_max_streams_takes_the_longest_waiting_first_and_steps_them_exactly(cnn_dir):
    """step_blocks(max_streams): one round of at most that many streams, those fed first; the streams it left
    out (`left_out`) are first in the next round, ahead of audio fed since; each stream's steps are those of a
    stream alone, however the rounds cut them."""
    names = ["a", "b", "c", "d"]
    clips = {
        n: read_clip(EXAMPLES / f)[: 16000 * 2]
        for n, f in zip(names, ("dog.flac", "rain.flac", "chainsaw.flac", "rain.flac"))
    }
    clips["d"] = clips["d"][8000:]  # not the same audio as b
    tagger = MultiStreamTagger(cnn_dir, "onnx", capacity=4, events=LOW)
    for name in names:
        tagger.join(name)
    got = {name: [] for name in names}
    pos = dict.fromkeys(names, 0)

    def feed(name, n):
        tagger.feed(name, clips[name][pos[name] : pos[name] + n])
        pos[name] += n

    for name in ("c", "a", "d", "b"):  # the order they wait in
        feed(name, 1600)
    assert tagger.waiting == 4
    rounds = []
    first = tagger.step_blocks(max_streams=2)
    rounds.append(sorted(name for name, _ in first))
    assert rounds[0] == ["a", "c"] and tagger.left_out == 2
    for name, block in first:
        got[name] += block.steps()
    feed("c", 1600)  # c again: behind d and b, which waited longer
    second = tagger.step_blocks(max_streams=2)
    assert sorted(name for name, _ in second) == ["b", "d"] and tagger.left_out == 1
    for name, block in second:
        got[name] += block.steps()
    rng = np.random.default_rng(1)
    while any(pos[n] < clips[n].size for n in names) or tagger.waiting:
        for name in names:
            if pos[name] < clips[name].size and rng.random() < 0.6:
                feed(name, int(rng.integers(100, 2400)))
        for name, block in tagger.step_blocks(max_streams=int(rng.integers(1, 4))):
            got[name] += block.steps()
    assert tagger.left_out == 0 and tagger.waiting == 0
    for name in names:
        got[name] += tagger.leave(name)
        probs, events = _split(got[name])
        ref_probs, ref_events = _alone(cnn_dir, "onnx", clips[name])
        assert probs.shape == ref_probs.shape, name
        np.testing.assert_allclose(probs, ref_probs, atol=1e-5, err_msg=name)
        assert events == ref_events, name
    with pytest.raises(ConfigError, match="max_streams must be a whole number >= 1"):
        tagger.step_blocks(max_streams=0)


def test_a_pooled_stream_s_level_meter_reads_as_the_stream_alone_hop_by_hop(cnn_dir):
    """The level figures of a round's blocks, computed for all its streams at once (blocks of unequal
    lengths, so some rows are padding), equal those of each stream's engine fed one hop at a time."""
    clips = {
        "loud": read_clip(EXAMPLES / "chainsaw.flac")[:16000],
        "soft": 0.01 * read_clip(EXAMPLES / "dog.flac")[:16000],
    }
    tagger = MultiStreamTagger(cnn_dir, "onnx", capacity=2, events=None)
    for name in clips:
        tagger.join(name)
    rng = np.random.default_rng(3)
    pos = dict.fromkeys(clips, 0)
    while any(pos[n] < clips[n].size for n in clips):
        for name, clip in clips.items():
            n = int(rng.integers(1, 2400))
            tagger.feed(name, clip[pos[name] : pos[name] + n])
            pos[name] += n
        tagger.step_blocks()
    for name, clip in clips.items():
        alone = StreamTagger(make_backend("onnx", cnn_dir), events=None)
        for i in range(0, clip.size, 160):
            alone.feed(clip[i : i + 160])
        pooled = tagger.streams[name].stats
        assert pooled.frames == alone.stats.frames == 100, name
        for field in ("power_sum", "recent_power", "peak"):
            assert getattr(pooled, field) == pytest.approx(getattr(alone.stats, field), rel=1e-5), (name, field)
    assert tagger.streams["soft"].stats.recent_dbfs < tagger.streams["loud"].stats.recent_dbfs - 30


def test_a_stream_at_another_rate_is_resampled_like_a_single_engine(cnn_dir):
    audio = read_clip(EXAMPLES / "dog.flac")[:16000]
    import soxr

    at_48k = soxr.resample(audio, 16000, 48000).astype(np.float32)
    tagger = MultiStreamTagger(cnn_dir, capacity=2, events=None)
    tagger.join("mic", sample_rate=48000)
    steps = []
    for i in range(0, at_48k.size, 4800):
        tagger.feed("mic", at_48k[i : i + 4800])
        steps += [s for _, s in tagger.step()]
    steps += tagger.leave("mic")
    alone = StreamTagger(make_backend("onnx", cnn_dir), sample_rate=48000, events=None)
    ref = [s for i in range(0, at_48k.size, 4800) for s in alone.feed(at_48k[i : i + 4800])] + alone.finish()
    assert len(ref) == 100
    np.testing.assert_allclose(_split(steps)[0], _split(ref)[0], atol=1e-5)


def test_a_bad_close_reason_for_leave_or_reset_changes_nothing(cnn_dir):
    """The held hops were stepped (and their steps lost) before the reason was found unknown."""
    from streamtag.multistream import MultiStreamTagger

    pool = MultiStreamTagger(cnn_dir, capacity=1, events=None)
    pool.join("a")
    pool.feed("a", read_clip(EXAMPLES / "rain.flac")[:16000])
    for call in (pool.leave, pool.reset):
        with pytest.raises(ConfigError, match="unknown close reason 'bogus'"):
            call("a", "bogus")
    assert pool.streams["a"].frames == 0 and pool.streams["a"].pending_samples == 16000
    assert sum(len(s.probs) for _, s in pool.step_blocks()) == 100


def test_a_snapshot_that_does_not_fit_the_pool_changes_nothing(cnn_dir):
    """Another backend's snapshot (or a damaged one) was half-applied: the engine restored, the model not, and a
    numpy error (or, for a row of the wrong size, a broadcast into place without a word)."""
    from streamtag.multistream import MultiStreamTagger

    audio = read_clip(EXAMPLES / "rain.flac")
    pool = MultiStreamTagger(cnn_dir, capacity=2, events=None)
    pool.join("a")
    pool.feed("a", audio[:16000])
    pool.step()
    good = pool.snapshot("a")
    pool.join("b")
    pool.feed("b", audio[:8000])
    pool.step()
    before = pool.snapshot("b")
    short = {**good, "model": good["model"][:1] + [np.zeros(1, np.float32)] * (len(good["model"]) - 1)}
    for bad in (short, {**good, "model": good["model"][:-1]}, {"model": good["model"]}, {}, None):
        with pytest.raises(ConfigError, match="not a|snapshot"):
            pool.restore("b", bad)
        after = pool.snapshot("b")
        assert after["engine"]["frames"] == before["engine"]["frames"] == 50
        for x, y in zip(after["model"], before["model"]):
            np.testing.assert_array_equal(x, y)
    pool.restore("b", good)
    assert pool.streams["b"].frames == 100


@pytest.mark.parametrize("backend", ["onnx", "torch"])
def test_a_stream_snapshot_restored_in_another_pool_goes_on_exactly(cnn_dir, backend):
    """serve --ray moves a stream by snapshot: engine state (hop buffer, time, event tracks) and model state
    (rows and rings) restored into another pool's slot give the steps the stream would have given."""
    from streamtag.multistream import MultiStreamTagger

    audio = read_clip(EXAMPLES / "rain.flac")
    cut = 16000 * 2 + 77  # mid-hop: the part-hop travels too
    alone = MultiStreamTagger(cnn_dir, backend, capacity=2, events=EventParams(on_threshold=0.2))
    alone.join("a")
    alone.feed("a", audio)
    ref = list(alone.step()) + [("a", s) for s in alone.leave("a")]

    first = MultiStreamTagger(cnn_dir, backend, capacity=4, events=EventParams(on_threshold=0.2))
    first.join("other")  # the stream sits in another slot than it will in the second pool
    first.join("a")
    first.feed("a", audio[:cut])
    before = [(n, s) for n, s in first.step() if n == "a"]
    snap = first.snapshot("a")
    second = MultiStreamTagger(cnn_dir, backend, capacity=2, events=EventParams(on_threshold=0.2))
    second.join("a")
    second.restore("a", snap)
    second.feed("a", audio[cut:])
    after = list(second.step()) + [("a", s) for s in second.leave("a")]
    got = before + after
    assert [s.frame_index for _, s in got] == [s.frame_index for _, s in ref]
    np.testing.assert_allclose(
        np.stack([s.probs for _, s in got if s.has_scores]),
        np.stack([s.probs for _, s in ref if s.has_scores]),
        atol=1e-6,
    )
    events = [(e.kind, e.label, e.onset, e.reason) for _, s in got for e in s.events]
    assert events == [(e.kind, e.label, e.onset, e.reason) for _, s in ref for e in s.events] and events


def test_blocks_are_the_steps_and_serve_sends_the_same_messages_from_either(cnn_dir):
    """step_blocks() is step() a block at a time (same hops, times, scores, events), and the serve worker
    sends the same messages whether it is handed blocks or the steps inside them."""
    from streamtag.serve.worker import ServeOptions, ServeWorker, StreamAccount
    from streamtag.steps import StepBlock, as_steps

    clips = {"a": read_clip(EXAMPLES / "dog.flac"), "b": read_clip(EXAMPLES / "rain.flac")[:37_000]}
    low = EventParams(on_threshold=0.05, off_threshold=0.02)  # events in both streams

    def run(blocks: bool):
        multi = MultiStreamTagger(cnn_dir, capacity=2, events=low)
        worker = ServeWorker(multi, ServeOptions())
        sent = {name: [] for name in clips}
        items = []
        for name in clips:
            multi.join(name)
            worker.accounts[name] = StreamAccount(16000)
            worker.listeners[name] = sent[name].append
            worker.enabled[name] = np.ones(len(multi.labels), bool)
        for start in range(0, 80_000, 2_700):  # uneven chunks: blocks of several lengths
            for name, clip in clips.items():
                if start < clip.size:
                    multi.feed(name, clip[start : start + 2_700])
            got = list(multi.step_blocks() if blocks else multi.step())
            items += got
            for name, item in got:
                worker._deliver(name, item)
        for name in clips:
            for step in multi.leave(name):
                items.append((name, step))
                worker._deliver(name, step)
        return items, sent

    block_items, block_sent = run(True)
    step_items, step_sent = run(False)
    assert any(isinstance(item, StepBlock) and len(item) > 1 for _, item in block_items)
    expanded = {n: as_steps(i for m, i in block_items if m == n) for n in clips}
    plain = {n: [s for m, s in step_items if m == n] for n in clips}
    for name in clips:
        assert [s.frame_index for s in expanded[name]] == [s.frame_index for s in plain[name]]
        assert [s.t for s in expanded[name]] == [s.t for s in plain[name]]
        np.testing.assert_array_equal(
            np.stack([s.probs for s in expanded[name] if s.has_scores]),
            np.stack([s.probs for s in plain[name] if s.has_scores]),
        )
        assert [e.as_dict() for s in expanded[name] for e in s.events] == [
            e.as_dict() for s in plain[name] for e in s.events
        ]
    assert sum(m["type"] == "open" for m in block_sent["a"] + block_sent["b"]) > 0
    assert block_sent == step_sent


def test_the_serve_worker_steps_a_stream_far_ahead_a_capped_round_at_a_time(cnn_dir):
    """The running serve worker, handed 4 s of one stream and 0.1 s of another at once: no round steps more
    than max_round_hops of a stream, and every hop is stepped (the rounds after the first follow on their own)."""
    from streamtag.serve.worker import ServeOptions, ServeWorker

    multi = MultiStreamTagger(cnn_dir, capacity=2, events=None)
    worker = ServeWorker(multi, ServeOptions(capacity=2, max_round_hops=25))
    worker.metrics = rounds = _WorkerMetrics(hops_until=410)
    rain = read_clip(EXAMPLES / "rain.flac")
    worker.submit("join", "fast", 16000, lambda message: None)
    worker.submit("join", "slow", 16000, lambda message: None)
    worker.submit("audio", "fast", rain[:64_000])  # 400 hops, within the 5 s a stream may queue
    worker.submit("audio", "slow", rain[:1_600])  # 10 hops
    worker.start()
    try:
        assert rounds.done.wait(60), rounds.rounds
        with worker.lock:
            dropped = {name: account.dropped for name, account in worker.accounts.items()}
    finally:
        worker.stop()
        worker.join(10)
    assert sum(rounds.rounds) == 410 and max(rounds.rounds) <= 25 + 10, rounds.rounds
    assert dropped == {"fast": 0, "slow": 0} and worker.failure is None


def test_the_serve_worker_steps_at_most_max_round_streams_a_round_and_sends_what_one_round_would(cnn_dir):
    """The running serve worker handed 0.3 s of 5 streams at once. With rounds of at most 3 streams (5 wait: not
    behind) no round steps more than 3; with rounds of 2 (more than two rounds' worth wait: behind) the first
    round takes twice that, 4. Every hop is stepped, and each client gets the messages a worker stepping them all
    in one round sends."""
    from streamtag.serve.worker import ServeOptions, ServeWorker

    def run(max_round_streams):
        multi = MultiStreamTagger(cnn_dir, capacity=5, events=LOW)
        worker = ServeWorker(multi, ServeOptions(capacity=5, max_round_streams=max_round_streams))
        worker.metrics = rounds = _WorkerMetrics(hops_until=150)
        messages = {f"s{i}": [] for i in range(5)}
        clips = [read_clip(EXAMPLES / n) for n in ("rain.flac", "dog.flac", "chainsaw.flac")]
        for name in messages:
            worker.submit("join", name, 16000, messages[name].append)
        for i, name in enumerate(messages):
            worker.submit("audio", name, clips[i % 3][i * 1600 : i * 1600 + 4800])  # 30 hops each
        worker.start()
        try:
            assert rounds.done.wait(60), rounds.rounds
        finally:
            worker.stop()
            worker.join(10)
        assert worker.failure is None
        return rounds.rounds, messages

    capped, got = run(3)
    doubled, got_doubled = run(2)
    whole, expected = run(100)
    assert sum(capped) == 150 and max(capped) <= 3 * 25 and len(capped) >= 3, capped  # 3 streams, 25 hops each
    assert sum(doubled) == 150 and doubled[0] == 4 * 25 and max(doubled) <= 4 * 25, doubled
    assert max(whole) == 5 * 25  # the uncapped worker took all five in one round (max_round_hops 25)
    for name in got:
        assert [m["type"] for m in got[name] if m is not None].count("scores") == 3, got[name]
        assert got[name] == expected[name] == got_doubled[name], name
    assert any(m["type"] == "open" for name in got for m in got[name] if m is not None)  # events compared too


def test_streams_that_end_with_hops_held_leave_after_a_round_steps_them_with_the_others(cnn_dir):
    """Clients that send their last audio and eof at once (hundreds at the end of a benchmark, or of a
    site's shift): their hops are stepped in the next round, batched, not one stream at a time as each leave
    would, then they leave with the reason they ended with; each client gets what it gets when its hops were
    stepped before its eof came."""
    import time

    from streamtag.serve.worker import ServeOptions, ServeWorker

    clips = [read_clip(EXAMPLES / n) for n in ("rain.flac", "dog.flac", "chainsaw.flac")]

    def run(eof_with_audio):
        multi = MultiStreamTagger(cnn_dir, capacity=3, events=LOW)
        worker = ServeWorker(multi, ServeOptions(capacity=3))
        worker.metrics = metrics = _WorkerMetrics(done_when=lambda: not worker.accounts)
        messages = {name: [] for name in ("a", "b", "c")}
        for name in messages:
            worker.submit("join", name, 16000, messages[name].append)
        for i, name in enumerate(messages):
            worker.submit("audio", name, clips[i][:4800])  # 30 hops each
        if eof_with_audio:
            worker.submit("eof", "a")
            worker.submit("gone", "b")  # a client that went away
            worker.submit("eof", "b")  # and the front's word after it: the first stands
            worker.submit("eof", "c")
        worker.start()
        try:
            if not eof_with_audio:
                while sum(metrics.rounds) < 90:
                    time.sleep(0.01)
                for name, kind in (("a", "eof"), ("b", "gone"), ("c", "eof")):
                    worker.submit(kind, name)
            assert metrics.done.wait(60)
        finally:
            worker.stop()
            worker.join(10)
        assert worker.failure is None
        return metrics, messages

    ended, got = run(True)
    _, expected = run(False)
    assert sum(ended.rounds) == 90 and max(ended.rounds) == 75 and not any(ended.alone), (ended.rounds, ended.alone)
    assert got == expected
    assert [got[name][-2]["reason"] for name in "abc"] == ["stream_end", "interrupted", "stream_end"]
    assert all(got[name][-2]["processed"] == 4800 and got[name][-1] is None for name in "abc")


def test_what_step_returns_is_whole_and_a_left_streams_engine_is_closed(cnn_dir):
    """step() is a list made whole before it returns: a caller that reads one item and stops loses nothing
    (a generator dropped the hops it had taken). The engine join() gave steps nothing once its stream left:
    its slot is another stream's."""
    clip = read_clip(EXAMPLES / "dog.flac")[:16000]
    tagger = MultiStreamTagger(cnn_dir, capacity=1, events=LOW)
    engine = tagger.join("a")
    tagger.feed("a", clip)
    steps = tagger.step()
    first = next(iter(steps))
    assert first[0] == "a" and len(steps) == 100  # every hop is there, whatever the caller read
    assert tagger.step() == []
    tagger.leave("a")
    tagger.join("b")
    with pytest.raises(ConfigError, match="has left"):
        engine.feed(clip[:1600])
    with pytest.raises(ConfigError, match="max_hops"):
        tagger.step_blocks(max_hops=0)
    with pytest.raises(ConfigError, match="non-empty string"):
        tagger.join(None)
    with pytest.raises(ConfigError, match="sample_rate to join"):
        MultiStreamTagger(cnn_dir, engine_options={"sample_rate": 44100})


def test_one_event_detector_given_to_two_streams_keeps_their_events_apart(cnn_dir):
    """An EventDetector given to several engines (or joins) is each one's own copy: fed in turn, each stream's
    events are those it has alone, every open with its close."""
    from streamtag.events import EventDetector

    clips = {"a": read_clip(EXAMPLES / "dog.flac")[:32000], "b": read_clip(EXAMPLES / "rain.flac")[:32000]}
    backend = make_backend("onnx", cnn_dir)
    shared = EventDetector(backend.labels, backend.config.features.frame_seconds, LOW)
    tagger = MultiStreamTagger(cnn_dir, capacity=2)
    got = {name: [] for name in clips}
    for name in clips:
        tagger.join(name, events=shared)
    for start in range(0, 32000, 1600):
        for name, clip in clips.items():
            tagger.feed(name, clip[start : start + 1600])
        for name, step in tagger.step():
            got[name].append(step)
    for name in clips:
        got[name] += tagger.leave(name)
        _, events = _split(got[name])
        _, ref = _alone(cnn_dir, "onnx", clips[name])
        assert events == ref and ref, name
    one, two = (StreamTagger(make_backend("onnx", cnn_dir), events=shared) for _ in range(2))
    mixed = {name: [] for name in clips}
    for start in range(0, 32000, 1600):
        mixed["a"] += one.feed(clips["a"][start : start + 1600])
        mixed["b"] += two.feed(clips["b"][start : start + 1600])
    mixed["a"] += one.finish()
    mixed["b"] += two.finish()
    for name in clips:
        assert _split(mixed[name])[1] == _alone(cnn_dir, "onnx", clips[name])[1], name


def test_settings_of_names_not_connected_are_kept_for_the_capacity_most_recent(cnn_dir):
    """Any client of the broker may send settings for any name, and every name that ever connected kept its
    settings for good: the book grew without end (0.8 KB a name), and 256 names never seen filled it for good.
    The ``capacity`` most recently changed or left are kept; a connected stream's and the config file's never go."""
    from unittest import mock

    from streamtag.serve.config import ServeConfig, SettingsBook
    from streamtag.serve.worker import ServeOptions, ServeWorker

    multi = MultiStreamTagger(cnn_dir, capacity=2)
    book = SettingsBook(multi.labels, multi.frame_seconds, [{}], ServeConfig())
    mqtt = mock.Mock()
    worker = ServeWorker(multi, ServeOptions(capacity=2), mqtt=mqtt, book=book)
    replies = []
    deny = {"deny": [multi.labels[0]]}
    for name in ("ghost1", "ghost2", "ghost3"):
        worker._handle(("settings", name, deny, replies.append))
    assert list(book.changes) == ["ghost2", "ghost3"] and all("error" not in r for r in replies)
    worker._handle(("join", "cam", 16000, replies.append))
    worker._handle(("settings", "cam", deny, replies.append))
    worker._handle(("settings", "ghost4", deny, replies.append))
    worker._handle(("settings", "ghost5", deny, replies.append))
    assert list(book.changes) == ["cam", "ghost4", "ghost5"]  # connected: not counted, not forgotten
    worker._leave("cam", "stream_end")
    assert list(book.changes) == ["ghost5", "cam"]  # left: kept for its return, as the most recent
    forgotten = [c.args[0] for c in mqtt.settings_forgotten.call_args_list]
    assert forgotten == ["ghost1", "ghost2", "ghost3", "ghost4"]  # their retained settings cleared on the broker
    assert book.settings("cam").as_dict()["deny"] == [multi.labels[0]]


def test_a_reset_steps_the_hops_a_stream_holds_before_it_forgets(cnn_dir):
    """Audio fed before a reset belongs to the past the reset forgets: its hops are stepped on that state first (a
    pulled camera's gap), then the reset's events close; none is left to be stepped on the fresh state."""
    clip = read_clip(EXAMPLES / "rain.flac")[:16000]
    tagger = MultiStreamTagger(cnn_dir, capacity=1, events=LOW)
    tagger.join("a")
    tagger.feed("a", clip)
    steps = tagger.reset("a", "gap")
    ref, _ = _alone(cnn_dir, "onnx", clip)
    np.testing.assert_allclose(np.stack([s.probs for s in steps if s.has_scores]), ref, atol=1e-5)
    assert tagger.step() == []


def test_a_stream_s_time_moves_on_over_a_gap_in_the_pool_and_on_a_ray_engine(cnn_dir):
    """serve: a pulled camera back after a gap; its next hops are stamped after the gap, in the pool and in the
    commands a Ray engine runs (the engine side, run here in this process)."""
    from streamtag.distributed import _EngineActor

    audio = read_clip(EXAMPLES / "dog.flac")[:16000]
    pool = MultiStreamTagger(cnn_dir, capacity=2)
    pool.join("cam")
    pool.feed("cam", audio)
    pool.step()
    pool.skip("cam", 2.0)
    pool.feed("cam", audio)
    assert [s.frame_index for _, s in pool.step()][0] == 300
    engine = _EngineActor(cnn_dir, capacity=2)
    blocks, _, _ = engine.run([("join", "cam", 16000, None, None), ("audio", "cam", audio), ("skip", "cam", 2.0)])
    blocks, _, _ = engine.run([("audio", "cam", audio)])
    assert blocks[0][1] == 300  # (name, first frame, probs, events)
