"""FiLM-conditioned Prototypical Networks (TADAM / CNAPs style): the support set modulates the backbone.

A context encoder reads every support image, averages over the set (order-free, any N and K) and
predicts one (gamma, beta) per backbone block; support and queries are embedded under that FiLM,
then classified by prototypes. The predictors start at zero, so an untrained FiLM is the identity
and the method starts as a ProtoNet.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from fewshot_edge.episodes import Episode
from fewshot_edge.models import Backbone, BlockBackbone
from fewshot_edge.models.backbones import ConvBlock, FiLM
from fewshot_edge.runtime.errors import FewShotInputError

from .base import ExportGraph, query_loss, register_method
from .protonet import ProtoNet


def split_film(flat: torch.Tensor, block_channels: Sequence[int]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per-block (gamma, beta) from the flat layout: for each block, gamma (C) then beta (C)."""
    return [
        (chunk[:c], chunk[c:])
        for chunk, c in zip(flat.split([2 * c for c in block_channels]), block_channels, strict=True)
    ]


def film_penalty(film: FiLM) -> torch.Tensor:
    """Squared L2 norm of the FiLM offsets from identity: sum of |gamma - 1|^2 + |beta|^2."""
    return torch.stack([(gamma - 1).pow(2).sum() + beta.pow(2).sum() for gamma, beta in film]).sum()


class TaskContext(nn.Module):
    """Support images -> FiLM for every block: conv encoder, mean over the set, one MLP per block."""

    identity: torch.Tensor  # a buffer: the flat FiLM that leaves every block unchanged

    def __init__(self, in_channels: int, block_channels: Sequence[int], task_dim: int = 64) -> None:
        super().__init__()
        self.block_channels = list(block_channels)
        self.task_dim = task_dim
        self.encoder = nn.Sequential(*[ConvBlock(in_channels if i == 0 else task_dim, task_dim) for i in range(3)])
        self.generators = nn.ModuleList(
            nn.Sequential(nn.Linear(task_dim, task_dim), nn.ReLU(), nn.Linear(task_dim, 2 * c)) for c in block_channels
        )
        for generator in self.generators:  # zero offsets: gamma = 1, beta = 0 exactly at the start
            nn.init.zeros_(generator[-1].weight)
            nn.init.zeros_(generator[-1].bias)
        identity = torch.cat([torch.cat([torch.ones(c), torch.zeros(c)]) for c in block_channels])
        self.register_buffer("identity", identity, persistent=False)

    def task_embedding(self, images: torch.Tensor) -> torch.Tensor:
        """(task_dim,) mean over the images of their globally pooled encoder features."""
        return self.encoder(images).float().mean(dim=(0, 2, 3))

    def flat(self, images: torch.Tensor) -> torch.Tensor:
        """All blocks' FiLM as one float32 vector (layout: see ``split_film``); the generators skip autocast."""
        task = self.task_embedding(images)
        with torch.autocast(images.device.type, enabled=False):
            return torch.cat([generator(task) for generator in self.generators]) + self.identity

    def forward(self, images: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return split_film(self.flat(images), self.block_channels)


def _first_conv_channels(backbone: nn.Module) -> int:
    return next(m for m in backbone.modules() if isinstance(m, nn.Conv2d)).in_channels


@register_method
class FiLMProtoNet(ProtoNet):
    """ProtoNet over a backbone modulated per task by FiLM predicted from the support set.

    To start from a trained ProtoNet, train with ``--init-from`` its checkpoint (the backbone's
    weights are loaded after the method is built); ``freeze_backbone`` then trains only the context.
    """

    name = "film"
    image_encoder = None  # the task's FiLM changes every embedding
    option_help = {
        **ProtoNet.option_help,
        "task_dim": "width of the context encoder",
        "film_l2": "weight of the FiLM penalty (squared offsets from identity) in the loss",
        "freeze_backbone": "train only the context (and the cosine scale); the backbone's BatchNorm stays in eval mode",
    }

    def __init__(
        self,
        backbone: Backbone,
        metric: str = "sqeuclidean",
        task_dim: int = 64,
        film_l2: float = 1e-3,
        freeze_backbone: bool = False,
    ) -> None:
        if not isinstance(backbone, BlockBackbone):
            raise FewShotInputError(
                f"film modulates the blocks of conv4 or resnet12; a {type(backbone).__name__} has no FiLM hooks"
            )
        super().__init__(backbone, metric=metric, task_dim=task_dim, film_l2=film_l2, freeze_backbone=freeze_backbone)
        self.context = TaskContext(_first_conv_channels(backbone), backbone.block_channels, task_dim)
        self.film_l2 = film_l2
        self.freeze_backbone = freeze_backbone
        backbone.requires_grad_(not freeze_backbone)
        self.train()  # a given backbone may be in eval mode; a frozen one stays there

    def train(self, mode: bool = True) -> FiLMProtoNet:
        super().train(mode)
        if self.freeze_backbone:
            self.backbone.eval()
        return self

    def embed(self, images: torch.Tensor, film: FiLM | None = None) -> torch.Tensor:
        return self.backbone(images, film=film)

    def logits(
        self,
        support: torch.Tensor,
        support_labels: torch.Tensor,
        query: torch.Tensor,
        n_way: int,
        film: FiLM | None = None,
    ) -> torch.Tensor:
        """ProtoNet logits with support and queries embedded under ``film`` (default: the support's context)."""
        film = self.context(support) if film is None else film
        emb = self.embed(torch.cat([support, query]), film).float()
        return self.logits_from_embeddings(emb[: len(support)], support_labels, emb[len(support) :], n_way)

    def loss(self, episode: Episode) -> tuple[torch.Tensor, torch.Tensor]:
        """Query cross-entropy plus ``film_l2`` times the FiLM penalty, and the episode accuracy."""
        film = self.context(episode.support)
        logits = self.logits(episode.support, episode.support_labels, episode.query, episode.n_way, film)
        loss, acc = query_loss(logits, episode.query_labels)
        return loss + self.film_l2 * film_penalty(film), acc

    def export_info(self) -> dict[str, Any]:
        film = {
            "blocks": self.context.block_channels,
            "task_dim": self.context.task_dim,
            "context": "mean over support images",
            "layout": "per block: gamma (C) then beta (C)",
        }
        return {**super().export_info(), "modes": {"film": film}}

    def export_graphs(self) -> list[ExportGraph]:
        """The context, support ``images`` (S, C, H, W) -> flat ``film`` (F,), role "context"."""
        return [
            ExportGraph(
                "context", self.context.flat, lambda images: (images,), ("images",), ("film",), {"images": {0: "batch"}}
            )
        ]
