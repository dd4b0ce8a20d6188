"""The interface every meta-learning method shares."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, TypeVar

import torch
from torch import nn
from torch.nn import functional as F

from fewshot_edge.episodes import Episode
from fewshot_edge.models import Backbone


def query_loss(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Cross-entropy of query logits and their accuracy (a 0-d tensor, not synced)."""
    loss = F.cross_entropy(logits.float(), labels)
    acc = (logits.argmax(-1) == labels).float().mean()
    return loss, acc


@dataclass(frozen=True)
class MethodOption:
    """One keyword option of a method's constructor: its name, default and help text."""

    name: str
    default: Any
    help: str


@dataclass(frozen=True)
class ExportGraph:
    """One ONNX graph that a method's device mode runs besides the encoder, declared by ``export_graphs``.

    Export writes it as ``<role>.onnx`` with that role in the bundle (the runtime finds it with
    ``bundle.file(role)``) and checks it against PyTorch like the encoder. ``forward`` (a function of
    the method's modules) takes the graph's inputs, named ``input_names`` in order, and returns one
    tensor per ``output_names`` (a tuple when there are several). ``inputs`` makes those inputs from a
    normalised float32 image batch (N, C, H, W), N >= 1, on the method's device: export traces the graph
    on a batch of 2, and parity runs it on random batches of several sizes and on held-out images.
    ``dynamic_axes`` are ``torch.onnx.export``'s: the axes that vary on the device (shots, classes, queries).
    """

    role: str
    forward: Callable[..., Any]
    inputs: Callable[[torch.Tensor], tuple[torch.Tensor, ...]]
    input_names: tuple[str, ...]
    output_names: tuple[str, ...]
    dynamic_axes: Mapping[str, Mapping[int, str]] = field(default_factory=dict)


class FewShotMethod(nn.Module):
    """A meta-learner over a backbone: logits for an episode's queries, a training loss, export info.

    Subclasses set ``name``, document each constructor keyword option in ``option_help`` (its
    default is the constructor's) and implement ``logits``; ``options`` holds the constructor keyword
    arguments so a checkpoint can rebuild the method. ``register_method`` makes a method known to
    ``create_method`` and the CLI (``train --method NAME``, ``-O KEY=VALUE``).
    """

    name: ClassVar[str]
    option_help: ClassVar[dict[str, str]] = {}
    #: the method's per-image encoder (``embed``, or the method that ``logits`` calls on the images) when
    #: its output depends on the image alone, never on the episode: evaluation then encodes each image of
    #: the data set once instead of once per episode. None (the default) where the episode changes it
    #: (FiLM's conditioning, MAML's adapted backbone).
    image_encoder: ClassVar[str | None] = None

    def __init__(self, backbone: Backbone, **options: Any) -> None:
        super().__init__()
        self.backbone = backbone
        self.options = options

    @classmethod
    def declared_options(cls) -> list[MethodOption]:
        """The constructor's keyword options after ``backbone``, with their defaults and help."""
        parameters = list(inspect.signature(cls).parameters.values())[1:]
        return [
            MethodOption(p.name, p.default, cls.option_help.get(p.name, ""))
            for p in parameters
            if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)
        ]

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        return self.backbone(images)

    def logits(
        self, support: torch.Tensor, support_labels: torch.Tensor, query: torch.Tensor, n_way: int
    ) -> torch.Tensor:
        raise NotImplementedError

    def loss(self, episode: Episode) -> tuple[torch.Tensor, torch.Tensor]:
        """Cross-entropy on the queries and the episode accuracy (a 0-d tensor, not synced)."""
        logits = self.logits(episode.support, episode.support_labels, episode.query, episode.n_way)
        return query_loss(logits, episode.query_labels)

    def export_info(self) -> dict[str, Any]:
        """What the bundle's manifest records about this method (embedding metric, adaptation modes)."""
        raise NotImplementedError

    def export_graphs(self) -> list[ExportGraph]:
        """The graphs its device modes run besides the encoder (``encoder.onnx``, always exported): none
        by default. A method whose mode needs more (FiLM's context, a relation module) returns one
        ``ExportGraph`` per graph; export writes, checks and ships each, and the mode's adapter opens
        it by role."""
        return []


METHODS: dict[str, type[FewShotMethod]] = {}
M = TypeVar("M", bound=type[FewShotMethod])


def register_method(cls: M) -> M:
    """Class decorator: make a method available by its ``name``."""
    METHODS[cls.name] = cls
    return cls
