"""Relation Networks (Sung et al. 2018): a learned relation module scores (query, class) feature-map pairs.

The encoder keeps feature maps: the backbone's blocks run with only the first ``pooled_blocks`` keeping
their 2x max-pool (the paper pools after the first two of four) and nothing pools or flattens after the
last, so an image gives maps (C, h, w); the bundle's encoder and the store hold them flattened (C*h*w).
A class's feature is the mean of its shots' maps (the paper sums them for K > 1; the mean keeps the
relation module's input on one scale whatever the number of shots, which varies by class on a device).

The relation module reads each (class, query) pair concatenated on channels (2C, h, w): two blocks of
conv3x3 (``hidden`` filters), BatchNorm, ReLU and 2x max-pool (ceil mode, so small maps work), a global
average over what is left (the paper flattens; on 28 px Omniglot both see 1x1), then a ``hidden_units``
ReLU layer and one output: the relation logit z. The relation score is sigmoid(z).

``loss``: "mse" (the paper) regresses sigmoid(z) on the one-hot match, each pair on its own; "ce" is
cross-entropy of softmax over the classes' z, which compares a query's classes with each other and
gives probabilities without the calibrated temperature having to fix a regression's scale. Both rank
classes by z, which are the logits either way.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from fewshot_edge.episodes import Episode
from fewshot_edge.models import Backbone, BlockBackbone
from fewshot_edge.runtime.errors import FewShotInputError

from .base import ExportGraph, FewShotMethod, register_method
from .protonet import prototypes

LOSSES = ("mse", "ce")


class RelationModule(nn.Module):
    """(Q, C, h, w) query maps and (K, C, h, w) class maps -> (Q, K) relation logits, every pair at once."""

    def __init__(self, channels: int, hidden: int = 64, hidden_units: int = 8) -> None:
        super().__init__()

        def block(cin: int) -> nn.Sequential:
            conv = nn.Conv2d(cin, hidden, 3, padding=1)
            return nn.Sequential(conv, nn.BatchNorm2d(hidden), nn.ReLU(), nn.MaxPool2d(2, ceil_mode=True))

        self.convs = nn.Sequential(block(2 * channels), block(hidden))
        self.head = nn.Sequential(nn.Linear(hidden, hidden_units), nn.ReLU(), nn.Linear(hidden_units, 1))

    def forward(self, queries: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
        n_query, n_class = queries.size(0), classes.size(0)  # size(), not len(): traced as dynamic axes
        pairs = torch.cat(
            [
                classes.unsqueeze(0).expand(n_query, -1, -1, -1, -1),
                queries.unsqueeze(1).expand(-1, n_class, -1, -1, -1),
            ],
            dim=2,
        ).flatten(0, 1)
        return self.head(self.convs(pairs).mean(dim=(2, 3))).view(n_query, n_class)


@register_method
class RelationNet(FewShotMethod):
    """Relation logits of (query, class-mean) feature-map pairs from a learned relation module."""

    name = "relation"
    image_encoder = "features"
    option_help = {
        "loss": "mse: sigmoid relation scores regressed on one-hot (the paper); ce: softmax cross-entropy over classes",
        "pooled_blocks": "how many leading backbone blocks keep their max-pool (the paper: 2 of 4)",
        "hidden": "filters of the relation module's two conv blocks",
        "hidden_units": "width of the relation module's hidden fully connected layer",
    }

    def __init__(
        self, backbone: Backbone, loss: str = "mse", pooled_blocks: int = 2, hidden: int = 64, hidden_units: int = 8
    ) -> None:
        if loss not in LOSSES:
            raise FewShotInputError(f"relation loss must be one of {', '.join(LOSSES)}, got {loss!r}")
        if not isinstance(backbone, BlockBackbone):
            raise FewShotInputError(
                f"relation needs the feature maps of conv4 or resnet12; a {type(backbone).__name__} gives vectors"
            )
        if not 0 <= pooled_blocks <= len(backbone.blocks):
            raise FewShotInputError(f"pooled_blocks must be in 0..{len(backbone.blocks)}, got {pooled_blocks}")
        super().__init__(backbone, loss=loss, pooled_blocks=pooled_blocks, hidden=hidden, hidden_units=hidden_units)
        for block in list(backbone.blocks)[pooled_blocks:]:
            block.pool = nn.Identity()
        self.loss_kind = loss
        self.channels = backbone.block_channels[-1]
        self.relation = RelationModule(self.channels, hidden, hidden_units)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """Feature maps (N, C, h, w): the backbone's blocks, without its final pooling or flattening."""
        for block in self.backbone.blocks:
            images = block(images)
        return images

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        return self.features(images).flatten(1)

    def logits(
        self, support: torch.Tensor, support_labels: torch.Tensor, query: torch.Tensor, n_way: int
    ) -> torch.Tensor:
        maps = self.features(torch.cat([support, query])).float()
        shots, queries = maps[: len(support)], maps[len(support) :]
        classes = prototypes(shots.flatten(1), support_labels, n_way).view(n_way, *shots.shape[1:])
        return self.relation(queries, classes)

    def loss(self, episode: Episode) -> tuple[torch.Tensor, torch.Tensor]:
        """MSE of sigmoid relation scores against one-hot, or cross-entropy; and the episode accuracy."""
        logits = self.logits(episode.support, episode.support_labels, episode.query, episode.n_way)
        acc = (logits.argmax(-1) == episode.query_labels).float().mean()
        if self.loss_kind == "ce":
            return F.cross_entropy(logits, episode.query_labels), acc
        onehot = F.one_hot(episode.query_labels, episode.n_way).float()
        return F.mse_loss(torch.sigmoid(logits), onehot), acc

    def export_info(self) -> dict[str, Any]:
        relation = {
            "loss": self.loss_kind,
            "class_feature": "mean of the shots' feature maps",
            "score": "sigmoid of the relation logit",
            "pooled_blocks": self.options["pooled_blocks"],
        }
        return {"metric": "sqeuclidean", "scale": 1.0, "modes": {"relation": relation}}

    def export_graphs(self) -> list[ExportGraph]:
        """ "relation": ``queries`` (Q, C, h, w) and ``classes`` (K, C, h, w) feature maps -> ``relations`` (Q, K)."""

        def inputs(images: torch.Tensor) -> tuple[torch.Tensor, ...]:
            maps = self.features(images).float()
            return maps, maps.flip(0)

        axes = {"queries": {0: "queries"}, "classes": {0: "classes"}, "relations": {0: "queries", 1: "classes"}}
        return [ExportGraph("relation", self.relation, inputs, ("queries", "classes"), ("relations",), axes)]
