"""Export a method's graphs to ONNX: the encoder, float32 ``images`` (N, C, H, W) in, ``embeddings`` (N, D)
out, and each extra graph the method declares in ``export_graphs`` (``export_graph``).

A method declares an extra graph by returning an ``ExportGraph`` from ``FewShotMethod.export_graphs``:
its bundle role, a function of the method's modules, how to make its inputs from an image batch, its
input and output names and its dynamic axes. ``export_draft`` (bundle.py) writes every declared graph
as ``<role>.onnx`` with that role, and ``check_parity`` checks each one against PyTorch on random and
held-out inputs, run by the runtime adapter's own runner for the role (``Adapter.graph``). FiLM's
context (role "context": ``images`` (S, C, H, W) -> ``film`` (F,), every block's gamma then beta, see
``split_film``) is one such graph; a FiLM encoder takes that ``film`` (F,) as a second input.

The graph is traced with the TorchScript exporter (``dynamo=False``): it needs no onnxscript, keeps the
batch dimension symbolic through ``dynamic_axes`` and, with the model in eval mode, folds every
BatchNorm into the convolution before it, so the device runs plain Conv/Relu/MaxPool.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, TypeGuard, TypeVar

import onnx
import torch
from torch import nn

from fewshot_edge.methods import FewShotMethod, FiLMProtoNet
from fewshot_edge.methods.base import ExportGraph
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


class _Graph(nn.Module):
    """A declared graph's ``forward`` as a module's, over the method that owns its parameters."""

    def __init__(self, method: FewShotMethod, graph: ExportGraph) -> None:
        super().__init__()
        self.method = method
        self.graph = graph

    def forward(self, *inputs: torch.Tensor) -> Any:
        return self.graph.forward(*inputs)


def export_onnx(
    method: FewShotMethod, spec: InputSpec, path: str | Path, opset: int = OPSET, film: bool = False
) -> onnx.ModelProto:
    """Write ``method``'s encoder (a CPU float32 copy in eval mode) to ``path``; returns the checked model.

    With ``film`` (FiLM methods only) the encoder takes a second input, ``film`` (F,).
    Raises ValueError for an opset below 17; the written model passes ``onnx.checker`` (full check).
    """
    copied = _eval_copy(method)
    batch = {INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}}
    if not film:
        return _export(_Embedder(copied), (_images(spec),), path, opset, [INPUT_NAME], [OUTPUT_NAME], batch)
    if not has_film(copied):
        raise FewShotInputError(f"a {method.name} method has no FiLM input to export")
    example = (_images(spec), copied.context.identity.clone())
    return _export(_FilmEmbedder(copied), example, path, opset, [INPUT_NAME, FILM_NAME], [OUTPUT_NAME], batch)


def export_graph(
    method: FewShotMethod, role: str, spec: InputSpec, path: str | Path, opset: int = OPSET
) -> onnx.ModelProto:
    """Write the graph ``method`` declares with ``role`` (see ``export_graphs``), traced on a batch of two
    images' inputs, to ``path``; as ``export_onnx``."""
    copied = _eval_copy(method)
    graph = declared_graph(copied, role)
    with torch.no_grad():
        example = graph.inputs(_images(spec))
    return _export(
        _Graph(copied, graph), example, path, opset, graph.input_names, graph.output_names, graph.dynamic_axes
    )


def export_context_onnx(method: FiLMProtoNet, spec: InputSpec, path: str | Path, opset: int = OPSET) -> onnx.ModelProto:
    """Write a FiLM method's context, ``images`` (S, C, H, W) -> ``film`` (F,), to ``path``; as ``export_onnx``."""
    return export_graph(method, "context", spec, path, opset)


def declared_graph(method: FewShotMethod, role: str) -> ExportGraph:
    """The graph ``method`` declares with ``role``; a FewShotInputError when it declares none."""
    for graph in method.export_graphs():
        if graph.role == role:
            return graph
    raise FewShotInputError(f"a {method.name} method exports no graph with role {role!r}")


def graph_roles(method: FewShotMethod) -> list[str]:
    """The roles of the graphs ``method`` declares, checked: distinct, plain names, none is an encoder's."""
    roles = [graph.role for graph in method.export_graphs()]
    for role in roles:
        if not role.replace("_", "").replace("-", "").isalnum() or role.startswith("encoder") or roles.count(role) > 1:
            raise FewShotInputError(f"a {method.name} method declares an unusable or repeated graph role {role!r}")
    return roles


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
    output_names: Sequence[str],
    dynamic_axes: Mapping[str, Mapping[int, str]],
) -> onnx.ModelProto:
    """Trace ``module`` to ``path`` with these names and dynamic axes; check it."""
    if opset < OPSET:
        raise FewShotInputError(f"opset must be at least {OPSET}, got {opset}")
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore", DeprecationWarning)  # the TorchScript exporter announces its age
        # Branches on the image size (timm's position embeddings) are traced as constants: a bundle has one
        # size, and parity checks the graph at several batch sizes.
        warnings.simplefilter("ignore", torch.jit.TracerWarning)  # type: ignore[attr-defined]  # not in its __all__
        # An LSTM over a set (matching's full-context support) runs on one sequence, batch 1, of any length.
        warnings.filterwarnings("ignore", "Exporting a model to ONNX with a batch_size other than 1", UserWarning)
        torch.onnx.export(
            module,
            example,
            str(path),
            dynamo=False,
            opset_version=opset,
            input_names=list(input_names),
            output_names=list(output_names),
            dynamic_axes={name: dict(axes) for name, axes in dynamic_axes.items()},
        )
    model = onnx.load(str(path))
    onnx.checker.check_model(model, full_check=True)
    return model
