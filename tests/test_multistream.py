import numpy as np
import pytest

from streamtag.backends import make_backend
from streamtag.errors import ConfigError
from streamtag.multistream import MultiStreamTagger

from .conftest import EXAMPLES, read_clip


def _single(model_dir, backend, audio):
    b = make_backend(backend, model_dir)
    return np.stack([b(audio[i : i + 160]).copy()[0] for i in range(0, audio.size - 159, 160)])


@pytest.mark.parametrize("backend", ["onnx", "torch"])
def test_batched_streams_equal_separate_runs_with_joins_and_leaves(model_dir, backend):
    clips = [read_clip(EXAMPLES / n)[: 16000 * 2] for n in ("dog.flac", "rain.flac", "chainsaw.flac")]
    tagger = MultiStreamTagger(model_dir, backend, capacity=2)
    got: dict[str, list] = {"a": [], "b": [], "c": []}
    rng = np.random.default_rng(0)
    tagger.join("a")
    tagger.join("b")
    pos = {"a": 0, "b": 0, "c": 0}
    src = {"a": clips[0], "b": clips[1], "c": clips[2]}
    while any(pos[n] < src[n].size for n in tagger.streams):
        for name in list(tagger.streams):
            n = int(rng.integers(1, 700))  # ragged arrival, different per stream
            tagger.feed(name, src[name][pos[name] : pos[name] + n])
            pos[name] += n
        for name, _, probs in tagger.step():
            got[name].append(probs.copy())
        if "a" in tagger.streams and pos["a"] >= src["a"].size:
            tagger.leave("a")  # its slot is reused by "c", which must start from a clean state
            tagger.join("c")
    for name in ("a", "b", "c"):
        ref = _single(model_dir, backend, src[name])
        assert len(got[name]) == len(ref)
        np.testing.assert_allclose(np.stack(got[name]), ref, atol=1e-5, err_msg=f"stream {name}")


def test_capacity_and_names_are_checked(cnn_dir):
    tagger = MultiStreamTagger(cnn_dir, capacity=1)
    tagger.join("x")
    with pytest.raises(ConfigError, match="slots are in use"):
        tagger.join("y")
    with pytest.raises(ConfigError, match="already joined"):
        tagger.join("x")
    with pytest.raises(ConfigError, match="no stream named"):
        tagger.feed("y", np.zeros(10, np.float32))


@pytest.mark.parametrize("backend", ["onnx", "torch"])
def test_rounds_keep_their_rows_and_slots_step_in_any_subset(cnn_dir, backend):
    """Several hop rounds in one step() call keep their own rows; streams stepped in place and gathered agree."""
    clips = [read_clip(EXAMPLES / n)[:16000] for n in ("dog.flac", "rain.flac", "chainsaw.flac")]
    tagger = MultiStreamTagger(cnn_dir, backend, capacity=4)
    for name in "abc":
        tagger.join(name)
    got: dict[str, list] = {n: [] for n in "abc"}
    for start in range(0, 16000, 800):  # five hops per feed: five rounds per step() call
        for name, clip in zip("abc", clips):
            if name != "b" or start % 1600 == 0:  # "b" lags, so rounds alternate between slots 0..2 and {0, 2}
                tagger.feed(name, clip[start : start + (800 if name != "b" else 1600)])
        rows = list(tagger.step())  # collected without copying
        for name, _, probs in rows:
            got[name].append(probs)
    for name, clip in zip("abc", clips):
        ref = _single(cnn_dir, backend, clip)
        np.testing.assert_allclose(np.stack(got[name]), ref, atol=1e-5, err_msg=f"stream {name}")
