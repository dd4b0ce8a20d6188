"""A set-Transformer meta-learner (CAML, Fifty et al. 2024; SNAIL lineage): the support as a sequence.

Each support embedding, projected to the model width, is joined (added) with the code of its class
slot; each query with the "unknown" code. A small Transformer encoder (no positions: the support is a
set) reads, for every query, the support tokens and that query's token; a linear head on the query
token gives logits over the ``max_way`` slots. Queries do not see one another, so each answer depends
only on the support and itself. Label codes are learned, or fixed (orthonormal rows, as CAML's fixed
equiangular codes). The device's graph (role "sequence") takes the support embeddings, their slots
and the queries.

The encoder is pre-norm blocks written here rather than ``nn.TransformerEncoder``: the TorchScript
exporter traces ``nn.MultiheadAttention`` (torch 2.13) with the example's sequence length baked into a
Reshape, so a graph traced with 3 shots fails on 7; these blocks (``scaled_dot_product_attention``)
export with the number of shots and of queries dynamic.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from fewshot_edge.episodes import Episode
from fewshot_edge.models import Backbone
from fewshot_edge.runtime.errors import FewShotInputError

from .base import ExportGraph, query_loss, register_method
from .sequence import READ_ROLE, SequenceMethod

LABEL_CODES = ("learned", "fixed")


class Block(nn.Module):
    """A pre-norm Transformer encoder layer: x + attention(norm(x)), then x + MLP(norm(x)) (GELU, 2x width)."""

    def __init__(self, width: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.heads, self.dropout = heads, dropout
        self.norm1, self.norm2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.qkv, self.proj = nn.Linear(width, 3 * width), nn.Linear(width, width)
        self.mlp = nn.Sequential(
            nn.Linear(width, 2 * width), nn.GELU(), nn.Linear(2 * width, width), nn.Dropout(dropout)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, L, W) -> (B, L, W), every token attending to every token of its sequence."""
        q, k, v = self.qkv(self.norm1(x)).unflatten(-1, (3, self.heads, -1)).permute(2, 0, 3, 1, 4)
        attended = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0)
        x = x + self.proj(attended.transpose(1, 2).flatten(2))
        return x + self.mlp(self.norm2(x))


@register_method
class SetTransformer(SequenceMethod):
    """Support tokens (embedding + slot code) and a query token through a Transformer encoder."""

    name = "transformer"
    form = "set"
    option_help = {
        "max_way": "most classes it reads (label slots); the device refuses more",
        "width": "Transformer model width",
        "depth": "encoder layers",
        "heads": "attention heads",
        "label_codes": "class slot codes: learned, or fixed orthonormal rows (needs width > max_way)",
        "dropout": "dropout in the encoder layers (training only)",
        "freeze_backbone": "train only the Transformer (the backbone stays in eval mode)",
    }

    def __init__(
        self,
        backbone: Backbone,
        max_way: int = 20,
        width: int = 128,
        depth: int = 2,
        heads: int = 4,
        label_codes: str = "learned",
        dropout: float = 0.0,
        freeze_backbone: bool = False,
    ) -> None:
        if label_codes not in LABEL_CODES:
            raise FewShotInputError(f"label_codes must be one of {', '.join(LABEL_CODES)}, got {label_codes!r}")
        if label_codes == "fixed" and width <= max_way:
            raise FewShotInputError(f"fixed label codes need width > max_way, got width {width}, max_way {max_way}")
        if width % heads:
            raise FewShotInputError(f"width must be a multiple of heads, got width {width}, heads {heads}")
        super().__init__(
            backbone,
            max_way,
            freeze_backbone,
            width=width,
            depth=depth,
            heads=heads,
            label_codes=label_codes,
            dropout=dropout,
        )
        self.project = nn.Linear(backbone.out_dim, width)
        if label_codes == "fixed":  # row max_way is the query's "unknown" code
            generator = torch.Generator().manual_seed(0)
            q, _ = torch.linalg.qr(torch.randn(width, max_way + 1, generator=generator))
            self.register_buffer("codes", q.T * width**0.5)
        else:
            self.codes = nn.Parameter(torch.randn(max_way + 1, width))
        self.encoder = nn.Sequential(*[Block(width, heads, dropout) for _ in range(depth)])
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, max_way)

    def read(self, support: torch.Tensor, slots: torch.Tensor, queries: torch.Tensor) -> torch.Tensor:
        """Logits (Q, max_way) for queries (Q, D) given support embeddings (S, D) in slots (S,) int64."""
        tokens = self.project(support) + self.codes[slots]
        asked = self.project(queries) + self.codes[self.max_way]
        # sizes from .shape, not len() or -1, which the exporter would bake in as the example's sizes
        sequences = torch.cat([tokens[None].repeat(queries.shape[0], 1, 1), asked[:, None]], dim=1)
        return self.head(self.norm(self.encoder(sequences)[:, -1]))

    def logits(
        self, support: torch.Tensor, support_labels: torch.Tensor, query: torch.Tensor, n_way: int
    ) -> torch.Tensor:
        """Class i of the support in slot i; the first ``n_way`` columns."""
        self.check_way(n_way)
        s, q = self.embed_episode(support, query)
        return self.read(s, support_labels, q)[:, :n_way]

    def loss(self, episode: Episode) -> tuple[torch.Tensor, torch.Tensor]:
        """Query cross-entropy with the episode's classes in random slots (labels permuted per episode)."""
        s, q = self.embed_episode(episode.support, episode.query)
        slots = self.random_slots(episode.n_way, s.device)
        return query_loss(self.read(s, slots[episode.support_labels], q)[:, slots], episode.query_labels)

    def sequence_info(self) -> dict[str, Any]:
        return {"read_role": READ_ROLE}

    def read_graph(self, support: torch.Tensor, labels: torch.Tensor, queries: torch.Tensor) -> torch.Tensor:
        """The device's graph: support (S, D), their slots (S,) float32, queries (Q, D) -> logits (Q, max_way)."""
        return self.read(support, labels.long(), queries)

    def export_graphs(self) -> list[ExportGraph]:
        def inputs(images: torch.Tensor) -> tuple[torch.Tensor, ...]:
            emb = self.embed(images).float()
            return emb, self.demo_slots(len(emb), emb.device), emb

        dynamic = {"support": {0: "shots"}, "labels": {0: "shots"}, "queries": {0: "queries"}, "logits": {0: "queries"}}
        return [ExportGraph(READ_ROLE, self.read_graph, inputs, ("support", "labels", "queries"), ("logits",), dynamic)]
