"""Export a method's embedding encoder to ONNX: float32 ``images`` (N, C, H, W) in, ``embeddings`` (N, D) out.

The graph is traced with the TorchScript exporter (``dynamo=False``): it needs no onnxscript, keeps the
batch dimension symbolic through ``dynamic_axes`` and, with the model in eval mode, folds every
BatchNorm into the convolution before it, so the device runs plain Conv/Relu/MaxPool.
"""

from __future__ import annotations

import copy
import warnings
from pathlib import Path

import onnx
import torch
from torch import nn

from fewshot_edge.methods import FewShotMethod
from fewshot_edge.runtime.preprocess import InputSpec

OPSET = 17
INPUT_NAME = "images"
OUTPUT_NAME = "embeddings"


class _Embedder(nn.Module):
    """The method's ``embed`` as a module's forward, so the export is exactly what training scores."""

    def __init__(self, method: FewShotMethod) -> None:
        super().__init__()
        self.method = method

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.method.embed(images)


def export_onnx(method: FewShotMethod, spec: InputSpec, path: str | Path, opset: int = OPSET) -> onnx.ModelProto:
    """Write ``method``'s encoder (a CPU float32 copy in eval mode) to ``path``; returns the checked model.

    Raises ValueError for an opset below 17; the written model passes ``onnx.checker`` (full check).
    """
    if opset < OPSET:
        raise ValueError(f"opset must be at least {OPSET}, got {opset}")
    encoder = _Embedder(copy.deepcopy(method).float().cpu().eval())
    example = torch.zeros(2, spec.channels, spec.height, spec.width)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore", DeprecationWarning)  # the TorchScript exporter announces its age
        torch.onnx.export(
            encoder, (example,), str(path), dynamo=False, opset_version=opset,
            input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
            dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
        )
    model = onnx.load(str(path))
    onnx.checker.check_model(model, full_check=True)
    return model
