"""Each architecture: streaming == offline on real audio for any chunking; onnx == torch; reset; model files."""

import numpy as np
import pytest
import torch

from streamtag.backends import make_backend
from streamtag.config import FeatureConfig
from streamtag.features import log_mel_offline
from streamtag.modelfile import DEFAULT_MODEL_DIR, FINGERPRINT_KEY, fingerprint, load_config
from streamtag.models.io import load_model
from streamtag.models.step import probabilities

from .conftest import EXAMPLES, read_clip


def _feats(path) -> torch.Tensor:
    return log_mel_offline(torch.from_numpy(read_clip(path)), FeatureConfig())[None]


def _chunked(model, x, sizes):
    state, outs, i = model.init_state(1), [], 0
    while i < x.shape[1]:
        n = sizes[len(outs) % len(sizes)]
        logits, state = model(x[:, i : i + n], state)
        outs.append(logits)
        i += n
    return torch.cat(outs, dim=1)


@pytest.mark.parametrize("clip", ["dog.flac", "chainsaw.flac"])
def test_streaming_equals_offline_any_chunking(model_dir, clip):
    _, model = load_model(model_dir)
    x = _feats(EXAMPLES / clip)
    with torch.inference_mode():
        offline, _ = model(x, model.init_state(1))
        rng = np.random.default_rng(0)
        for sizes in ([1], [7, 1, 64, 3], list(rng.integers(1, 90, size=20))):
            streamed = _chunked(model, x, [int(s) for s in sizes])
            assert (streamed - offline).abs().max().item() < 1e-4


def test_streaming_equals_offline_on_esc50(model_dir, esc50):
    _, model = load_model(model_dir)
    for path in sorted((esc50 / "audio").iterdir())[:3]:
        x = _feats(path)
        with torch.inference_mode():
            offline, _ = model(x, model.init_state(1))
            assert (_chunked(model, x, [1]) - offline).abs().max().item() < 1e-4


def _run_backend(backend, audio: np.ndarray) -> np.ndarray:
    hop = backend.config.features.hop_length
    n = audio.shape[-1] // hop
    return np.stack([backend(audio[..., i * hop : (i + 1) * hop]).copy() for i in range(n)])


