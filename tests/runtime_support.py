"""Builders shared by the runtime tests (no tests here): tiny linear ONNX encoders, whose embeddings
are ``normalised pixels flattened @ weight`` and so can be computed by hand, and bundles around them."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from fewshot_edge.runtime import Calibration, EmbeddingSpec, InputSpec, OpenSet, write_bundle
from fewshot_edge.runtime.bundle import Bundle

SPEC = InputSpec(channels=1, height=4, width=4)
DIM = 3


def linear_encoder(weight: np.ndarray, input_shape: tuple = ("N", 1, 4, 4)) -> bytes:
    """ONNX bytes of Flatten (N, C, H, W) -> MatMul ``weight`` (C*H*W, D)."""
    x = helper.make_tensor_value_info("images", TensorProto.FLOAT, list(input_shape))
    y = helper.make_tensor_value_info("embeddings", TensorProto.FLOAT, [input_shape[0], weight.shape[1]])
    graph = helper.make_graph(
        [helper.make_node("Flatten", ["images"], ["flat"], axis=1), helper.make_node("MatMul", ["flat", "W"], ["embeddings"])],
        "linear_encoder", [x], [y], initializer=[numpy_helper.from_array(weight.astype(np.float32), "W")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model.SerializeToString()


def weight(seed: int = 0, spec: InputSpec = SPEC, dim: int = DIM) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(spec.channels * spec.height * spec.width, dim)).astype(np.float32)


def make_bundle(
    path: Path, w: np.ndarray, spec: InputSpec = SPEC, metric: str = "sqeuclidean", scale: float = 1.0,
    temperature: float = 1.0, threshold: float | None = None, thresholds_by_shots: dict[int, float] | None = None,
) -> Bundle:
    open_set = OpenSet(threshold=threshold, fitted_on="test", thresholds_by_shots=thresholds_by_shots)
    return write_bundle(
        path, {"encoder.onnx": linear_encoder(w, ("N", spec.channels, spec.height, spec.width))},
        input_spec=spec, embedding=EmbeddingSpec(w.shape[1], metric, scale),
        calibration=Calibration(temperature, open_set),
        provenance={"method": "test"},
    )


def images(seed: int, n: int, center: float = 128.0, spread: float = 20.0) -> list[np.ndarray]:
    """n uint8 (4, 4) images around a constant level."""
    rng = np.random.default_rng(seed)
    return [np.clip(rng.normal(center, spread, size=(4, 4)), 0, 255).astype(np.uint8) for _ in range(n)]


def embed_by_hand(imgs: list[np.ndarray], w: np.ndarray) -> np.ndarray:
    """What the linear encoder gives for uint8 (H, W) images under SPEC (mean 0, std 1)."""
    return (np.stack(imgs).astype(np.float64) / 255.0).reshape(len(imgs), -1) @ w.astype(np.float64)


BLOCK_TORCH = '''
import importlib.abc
import sys


class BlockTorch(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "torch" or name.startswith("torch."):
            raise ImportError(f"{name} is blocked in this test")
        return None


sys.meta_path.insert(0, BlockTorch())
'''
"""Python source that makes torch unimportable; prefix it to code run by ``run_python``."""


def run_python(code: str, *args: str, timeout: float = 60) -> str:
    """Run ``code`` in a fresh interpreter; fail with its stderr if it fails; return its stdout."""
    done = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stderr
    return done.stdout
