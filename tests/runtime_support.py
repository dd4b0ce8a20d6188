"""Builders shared by the runtime tests (no tests here): tiny linear ONNX encoders, whose embeddings
are ``normalised pixels flattened @ weight`` and so can be computed by hand, and bundles around them."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from fewshot_edge.runtime import Adaptation, Calibration, EmbeddingSpec, InputSpec, OpenSet, write_bundle
from fewshot_edge.runtime.bundle import Bundle, manifest_sha256

SPEC = InputSpec(channels=1, height=4, width=4)
DIM = 3


def linear_encoder(weight: np.ndarray, input_shape: tuple = ("N", 1, 4, 4)) -> bytes:
    """ONNX bytes of Flatten (N, C, H, W) -> MatMul ``weight`` (C*H*W, D)."""
    x = helper.make_tensor_value_info("images", TensorProto.FLOAT, list(input_shape))
    y = helper.make_tensor_value_info("embeddings", TensorProto.FLOAT, [input_shape[0], weight.shape[1]])
    nodes = [
        helper.make_node("Flatten", ["images"], ["flat"], axis=1),
        helper.make_node("MatMul", ["flat", "W"], ["embeddings"]),
    ]
    return _model(nodes, "linear_encoder", [x], [y], {"W": weight.astype(np.float32)})


def _model(nodes: list, name: str, inputs: list, outputs: list, initializers: dict[str, np.ndarray]) -> bytes:
    graph = helper.make_graph(
        nodes,
        name,
        inputs,
        outputs,
        initializer=[numpy_helper.from_array(np.asarray(v), k) for k, v in initializers.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model.SerializeToString()


def film_encoder(weight: np.ndarray) -> bytes:
    """ONNX bytes of a FiLM encoder: ``(flatten(images) @ weight) * film[:D] + film[D:]``, film (2D,)."""
    d = weight.shape[1]
    x = helper.make_tensor_value_info("images", TensorProto.FLOAT, ["N", 1, 4, 4])
    f = helper.make_tensor_value_info("film", TensorProto.FLOAT, [2 * d])
    y = helper.make_tensor_value_info("embeddings", TensorProto.FLOAT, ["N", d])
    nodes = [
        helper.make_node("Flatten", ["images"], ["flat"], axis=1),
        helper.make_node("MatMul", ["flat", "W"], ["z"]),
        helper.make_node("Slice", ["film", "zero", "d"], ["gamma"]),
        helper.make_node("Slice", ["film", "d", "two_d"], ["beta"]),
        helper.make_node("Mul", ["z", "gamma"], ["scaled"]),
        helper.make_node("Add", ["scaled", "beta"], ["embeddings"]),
    ]
    ints = {name: np.array([v], dtype=np.int64) for name, v in (("zero", 0), ("d", d), ("two_d", 2 * d))}
    return _model(nodes, "film_encoder", [x, f], [y], {"W": weight.astype(np.float32), **ints})


def context_graph(a: np.ndarray, b: np.ndarray) -> bytes:
    """ONNX bytes of a context graph: m = mean over images of flatten(images); film = [1 + m @ a, m @ b]."""
    x = helper.make_tensor_value_info("images", TensorProto.FLOAT, ["S", 1, 4, 4])
    y = helper.make_tensor_value_info("film", TensorProto.FLOAT, [a.shape[1] + b.shape[1]])
    nodes = [
        helper.make_node("Flatten", ["images"], ["flat"], axis=1),
        helper.make_node("ReduceMean", ["flat"], ["mean"], axes=[0], keepdims=0),
        helper.make_node("MatMul", ["mean", "A"], ["ma"]),
        helper.make_node("Add", ["ma", "one"], ["gamma"]),
        helper.make_node("MatMul", ["mean", "B"], ["beta"]),
        helper.make_node("Concat", ["gamma", "beta"], ["film"], axis=0),
    ]
    return _model(
        nodes,
        "context",
        [x],
        [y],
        {"A": a.astype(np.float32), "B": b.astype(np.float32), "one": np.array(1.0, np.float32)},
    )


def make_film_bundle(
    path: Path, w: np.ndarray, a: np.ndarray, b: np.ndarray, scale: float = 1.0, temperature: float = 1.0
) -> Bundle:
    """A bundle with ``film_encoder(w)``, ``context_graph(a, b)`` and the "film" mode as default."""
    identity = [1.0] * w.shape[1] + [0.0] * w.shape[1]
    modes = {
        "film": {"film_size": 2 * w.shape[1], "context_input": "images", "film_input": "film", "identity": identity},
        "prototype": {},
    }
    return write_bundle(
        path,
        {"encoder.onnx": film_encoder(w), "context.onnx": context_graph(a, b)},
        input_spec=SPEC,
        embedding=EmbeddingSpec(w.shape[1], "sqeuclidean", scale),
        adaptation=Adaptation("film", modes),
        calibration=Calibration(temperature, OpenSet()),
        provenance={"method": "test"},
    )


def film_by_hand(imgs: list[np.ndarray], a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """What ``context_graph(a, b)`` gives for uint8 (H, W) images under SPEC."""
    mean = (np.stack(imgs).astype(np.float64) / 255.0).reshape(len(imgs), -1).mean(0)
    return np.concatenate([1.0 + mean @ a, mean @ b])


def weight(seed: int = 0, spec: InputSpec = SPEC, dim: int = DIM) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(spec.channels * spec.height * spec.width, dim)).astype(np.float32)


def make_bundle(
    path: Path,
    w: np.ndarray,
    spec: InputSpec = SPEC,
    metric: str = "sqeuclidean",
    scale: float = 1.0,
    temperature: float = 1.0,
    threshold: float | None = None,
    thresholds_by_shots: dict[int, float] | None = None,
    adaptation: Adaptation | None = None,
    temperatures_by_shots: dict[int, float] | None = None,
) -> Bundle:
    open_set = OpenSet(threshold=threshold, fitted_on="test", thresholds_by_shots=thresholds_by_shots)
    return write_bundle(
        path,
        {"encoder.onnx": linear_encoder(w, ("N", spec.channels, spec.height, spec.width))},
        input_spec=spec,
        embedding=EmbeddingSpec(w.shape[1], metric, scale),
        adaptation=adaptation or Adaptation(),
        calibration=Calibration(temperature, open_set, temperatures_by_shots),
        provenance={"method": "test"},
    )


def images(seed: int, n: int, center: float = 128.0, spread: float = 20.0) -> list[np.ndarray]:
    """n uint8 (4, 4) images around a constant level."""
    rng = np.random.default_rng(seed)
    return [np.clip(rng.normal(center, spread, size=(4, 4)), 0, 255).astype(np.uint8) for _ in range(n)]


def embed_by_hand(imgs: list[np.ndarray], w: np.ndarray) -> np.ndarray:
    """What the linear encoder gives for uint8 (H, W) images under SPEC (mean 0, std 1)."""
    return (np.stack(imgs).astype(np.float64) / 255.0).reshape(len(imgs), -1) @ w.astype(np.float64)


BLOCK_TORCH = """
import importlib.abc
import sys


