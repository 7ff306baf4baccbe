"""docs/ONNX.md's example drives the bundled model.onnx with onnxruntime alone and gets the backend's scores."""

import numpy as np

from streamtag.backends import make_backend
from streamtag.modelfile import DEFAULT_MODEL_DIR
from streamtag.training.evaluate import stream_probs

from .conftest import EXAMPLES, REPO, read_clip


def test_the_documented_loop_equals_the_backend():
    text = (REPO / "docs" / "ONNX.md").read_text()
    code = text.split("```python\n", 1)[1].split("\nsamples, rate =", 1)[0]
    namespace: dict = {}
    exec(compile(code, "docs/ONNX.md", "exec"), namespace)
    audio = read_clip(EXAMPLES / "dog.flac")[: 16000 * 2]
    documented = namespace["tag"](str(DEFAULT_MODEL_DIR / "model.onnx"), audio)
    ours = stream_probs(make_backend("onnx"), audio)
    assert documented.shape == ours.shape == (200, len(make_backend("onnx").labels))
    np.testing.assert_allclose(documented, ours, atol=1e-6)


def test_the_documented_chunk_loop_equals_the_hop_loop():
    """The second example runs chunk.onnx with plain state (no ring) and gets the hop step's scores."""
    text = (REPO / "docs" / "ONNX.md").read_text()
    first, second = text.split("```python\n")[1:3]
    namespace: dict = {}
    exec(compile(first.split("\nsamples, rate =", 1)[0], "docs/ONNX.md", "exec"), namespace)
    exec(compile(second.split("```", 1)[0], "docs/ONNX.md", "exec"), namespace)
    audio = read_clip(EXAMPLES / "chainsaw.flac")[: 16000 * 3 + 77]  # 300 hops: two full calls and a short one
    chunked = namespace["tag_chunks"](str(DEFAULT_MODEL_DIR / "chunk.onnx"), audio)
    by_hop = namespace["tag"](str(DEFAULT_MODEL_DIR / "model.onnx"), audio)
    assert chunked.shape == by_hop.shape == (300, len(make_backend("onnx").labels))
    np.testing.assert_allclose(chunked, by_hop, atol=1e-5)
