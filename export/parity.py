"""Parity: the exported encoder, run by the runtime's engine, must give PyTorch's embeddings."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Sequence

import numpy as np
import torch

from fewshot_edge.methods import FewShotMethod
from fewshot_edge.runtime import Engine
from fewshot_edge.runtime.preprocess import InputSpec, normalize

BATCH_SIZES = (1, 2, 7, 32)


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
        worst = max(report.checks, key=report.checks.get, default="no checks")
        super().__init__(f"ONNX parity check failed: max |onnx - torch| = {report.max_abs_diff:.3g} on {worst}"
                         f" exceeds the tolerance {report.tolerance:g}; no bundle written")
        self.report = report


def check_parity(method: FewShotMethod, engine: Engine, spec: InputSpec, real_pixels: np.ndarray | None = None,
                 tolerance: float = 1e-4, batch_sizes: Sequence[int] = BATCH_SIZES, seed: int = 0) -> ParityReport:
    """Compare embeddings on random uint8 images of each batch size and on ``real_pixels`` (uint8 (N, C, H, W)).

    Both sides see the same ``normalize``d float32 batch: PyTorch through ``method.embed`` in eval mode,
    ONNX through ``engine``, the runtime's onnxruntime session.
    """
    if tolerance < 0:
        raise ValueError(f"tolerance must be non-negative, got {tolerance}")
    rng = np.random.default_rng(seed)
    shape = (spec.channels, spec.height, spec.width)
    batches = {f"random batch of {n}": rng.integers(0, 256, size=(n, *shape), dtype=np.uint8) for n in batch_sizes}
    if real_pixels is not None and len(real_pixels):
        batches[f"{len(real_pixels)} real images"] = real_pixels
    report = ParityReport(tolerance)
    for name, pixels in batches.items():
        x = normalize(pixels, spec)
        diff = np.abs(engine.embed(x).astype(np.float64) - _torch_embed(method, x))
        report.checks[name] = float(diff.max())
    return report


@torch.no_grad()
def _torch_embed(method: FewShotMethod, batch: np.ndarray) -> np.ndarray:
    """``method.embed`` in eval mode on a float32 batch, as float64 numpy; restores the train/eval mode."""
    was_training = method.training
    method.eval()
    device = next(method.parameters()).device
    try:
        return method.embed(torch.from_numpy(batch).to(device)).double().cpu().numpy()
    finally:
        method.train(was_training)
