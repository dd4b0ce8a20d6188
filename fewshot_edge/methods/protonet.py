"""Prototypical Networks (Snell et al. 2017): classify by distance to class-mean embeddings."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from fewshot_edge.models import Backbone
from fewshot_edge.runtime.errors import FewShotInputError

from .base import FewShotMethod, register_method


def prototypes(embeddings: torch.Tensor, labels: torch.Tensor, n_way: int) -> torch.Tensor:
    """Class means (n_way, D) of embeddings with labels 0..n_way-1.

    A one-hot matrix product rather than bincount/index_add: no host-device sync on CUDA.
    """
    onehot = torch.zeros(len(labels), n_way, dtype=embeddings.dtype, device=embeddings.device)
    onehot.scatter_(1, labels[:, None], 1.0)
    return (onehot.T @ embeddings) / onehot.sum(0)[:, None]


def squared_distances(queries: torch.Tensor, protos: torch.Tensor) -> torch.Tensor:
    """(Q, C) squared Euclidean distances, computed exactly (no |a|^2 - 2ab + |b|^2 cancellation)."""
    return (queries[:, None, :] - protos[None, :, :]).pow(2).sum(-1)


@register_method
class ProtoNet(FewShotMethod):
    """Logits are -squared Euclidean distance to prototypes, or a learnable scale times cosine."""

    name = "protonet"
    image_encoder = "embed"
    option_help = {"metric": "distance to the prototypes: sqeuclidean, or cosine with a learned scale"}

    def __init__(self, backbone: Backbone, metric: str = "sqeuclidean", **options: Any) -> None:
        if metric not in ("sqeuclidean", "cosine"):
            raise FewShotInputError(f"metric must be 'sqeuclidean' or 'cosine', got {metric!r}")
        super().__init__(backbone, metric=metric, **options)
        self.metric = metric
        self.scale = nn.Parameter(torch.tensor(10.0)) if metric == "cosine" else None

    def logits(
        self, support: torch.Tensor, support_labels: torch.Tensor, query: torch.Tensor, n_way: int
    ) -> torch.Tensor:
        emb = self.embed(torch.cat([support, query])).float()
        s, q = emb[: len(support)], emb[len(support) :]
        return self.logits_from_embeddings(s, support_labels, q, n_way)

    def logits_from_embeddings(
        self, support: torch.Tensor, support_labels: torch.Tensor, query: torch.Tensor, n_way: int
    ) -> torch.Tensor:
        protos = prototypes(support, support_labels, n_way)
        if self.metric == "cosine":
            return self.scale * F.normalize(query, dim=-1) @ F.normalize(protos, dim=-1).T
        return -squared_distances(query, protos)

    def export_info(self) -> dict[str, Any]:
        scale = self.scale.item() if self.scale is not None else 1.0
        return {"metric": self.metric, "scale": scale, "modes": {"prototype": {}}}