class BlockTorch(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "torch" or name.startswith("torch."):
            raise ImportError(f"{name} is blocked in this test")
        return None


sys.meta_path.insert(0, BlockTorch())
"""
"""Python source that makes torch unimportable; prefix it to code run by ``run_python``."""


def run_python(code: str, *args: str, timeout: float = 60) -> str:
    """Run ``code`` in a fresh interpreter; fail with its stderr if it fails; return its stdout."""
    done = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stderr
    return done.stdout


def write_manifest(folder: Path, manifest: dict) -> None:
    """Write an edited manifest dict as ``folder/manifest.json`` with its ``manifest_sha256`` recomputed (and
    any signature dropped), so a test's edit reaches the field checks instead of the integrity check."""
    manifest = {k: v for k, v in manifest.items() if k not in ("manifest_sha256", "signature")}
    (Path(folder) / "manifest.json").write_text(json.dumps({**manifest, "manifest_sha256": manifest_sha256(manifest)}))


def enroll_after_a_fit(model) -> tuple[list[np.ndarray], list[np.ndarray], list[np.ndarray], list[np.ndarray], int]:
    """Enroll "cat", predict once (the fit), then enroll "dog" and add shots to "cat"; returns the cat, dog
    and added images, the queries, and how many full fits ran (1 when the mode took the rest in by ``add``)."""
    cat, dog, more = images(1, 4, center=60), images(2, 3, center=190), images(3, 2, center=120)
    queries = images(4, 2, center=70) + images(5, 2, center=180)
    fits = []
    fit = model.adapter.fit
    model.adapter.fit = lambda *args: fits.append(1) or fit(*args)
    model.enroll("cat", cat)
    model.predict_proba(queries)
    model.enroll("dog", dog)
    model.add_shots("cat", more)
    return cat, dog, more, queries, len(fits)
