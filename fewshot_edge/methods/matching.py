"""Matching Networks (Vinyals et al. 2016): attention over every support embedding, no class means.

A query attends to each of the S support shots with a(q, i) = softmax_i(scale * cos(f(q), g(x_i))) and
P(c | q) = sum of a(q, i) over the shots of class c. The logits are log P(c | q) up to a constant per
query: ``logsumexp`` over each class's shots of scale * cos (``attention_logits``), so cross-entropy on
them is the paper's loss. ``scale`` is learned (a softmax over raw cosines in [-1, 1] is nearly flat).

With ``fce`` (full-context embeddings) the support and the queries are embedded in the context of the
whole support set:
- g(x_i, S) = g'(x_i) + the forward and backward hidden states at i of a bidirectional LSTM run over the
  support embeddings g' in their order (class-major, as the episodes and the device store order them);
- f(x, S): an LSTM cell run ``fce_steps`` times, h_k = LSTM([f'(x), r_{k-1}], (h_{k-1}, c_{k-1})) + f'(x),
  r_k = sum_i softmax_i(h_k . g(x_i, S)) g(x_i, S), from zero states; f = h_K. The read-out r enters
  the cell as input beside f'(x) (the paper concatenates it to the hidden state; same information).
Both FCE parts export as graphs (roles "fce_support" and "fce_query") that the device's ``matching``
mode runs on the stored shot embeddings and on each query's.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from fewshot_edge.models import Backbone
from fewshot_edge.runtime.errors import FewShotInputError

from .base import ExportGraph, FewShotMethod, register_method


def attention_logits(
    queries: torch.Tensor, keys: torch.Tensor, labels: torch.Tensor, n_way: int, scale: torch.Tensor
) -> torch.Tensor:
    """(Q, n_way): per class, log of the summed exp(scale * cos(query, shot)) over its shots."""
    sims = scale * F.normalize(queries, dim=-1) @ F.normalize(keys, dim=-1).T  # (Q, S)
    members = F.one_hot(labels, n_way).T.bool()  # (n_way, S)
    return sims[:, None, :].masked_fill(~members[None], float("-inf")).logsumexp(-1)


class SupportContext(nn.Module):
    """g(x_i, S): each support embedding plus both directions' hidden states of a bidirectional LSTM over
    the support (S, D) in order."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.dim = dim
        self.lstm = nn.LSTM(dim, dim, bidirectional=True, batch_first=True)

    def forward(self, support: torch.Tensor) -> torch.Tensor:
        states = self.lstm(support[None])[0][0]  # (S, 2D): forward then backward states
        return support + states[:, : self.dim] + states[:, self.dim :]


class QueryAttention(nn.Module):
    """f(x, S): ``steps`` rounds of an LSTM cell reading the encoded support by attention (see the module
    docstring); queries (Q, D) and encoded support ``keys`` (S, D) -> (Q, D)."""

    def __init__(self, dim: int, steps: int) -> None:
        super().__init__()
        self.cell = nn.LSTMCell(2 * dim, dim)
        self.steps = steps

    def forward(self, queries: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        h, c, read = torch.zeros_like(queries), torch.zeros_like(queries), torch.zeros_like(queries)
        for _ in range(self.steps):
            h, c = self.cell(torch.cat([queries, read], dim=1), (h, c))
            h = h + queries
            read = torch.softmax(h @ keys.T, dim=1) @ keys
        return h


@register_method
class MatchingNet(FewShotMethod):
    """Cosine attention over every support shot, with optional full-context embeddings."""

    name = "matching"
    image_encoder = "embed"
    option_help = {
        "fce": "full-context embeddings: a bidirectional LSTM over the support, an attention LSTM for queries",
        "fce_steps": "reading steps of the query attention LSTM (with fce)",
    }

    def __init__(self, backbone: Backbone, fce: bool = False, fce_steps: int = 3) -> None:
        if fce_steps < 1:
            raise FewShotInputError(f"fce_steps must be at least 1, got {fce_steps}")
        super().__init__(backbone, fce=fce, fce_steps=fce_steps)
        self.scale = nn.Parameter(torch.tensor(10.0))
        self.support_context = SupportContext(backbone.out_dim) if fce else None
        self.query_attention = QueryAttention(backbone.out_dim, fce_steps) if fce else None

    def logits(
        self, support: torch.Tensor, support_labels: torch.Tensor, query: torch.Tensor, n_way: int
    ) -> torch.Tensor:
        emb = self.embed(torch.cat([support, query])).float()
        return self.logits_from_embeddings(emb[: len(support)], support_labels, emb[len(support) :], n_way)

    def logits_from_embeddings(
        self, support: torch.Tensor, support_labels: torch.Tensor, query: torch.Tensor, n_way: int
    ) -> torch.Tensor:
        """Attention logits of plain embeddings, after the full-context embeddings when ``fce``."""
        if self.support_context is not None and self.query_attention is not None:
            support = self.support_context(support)
            query = self.query_attention(query, support)
        return attention_logits(query, support, support_labels, n_way, self.scale)

    def export_info(self) -> dict[str, Any]:
        matching = {
            "attention": "softmax over every shot of scale * cosine, summed per class",
            "fce": self.support_context is not None,
            "fce_steps": self.options["fce_steps"],
        }
        return {"metric": "cosine", "scale": self.scale.item(), "modes": {"matching": matching}}

    def export_graphs(self) -> list[ExportGraph]:
        """With ``fce``: "fce_support", ``support`` (S, D) -> ``keys`` (S, D), and "fce_query", ``queries``
        (Q, D) and ``keys`` (S, D) -> ``embeddings`` (Q, D); both read backbone embeddings."""
        support_context, query_attention = self.support_context, self.query_attention
        if support_context is None or query_attention is None:
            return []

        def query_inputs(images: torch.Tensor) -> tuple[torch.Tensor, ...]:
            emb = self.embed(images).float()
            return emb, support_context(emb.flip(0))

        shots, queries = {0: "shots"}, {0: "queries"}
        return [
            ExportGraph(
                "fce_support",
                support_context,
                lambda images: (self.embed(images).float(),),
                ("support",),
                ("keys",),
                {"support": shots, "keys": shots},
            ),
            ExportGraph(
                "fce_query",
                query_attention,
                query_inputs,
                ("queries", "keys"),
                ("embeddings",),
                {"queries": queries, "keys": shots, "embeddings": queries},
            ),
        ]
