"""The interface every meta-learning method shares."""

from __future__ import annotations

from typing import Any, ClassVar

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


class FewShotMethod(nn.Module):
    """A meta-learner over a backbone: logits for an episode's queries, a training loss, export info.

    Subclasses set ``name`` and implement ``logits``; ``options`` holds the constructor keyword
    arguments so a checkpoint can rebuild the method.
    """

    name: ClassVar[str]

    def __init__(self, backbone: Backbone, **options: Any) -> None:
        super().__init__()
        self.backbone = backbone
        self.options = options

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        return self.backbone(images)

    def logits(self, support: torch.Tensor, support_labels: torch.Tensor, query: torch.Tensor,
               n_way: int) -> torch.Tensor:
        raise NotImplementedError

    def loss(self, episode: Episode) -> tuple[torch.Tensor, torch.Tensor]:
        """Cross-entropy on the queries and the episode accuracy (a 0-d tensor, not synced)."""
        logits = self.logits(episode.support, episode.support_labels, episode.query, episode.n_way)
        return query_loss(logits, episode.query_labels)

    def export_info(self) -> dict[str, Any]:
        """What the bundle's manifest records about this method (embedding metric, adaptation modes)."""
        raise NotImplementedError
