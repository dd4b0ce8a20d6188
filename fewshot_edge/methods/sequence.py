"""What the black-box (sequence) learners share: class slots, a frozen or trained backbone, the device mode.

A sequence learner reads the support embeddings with a label code per class *slot* (one of ``max_way``)
and gives logits over the slots. In training each episode's classes take a random subset of the slots
(labels permuted per episode), so every slot is trained; in ``logits`` and on the device class i of
the support takes slot i, and only the first ``n_way`` columns are returned. More than ``max_way``
classes cannot be read: the slots are part of the trained weights.

On the device these methods use the ``sequence`` mode (runtime/sequence.py), which runs the graphs
they declare in ``export_graphs``. The graphs take label slots as float32 (whole numbers, cast inside),
as every graph input is float32 on the device.
"""

from __future__ import annotations

from typing import Any

import torch

from fewshot_edge.models import Backbone
from fewshot_edge.runtime.errors import FewShotInputError

from .base import FewShotMethod

READ_ROLE = "sequence"  # role of the graph that answers the queries


class SequenceMethod(FewShotMethod):
    """Base of ``mann`` and ``transformer``: slot bookkeeping, ``freeze_backbone``, export info."""

    form: str  # "recurrent" (shots written one at a time into a state) or "set" (the support read whole)
    image_encoder = "embed"

    def __init__(self, backbone: Backbone, max_way: int, freeze_backbone: bool, **options: Any) -> None:
        if max_way < 2:
            raise FewShotInputError(f"max_way must be at least 2, got {max_way}")
        super().__init__(backbone, max_way=max_way, freeze_backbone=freeze_backbone, **options)
        self.max_way = max_way
        self.freeze_backbone = freeze_backbone
        backbone.requires_grad_(not freeze_backbone)

    def train(self, mode: bool = True) -> SequenceMethod:
        super().train(mode)
        if self.freeze_backbone:
            self.backbone.eval()
        return self

    def check_way(self, n_way: int) -> None:
        if n_way > self.max_way:
            raise FewShotInputError(
                f"{self.name} reads at most {self.max_way} classes (its label slots, option max_way), got {n_way}:"
                f" use episodes of at most {self.max_way} ways, or a larger max_way"
            )

    def demo_slots(self, n: int, device: torch.device) -> torch.Tensor:
        """(n,) float32 slots 0, 1, ... cycling through ``max_way``: the labels of a graph's example inputs."""
        return (torch.arange(n, device=device) % self.max_way).float()

    def random_slots(self, n_way: int, device: torch.device) -> torch.Tensor:
        """(n_way,) distinct slots for an episode's classes: the per-episode label permutation of training."""
        self.check_way(n_way)
        return torch.randperm(self.max_way, device=device)[:n_way]

    def embed_episode(self, support: torch.Tensor, query: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Support and query embeddings in one backbone pass, float32."""
        emb = self.embed(torch.cat([support, query])).float()
        return emb[: len(support)], emb[len(support) :]

    def sequence_info(self) -> dict[str, Any]:
        """The method's own parameters of the sequence mode (beside ``max_way`` and ``form``)."""
        return {}

    def export_info(self) -> dict[str, Any]:
        """Sequence mode first (the default); prototypes over the same embeddings as a second mode. The
        open-set test uses the cosine distance to the nearest class mean in both."""
        sequence = {"form": self.form, "max_way": self.max_way, **self.sequence_info()}
        return {"metric": "cosine", "scale": 1.0, "modes": {"sequence": sequence, "prototype": {}}}
