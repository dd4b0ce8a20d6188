"""The interface every meta-learning method shares."""

from __future__ import annotations

import inspect
from dataclasses import dataclass
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


class FewShotMethod(nn.Module):
    """A meta-learner over a backbone: logits for an episode's queries, a training loss, export info.

    Subclasses set ``name``, document each constructor keyword option in ``option_help`` (its
    default is the constructor's) and implement ``logits``; ``options`` holds the constructor keyword
    arguments so a checkpoint can rebuild the method. ``register_method`` makes a method known to
    ``create_method`` and the CLI (``train --method NAME``, ``-O KEY=VALUE``).
    """

    name: ClassVar[str]
    option_help: ClassVar[dict[str, str]] = {}

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


METHODS: dict[str, type[FewShotMethod]] = {}
M = TypeVar("M", bound=type[FewShotMethod])


def register_method(cls: M) -> M:
    """Class decorator: make a method available by its ``name``."""
    METHODS[cls.name] = cls
    return cls
