"""Parity: the exported graphs, run by the runtime's own adapter and engines, must give PyTorch's outputs.

Every graph is checked on every batch: the encoder's embeddings, and each graph the method declares
(``export_graphs``) on the inputs it makes from that batch, every output, run by the adapter's runner
for its role (``Adapter.graph``; a ``GraphEngine`` on the bundle's file when the mode runs no such
graph). For a FiLM bundle (``FilmAdapter``) the encoder is checked under the bundle's identity FiLM and
under a random non-identity one, and the context's FiLM vector as the method's declared graph.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch

from fewshot_edge.methods import FewShotMethod, FiLMProtoNet
from fewshot_edge.methods.base import ExportGraph
from fewshot_edge.methods.film import split_film
from fewshot_edge.runtime import Adapter
from fewshot_edge.runtime.adapters import FilmAdapter
from fewshot_edge.runtime.errors import FewShotInputError
from fewshot_edge.runtime.graph import GraphEngine
from fewshot_edge.runtime.preprocess import InputSpec, normalize

from .onnx import has_film

BATCH_SIZES = (1, 2, 7, 32)
RANDOM_FILM_STD = 0.1

OnnxRun = Callable[[np.ndarray], np.ndarray]
TorchRun = Callable[[torch.Tensor], torch.Tensor]


@dataclass
class ParityReport:
    """The largest absolute embedding difference per check ("random batch of N", "real images") and overall."""

    tolerance: float
    checks: dict[str, float] = field(default_factory=dict)

    @property
    def max_abs_diff(self) -> float:
        return max(self.checks.values(), default=0.0)

    @property
    def passed(self) -> bool:
        return bool(self.checks) and self.max_abs_diff <= self.tolerance

    def to_dict(self) -> dict[str, Any]:
        return {"max_abs_diff": self.max_abs_diff, "passed": self.passed, **asdict(self)}


class ParityError(RuntimeError):
    """The ONNX encoder's embeddings differ from PyTorch's by more than the tolerance."""

    def __init__(self, report: ParityReport) -> None:
        worst = max(report.checks, key=lambda name: report.checks[name], default="no checks")
        super().__init__(
            f"ONNX parity check failed: max |onnx - torch| = {report.max_abs_diff:.3g} on {worst}"
            f" exceeds the tolerance {report.tolerance:g}; no bundle written"
        )
        self.report = report


def check_parity(
    method: FewShotMethod,
    adapter: Adapter,
    spec: InputSpec,
    real_pixels: np.ndarray | None = None,
    tolerance: float = 1e-4,
    batch_sizes: Sequence[int] = BATCH_SIZES,
    seed: int = 0,
) -> ParityReport:
    """Compare outputs on random uint8 images of each batch size and on ``real_pixels`` (uint8 (N, C, H, W)).

    Both sides see the same ``normalize``d float32 batch: PyTorch in eval mode, ONNX through ``adapter``
    (the runtime's adapter of the bundle's mode, over its encoder engine, and its context engine for FiLM).
    """
    if tolerance < 0:
        raise FewShotInputError(f"tolerance must be non-negative, got {tolerance}")
    rng = np.random.default_rng(seed)
    shape = (spec.channels, spec.height, spec.width)
    batches = {f"random batch of {n}": rng.integers(0, 256, size=(n, *shape), dtype=np.uint8) for n in batch_sizes}
    if real_pixels is not None and len(real_pixels):
        batches[f"{len(real_pixels)} real images"] = real_pixels
    runs: dict[str, tuple[OnnxRun, TorchRun]] = {"": (adapter.embed, method.embed)}
    if isinstance(adapter, FilmAdapter) and has_film(method):
        runs = _film_runs(method, adapter, rng)
    graphs = {graph.role: (graph, _runner(adapter, graph)) for graph in method.export_graphs()}
    report = ParityReport(tolerance)
    for name, pixels in batches.items():
        x = normalize(pixels, spec)
        for prefix, (onnx_run, torch_run) in runs.items():
            diff = np.abs(onnx_run(x).astype(np.float64) - _torch_run(method, torch_run, x))
            report.checks[prefix + name] = float(diff.max())
        for role, (graph, run) in graphs.items():
            report.checks[f"{role} on {name}"] = _graph_diff(method, graph, run, x)
    return report


def _runner(adapter: Adapter, graph: ExportGraph) -> Callable[..., Any]:
    """What runs the bundle's graph ``graph.role`` on the device: the adapter's own runner, or a plain
    ``GraphEngine`` over the file when the adapter's mode does not run it."""
    run = adapter.graph(graph.role)
    if run is not None:
        return run
    engine = GraphEngine(adapter.bundle.file(graph.role), adapter.encoder.providers, adapter.encoder.threads)
    return engine.run


@torch.no_grad()
def _graph_diff(method: FewShotMethod, graph: ExportGraph, run: Callable[..., Any], batch: np.ndarray) -> float:
    """The largest |ONNX - PyTorch| over every output of ``graph`` on the inputs it makes from ``batch``."""
    was_training = method.training
    method.eval()
    try:
        inputs = graph.inputs(torch.from_numpy(batch).to(next(method.parameters()).device))
        expected = graph.forward(*inputs)
    finally:
        method.train(was_training)
    expected = expected if isinstance(expected, tuple) else (expected,)
    got = run(*(t.float().cpu().numpy() for t in inputs))
    got = got if isinstance(got, tuple) else (got,)
    if len(got) != len(expected):
        raise FewShotInputError(f"graph {graph.role!r} gives {len(got)} outputs, PyTorch {len(expected)}")
    diffs = []
    for g, e in zip(got, expected, strict=True):
        if np.shape(g) != tuple(e.shape):
            raise FewShotInputError(f"graph {graph.role!r} gives shape {np.shape(g)}, PyTorch {tuple(e.shape)}")
        diffs.append(float(np.abs(np.asarray(g, np.float64) - e.double().cpu().numpy()).max(initial=0.0)))
    return max(diffs)


def _film_runs(
    method: FiLMProtoNet, adapter: FilmAdapter, rng: np.random.Generator
) -> dict[str, tuple[OnnxRun, TorchRun]]:
    """Check-name prefix -> (ONNX, PyTorch) for the encoder under identity and random FiLM (the runtime
    side under the bundle's identity, PyTorch under the method's)."""
    identity = method.context.identity.detach().float().cpu().numpy()
    random = (identity + rng.normal(0.0, RANDOM_FILM_STD, identity.shape)).astype(np.float32)

    def under(runtime_film: np.ndarray | None, torch_film: np.ndarray) -> tuple[OnnxRun, TorchRun]:
        def torch_run(images: torch.Tensor) -> torch.Tensor:
            return method.embed(
                images, film=split_film(torch.from_numpy(torch_film).to(images.device), method.context.block_channels)
            )

        return lambda x: adapter.encoder.embed(x, runtime_film), torch_run

    return {
        "encoder under identity FiLM on ": under(adapter.identity, identity),
        "encoder under random FiLM on ": under(random, random),
    }


@torch.no_grad()
def _torch_run(method: FewShotMethod, run: TorchRun, batch: np.ndarray) -> np.ndarray:
    """``run`` (e.g. ``method.embed``) in eval mode on a float32 batch, as float64 numpy; restores the mode."""
    was_training = method.training
    method.eval()
    device = next(method.parameters()).device
    try:
        return run(torch.from_numpy(batch).to(device)).double().cpu().numpy()
    finally:
        method.train(was_training)
