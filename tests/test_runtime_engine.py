"""The onnxruntime engine: providers, threads, chunked and fixed-batch embedding, clear errors."""

from __future__ import annotations

import numpy as np
import pytest
from runtime_support import linear_encoder, weight

from fewshot_edge.runtime import Engine, FewShotInputError


@pytest.fixture
def encoder_path(tmp_path):
    path = tmp_path / "encoder.onnx"
    path.write_bytes(linear_encoder(weight()))
    return path


def batch(n: int) -> np.ndarray:
    return np.random.default_rng(n).random((n, 1, 4, 4), dtype=np.float32)


def test_embeds_like_numpy_in_chunks(encoder_path):
    x = batch(10)
    expected = x.reshape(10, -1) @ weight()
    engine = Engine(encoder_path, threads=1, max_batch=4)
    assert engine.providers == ["CPUExecutionProvider"] and engine.input_shape == (None, 1, 4, 4)
    np.testing.assert_allclose(engine.embed(x), expected, rtol=1e-5)
    np.testing.assert_allclose(engine.embed(x[:3]), expected[:3], rtol=1e-5)


def test_fixed_batch_graph_is_run_in_padded_chunks(tmp_path):
    path = tmp_path / "fixed.onnx"
    path.write_bytes(linear_encoder(weight(), input_shape=(2, 1, 4, 4)))
    x = batch(5)
    engine = Engine(path)
    assert engine.max_batch == 2
    np.testing.assert_allclose(engine.embed(x), x.reshape(5, -1) @ weight(), rtol=1e-5)


def test_unavailable_provider_is_an_error(encoder_path):
    with pytest.raises(FewShotInputError, match="not available: NoSuchExecutionProvider .*CPUExecutionProvider"):
        Engine(encoder_path, providers=["NoSuchExecutionProvider", "CPUExecutionProvider"])


def test_bad_model_threads_and_inputs_are_errors(tmp_path, encoder_path):
    (tmp_path / "bad.onnx").write_bytes(b"not onnx")
    with pytest.raises(FewShotInputError, match="cannot load encoder") as info:
        Engine(tmp_path / "bad.onnx")
    assert "\n" not in str(info.value)
    with pytest.raises(FewShotInputError, match="threads"):
        Engine(encoder_path, threads=0)
    with pytest.raises(FewShotInputError, match="encoder input rejected"):
        Engine(encoder_path).embed(np.zeros((1, 1, 5, 5), np.float32))