@pytest.mark.parametrize("batch", [1, 3])
def test_onnx_equals_torch(model_dir, batch):
    audio = read_clip(EXAMPLES / "dog.flac")
    streams = np.stack([np.roll(audio, 1000 * k) for k in range(batch)])
    ref = _run_backend(make_backend("torch", model_dir, batch_size=batch), streams)
    fast = _run_backend(make_backend("onnx", model_dir, batch_size=batch), streams)
    assert ref.shape == fast.shape == (audio.size // 160, batch, 5)
    np.testing.assert_allclose(fast, ref, atol=1e-4)
    if load_config(model_dir).multi_label:  # independent probabilities, each in [0, 1]
        assert fast.min() >= 0.0 and fast.max() <= 1.0
    else:  # one distribution over the classes
        np.testing.assert_allclose(fast.sum(-1), 1.0, atol=1e-5)
    if batch > 1:  # streams are independent: each row equals its own single-stream run
        single = _run_backend(make_backend("onnx", model_dir), streams[1])
        np.testing.assert_allclose(fast[:, 1], single[:, 0], atol=1e-5)


@pytest.mark.parametrize("batch", [1, 2])
def test_shipped_graph_equals_torch_on_the_default_model(batch):
    """The bundled model.onnx (2-D conv front end, rings) against eager torch on the same weights."""
    audio = read_clip(EXAMPLES / "chainsaw.flac")[: 16000 * 2]
    streams = np.stack([np.roll(audio, 777 * k) for k in range(batch)])
    ref = _run_backend(make_backend("torch", None, batch_size=batch), streams)
    onnx_backend = make_backend("onnx", None, batch_size=batch)
    shipped = onnx_backend.session.get_modelmeta().custom_metadata_map[FINGERPRINT_KEY]
    assert shipped == fingerprint(DEFAULT_MODEL_DIR), "model.onnx is stale: run 'streamtag export --onnx ...'"
    fast = _run_backend(onnx_backend, streams)
    np.testing.assert_allclose(fast, ref, atol=1e-4)
    chunk = make_backend("onnx", None, batch_size=batch)
    np.testing.assert_allclose(chunk.steps(streams.reshape(batch, -1, 160)), fast.transpose(1, 0, 2), atol=1e-5)
    assert chunk._chunk._model_path == str(DEFAULT_MODEL_DIR / "chunk.onnx"), "chunk.onnx is missing or stale"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (checked on an H200: max |dp| 1e-6)")
def test_torch_on_cuda_equals_onnx_on_cpu():
    audio = read_clip(EXAMPLES / "dog.flac")[: 16000 * 2]
    streams = np.stack([np.roll(audio, 1000 * k) for k in range(4)])
    gpu = _run_backend(make_backend("torch", None, batch_size=4, device="cuda"), streams)
    cpu = _run_backend(make_backend("onnx", None, batch_size=4), streams)
    np.testing.assert_allclose(gpu, cpu, atol=1e-4)


def test_cnn_graph_keeps_its_history_in_rings(cnn_dir):
    """The CNN's dilated-conv history streams through rings (no per-hop copy); rings wrap many times above."""
    backend = make_backend("onnx", cnn_dir)
    assert backend.rings is not None
    assert {"ring", "ring_taps"} <= {i.name for i in backend.session.get_inputs()}
    assert backend.rings.frames * 10 < read_clip(EXAMPLES / "dog.flac").size // 160


def test_torch_step_equals_offline_forward(model_dir):
    """The hop step (features inside) gives the offline model's probabilities frame by frame."""
    audio = read_clip(EXAMPLES / "rain.flac")
    cfg, model = load_model(model_dir)
    with torch.inference_mode():
        logits, _ = model(_feats(EXAMPLES / "rain.flac"), model.init_state(1))
    offline = probabilities(logits[0], cfg).numpy()
    stepped = _run_backend(make_backend("torch", model_dir), audio)[:, 0]
    np.testing.assert_allclose(stepped, offline, atol=1e-5)


@pytest.mark.parametrize("name", ["onnx", "torch"])
def test_reset_states_gives_a_fresh_stream(cnn_dir, name):
    backend = make_backend(name, cnn_dir)
    audio = read_clip(EXAMPLES / "chainsaw.flac")
    first = _run_backend(backend, audio[:16000])
    _run_backend(backend, audio)  # state now full of chainsaw
    backend.reset_states()
    again = _run_backend(backend, audio[:16000])
    np.testing.assert_allclose(again, first, atol=1e-6)
    assert not np.allclose(_run_backend(backend, audio[:1600]), first[:10], atol=1e-3)  # state does carry over


def test_chunk_invariance_through_the_worker(cnn_dir):
    """Blocks of different sizes from the source give the same scores (openWakeWord-style test), through
    the worker thread and through tag_file's plain loop alike."""
    from streamtag.pipeline import tag_file
    from streamtag.sources import WavReplaySource
    from streamtag.steps import Collector
    from streamtag.worker import Worker

    backend = make_backend("onnx", cnn_dir)
    runs = []
    for block in (160, 1037):
        sink = Collector()
        worker = Worker(WavReplaySource(EXAMPLES / "dog.flac", 16000, block_size=block, speed=0), backend, [sink])
        worker.reset()
        worker.start()
        worker.join()
        runs.append(sink.probs)
    assert runs[0].shape == (500, 5)
    np.testing.assert_allclose(runs[0], runs[1], atol=1e-5)  # hop graph and chunk graph: float rounding apart
    np.testing.assert_allclose(runs[0], tag_file(backend, EXAMPLES / "dog.flac").probs, atol=1e-5)


@pytest.mark.parametrize("kernel", [2, 3, 4])
def test_cnn_of_any_kernel_exports_and_replays_as_torch(tmp_path, kernel):
    """The ring-fed step reads ``kernel - 1`` past taps per layer; any kernel must export and match torch."""
    from streamtag.config import ModelConfig
    from streamtag.models import build_model
    from streamtag.models.io import save_model

    torch.manual_seed(kernel)
    params = {"hidden": 16, "dilations": [1, 2, 4], "kernel": kernel, "level_seconds": 1.0}
    cfg = ModelConfig(arch="cnn", labels=("a", "b", "c"), arch_params=params, output="sigmoid")
    model = build_model(cfg)
    with torch.no_grad():
        model.feat_mean.fill_(-8.0)
        model.feat_std.fill_(3.0)
    folder = save_model(model, cfg, tmp_path / f"k{kernel}")
    audio = read_clip(EXAMPLES / "dog.flac")[: 16000 * 2]
    onnx_backend = make_backend("onnx", folder)
    assert onnx_backend.rings.lags.shape == (3, kernel - 1)
    by_hop = _run_backend(onnx_backend, audio)
    np.testing.assert_allclose(by_hop, _run_backend(make_backend("torch", folder), audio), atol=1e-4)
    # the chunk graph reads and writes the same rings: 150 hops in one go, then hop by hop again
    chunked = make_backend("onnx", folder)
    first = chunked.steps(audio[None, : 150 * 160].reshape(1, 150, 160))[0]
    rest = _run_backend(chunked, audio[150 * 160 :])[:, 0]
    np.testing.assert_allclose(np.concatenate([first, rest]), by_hop[:, 0], atol=1e-5)


def test_cnn_kernel_below_two_is_refused():
    from streamtag.config import ModelConfig
    from streamtag.errors import ConfigError
    from streamtag.models import build_model

    with pytest.raises((ConfigError, ValueError), match="kernel"):
        build_model(ModelConfig(arch="cnn", labels=("a", "b"), arch_params={"kernel": 1}))


def test_one_backend_primitive_and_the_adapter_over_it(cnn_dir):
    """backend(audio) is step() on the backend's own lockstep state; a pool's subsets agree with it; torch keeps
    pool state as tensors on its device (no trip through host memory between calls)."""
    audio = read_clip(EXAMPLES / "rain.flac")[:8000]
    for name in ("onnx", "torch"):
        backend = make_backend(name, cnn_dir)
        adapter = _run_backend(backend, audio)[:, 0]
        pool = backend.new_state(3)
        rows = []
        for i in range(0, audio.size - 159, 160):
            rows.append(backend.step(pool, np.array([2]), audio[None, i : i + 160])[0].copy())
        np.testing.assert_allclose(np.stack(rows), adapter, atol=1e-5, err_msg=name)
        backend.clear(pool, [2])
        again = backend.step(pool, np.array([2]), audio[None, :160])[0]
        np.testing.assert_allclose(again, adapter[0], atol=1e-6, err_msg=name)
        if name == "torch":
            assert all(isinstance(t, torch.Tensor) and t.device == backend.device for t in pool.tensors)


@pytest.mark.parametrize("name", ["onnx", "torch"])
def test_a_backlog_in_one_call_equals_hop_by_hop(model_dir, name):
    """step_hops (the chunk graph on onnx) gives what single hops give, for blocks of any size mixed with single
    hops in any order, since both go on from the same state; the onnx chunk graph runs once per 128 hops."""
    audio = read_clip(EXAMPLES / "dog.flac")
    streams = np.stack([audio, np.roll(audio, 3000)])
    hops = streams[:, : audio.size // 160 * 160].reshape(2, -1, 160)
    ref = _run_backend(make_backend(name, model_dir, batch_size=2), streams).transpose(1, 0, 2)  # (2, n, classes)
    backend = make_backend(name, model_dir, batch_size=2)
    blocks, calls = [], []
    sizes = iter([1, 7, 1, 1, 300, 2, 40, 129, 1] * 10)
    i = 0
    while i < hops.shape[1]:
        k = min(next(sizes), hops.shape[1] - i)
        blocks.append(backend.steps(hops[:, i : i + k]).copy())
        if i == 1 and name == "onnx":  # the 7-hop block opened the chunk graph: count its calls from here
            backend._chunk.run = lambda *a, run=backend._chunk.run, **kw: calls.append(1) or run(*a, **kw)
        i += k
    got = np.concatenate(blocks, axis=1)
    assert got.shape == ref.shape == (2, 500, 5)
    np.testing.assert_allclose(got, ref, atol=1e-5)
    if name == "onnx":
        assert 0 < len(calls) < 10  # 300 hops in three calls, 129 in two, 40 and 7 in one each


def test_a_backlog_without_a_chunk_graph_steps_hop_by_hop(cnn_dir, monkeypatch):
    """No chunk graph to be had (no torch to export one, or an onnxruntime that cannot load it): a warning,
    and the same probabilities hop by hop; the run never fails for it."""
    from streamtag.backends import onnx_backend
    from streamtag.errors import BackendUnavailable

    audio = read_clip(EXAMPLES / "dog.flac")[:16000]
    ref = _run_backend(make_backend("onnx", cnn_dir), audio)[:, 0]
    backend = make_backend("onnx", cnn_dir)

    def no_chunk(folder, threads=1, chunk=False):
        raise BackendUnavailable("exporting one needs torch")

    monkeypatch.setattr(onnx_backend, "open_session", no_chunk)
    with pytest.warns(RuntimeWarning, match="hop by hop"):
        got = backend.steps(audio.reshape(1, -1, 160))[0]
    np.testing.assert_allclose(got, ref, atol=1e-6)


def test_a_closed_pool_gate_keeps_the_head_fresh_and_an_open_one_is_the_plain_head():
    """The gated head's means take in what the gate lets through: nothing (a stream after quiet looks fresh)
    or everything (the head without a gate), step by step and offline alike."""
    from streamtag.models.base import PooledHead

    torch.manual_seed(0)
    hidden = torch.randn(2, 150, 8)
    plain = PooledHead(8, 3, (0.5, 3.0))
    gated = PooledHead(8, 3, (0.5, 3.0), gate=True)
    gated.proj.load_state_dict(plain.proj.state_dict())
    fresh = plain.init_state(2, "cpu")
    with torch.no_grad():
        gated.gate.bias.fill_(-40.0)  # closed
        _, (closed,) = gated(hidden, fresh)
        assert closed.abs().max() < 1e-12
        gated.gate.bias.fill_(40.0)  # open
        ref_logits, (ref,) = plain(hidden, fresh)
        logits, (means,) = gated(hidden, fresh)
        torch.testing.assert_close(means, ref, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(logits, ref_logits, rtol=1e-5, atol=1e-6)
        state = (ref.clone(),)
        for t in range(5):  # the step form lets the same through
            _, state = gated.step(hidden[:, t], state)
        _, (ref_step,) = plain(hidden[:, :5], (ref.clone(),))
        torch.testing.assert_close(state[0], ref_step, rtol=1e-5, atol=1e-6)
