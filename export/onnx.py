"""Export a method's embedding encoder to ONNX: float32 ``images`` (N, C, H, W) in, ``embeddings`` (N, D) out.

A FiLM method (one with a ``context``) exports two graphs: the context, ``images`` (S, C, H, W) ->
``film`` (F,) (every block's gamma then beta, see ``split_film``), and the encoder, which takes that
``film`` (F,) as a second input beside ``images``.

The graph is traced with the TorchScript exporter (``dynamo=False``): it needs no onnxscript, keeps the
batch dimension symbolic through ``dynamic_axes`` and, with the model in eval mode, folds every
BatchNorm into the convolution before it, so the device runs plain Conv/Relu/MaxPool.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import TypeGuard, TypeVar

import onnx
import torch
from torch import nn

from fewshot_edge.methods import FewShotMethod, FiLMProtoNet
from fewshot_edge.methods.film import split_film
from fewshot_edge.runtime.errors import FewShotInputError
from fewshot_edge.runtime.preprocess import InputSpec

OPSET = 17
INPUT_NAME = "images"
OUTPUT_NAME = "embeddings"
FILM_NAME = "film"  # the context's output and the FiLM encoder's second input
M = TypeVar("M", bound=FewShotMethod)


def has_film(method: FewShotMethod) -> TypeGuard[FiLMProtoNet]:
    """Whether the method conditions its encoder on a support-set context (FiLM)."""
    return isinstance(method, FiLMProtoNet)


class _Embedder(nn.Module):
    """The method's ``embed`` as a module's forward, so the export is exactly what training scores."""

    def __init__(self, method: FewShotMethod) -> None:
        super().__init__()
        self.method = method

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.method.embed(images)


class _FilmEmbedder(nn.Module):
    """A FiLM method's ``embed`` under a flat FiLM (F,) given as a second input."""

    def __init__(self, method: FiLMProtoNet) -> None:
        super().__init__()
        self.method = method

    def forward(self, images: torch.Tensor, film: torch.Tensor) -> torch.Tensor:
        return self.method.embed(images, film=split_film(film, self.method.context.block_channels))


class _Context(nn.Module):
    """The method's ``context.flat``: support images (S, C, H, W) -> flat FiLM (F,)."""

    def __init__(self, method: FiLMProtoNet) -> None:
        super().__init__()
        self.context = method.context

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.context.flat(images)


def export_onnx(
    method: FewShotMethod, spec: InputSpec, path: str | Path, opset: int = OPSET, film: bool = False
) -> onnx.ModelProto:
    """Write ``method``'s encoder (a CPU float32 copy in eval mode) to ``path``; returns the checked model.

    With ``film`` (FiLM methods only) the encoder takes a second input, ``film`` (F,).
    Raises ValueError for an opset below 17; the written model passes ``onnx.checker`` (full check).
    """
    copied = _eval_copy(method)
    if not film:
        return _export(_Embedder(copied), (_images(spec),), path, opset, [INPUT_NAME], OUTPUT_NAME)
    if not has_film(copied):
        raise FewShotInputError(f"a {method.name} method has no FiLM input to export")
    example = (_images(spec), copied.context.identity.clone())
    return _export(_FilmEmbedder(copied), example, path, opset, [INPUT_NAME, FILM_NAME], OUTPUT_NAME)


def export_context_onnx(method: FiLMProtoNet, spec: InputSpec, path: str | Path, opset: int = OPSET) -> onnx.ModelProto:
    """Write a FiLM method's context, ``images`` (S, C, H, W) -> ``film`` (F,), to ``path``; as ``export_onnx``."""
    return _export(_Context(_eval_copy(method)), (_images(spec),), path, opset, [INPUT_NAME], FILM_NAME)


def _eval_copy(method: M) -> M:
    return copy.deepcopy(method).float().cpu().eval()


def _images(spec: InputSpec) -> torch.Tensor:
    return torch.zeros(2, spec.channels, spec.height, spec.width)


def _export(
    module: nn.Module,
    example: tuple[torch.Tensor, ...],
    path: str | Path,
    opset: int,
    input_names: Sequence[str],
    output_name: str,
) -> onnx.ModelProto:
    """Trace ``module`` to ``path`` with a dynamic first axis on ``images`` (and on a batched output); check it."""
    if opset < OPSET:
        raise FewShotInputError(f"opset must be at least {OPSET}, got {opset}")
    dynamic = {INPUT_NAME: {0: "batch"}, **({OUTPUT_NAME: {0: "batch"}} if output_name == OUTPUT_NAME else {})}
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore", DeprecationWarning)  # the TorchScript exporter announces its age
        # Branches on the image size (timm's position embeddings) are traced as constants: a bundle has one
        # size, and parity checks the graph at several batch sizes.
        warnings.simplefilter("ignore", torch.jit.TracerWarning)  # type: ignore[attr-defined]  # not in its __all__
        torch.onnx.export(
            module,
            example,
            str(path),
            dynamo=False,
            opset_version=opset,
            input_names=list(input_names),
            output_names=[output_name],
            dynamic_axes=dynamic,
        )
    model = onnx.load(str(path))
    onnx.checker.check_model(model, full_check=True)
    return model
