"""Memory-augmented neural network (Santoro et al. 2016): an LSTM controller with an external memory.

Step t reads embedding x_t with the one-hot label slot of step t-1 (the paper's offset: a label is
given one step after its image) and the previous read vector. The controller's key k = tanh(W h)
reads the memory by content: w_r = softmax(beta * cosine(k, M_i)) over the N rows, r = w_r M
(the memory as the earlier steps left it). Then it writes k by least-recently-used access:
w_w = sigmoid(a) w_r(t-1) + (1 - sigmoid(a)) w_lu(t-1), where w_lu is one-hot on the least used row
(usage u = gamma u + w_r + w_w), which is zeroed before the write M += w_w k^T. Logits over the
``max_way`` label slots come from [h, r].

Training follows the paper: the support in a shuffled order, labels permuted per episode (random
slots), a prediction at every step. Writing the support ends with one more step, a blank image with
the last shot's label, so the last shot is bound in memory too; queries then read without writing,
each from that state, so they are independent. With ``label_delay`` false a shot's label goes in
with its own image instead (the device knows every enrolled label), there is no binding step and the
loss is the queries' alone: much quicker to learn (on Gaussian-cluster embeddings, 5-way 1-shot: 87%
after 3,000 episodes, against chance still at 4,000 with the delay; the random backbone frozen).
``write`` (one shot) and ``read`` (the queries) are the device's two graphs (roles "sequence_write"
and "sequence"); the state between them is one flat float32 vector, all zeros before the first shot.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from fewshot_edge.episodes import Episode
from fewshot_edge.models import Backbone

from .base import ExportGraph, query_loss, register_method
from .sequence import READ_ROLE, SequenceMethod

WRITE_ROLE = "sequence_write"
EPS = 1e-6


@register_method
class MANN(SequenceMethod):
    """Santoro et al. 2016: an LSTM controller with a least-recently-used access memory over embeddings."""

    name = "mann"
    form = "recurrent"
    option_help = {
        "max_way": "most classes it reads (label slots); the device refuses more",
        "controller": "LSTM controller width",
        "memory_slots": "rows of the external memory",
        "memory_width": "width of a memory row (the key)",
        "usage_decay": "gamma, the decay of the memory rows' usage",
        "query_weight": "weight of the query loss beside the per-step loss over the support sequence",
        "label_delay": "give a shot's label one step after its image (the paper); false: with its own image",
        "freeze_backbone": "train only the controller and memory heads (the backbone stays in eval mode)",
    }

    def __init__(
        self,
        backbone: Backbone,
        max_way: int = 20,
        controller: int = 200,
        memory_slots: int = 128,
        memory_width: int = 40,
        usage_decay: float = 0.95,
        query_weight: float = 1.0,
        label_delay: bool = True,
        freeze_backbone: bool = False,
    ) -> None:
        super().__init__(
            backbone,
            max_way,
            freeze_backbone,
            controller=controller,
            memory_slots=memory_slots,
            memory_width=memory_width,
            usage_decay=usage_decay,
            query_weight=query_weight,
            label_delay=label_delay,
        )
        self.label_delay = label_delay
        self.sizes = {  # the flat state's layout, in order
            "h": controller,
            "c": controller,
            "memory": memory_slots * memory_width,
            "usage": memory_slots,
            "read_weights": memory_slots,
            "read": memory_width,
            "label": max_way,
        }
        self.slots, self.width, self.decay, self.query_weight = memory_slots, memory_width, usage_decay, query_weight
        self.cell = nn.LSTMCell(backbone.out_dim + max_way + memory_width, controller)
        self.key = nn.Linear(controller, memory_width)
        self.strength = nn.Linear(controller, 1)
        self.gate = nn.Linear(controller, 1)
        self.out = nn.Linear(controller + memory_width, max_way)

    @property
    def state_size(self) -> int:
        return sum(self.sizes.values())

    def initial_state(self, batch: int = 1, device: torch.device | None = None) -> torch.Tensor:
        return torch.zeros(batch, self.state_size, device=device)

    def unpack(self, state: torch.Tensor) -> dict[str, torch.Tensor]:
        """The flat (B, P) state as named tensors (memory (B, N, M))."""
        parts = dict(zip(self.sizes, state.split(list(self.sizes.values()), dim=1), strict=True))
        parts["memory"] = parts["memory"].reshape(-1, self.slots, self.width)
        return parts

    def pack(self, parts: dict[str, torch.Tensor]) -> torch.Tensor:
        return torch.cat([parts[k].flatten(1) for k in self.sizes], dim=1)

    def step(
        self, state: torch.Tensor, x: torch.Tensor, label: torch.Tensor, write: bool = True
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One step from (B, P) states on embeddings x (B, D), with the state's label as the previous
        one and ``label`` (B, max_way) stored for the next step; returns (next state, logits (B, max_way))."""
        s = self.unpack(state)
        h, c = self.cell(torch.cat([x, s["label"], s["read"]], dim=1), (s["h"], s["c"]))
        key = torch.tanh(self.key(h))
        memory = s["memory"]
        cosine = (memory @ key[:, :, None])[..., 0] / (memory.norm(dim=2) * key.norm(dim=1, keepdim=True) + EPS)
        read_weights = torch.softmax(F.softplus(self.strength(h)) * cosine, dim=1)
        read = (read_weights[:, :, None] * memory).sum(1)
        logits = self.out(torch.cat([h, read], dim=1))
        if write:
            slots = torch.arange(self.slots, device=state.device)
            least_used = (slots == s["usage"].argmin(dim=1, keepdim=True)).float()
            alpha = torch.sigmoid(self.gate(h))
            write_weights = alpha * s["read_weights"] + (1 - alpha) * least_used
            memory = memory * (1 - least_used[:, :, None]) + write_weights[:, :, None] * key[:, None, :]
            usage = self.decay * s["usage"] + read_weights + write_weights
            s = {**s, "memory": memory, "usage": usage, "read_weights": read_weights}
        return self.pack({**s, "h": h, "c": c, "read": read, "label": label}), logits

    def onehot(self, slots: torch.Tensor) -> torch.Tensor:
        return (slots[:, None] == torch.arange(self.max_way, device=slots.device)).float()

    def write(self, state: torch.Tensor, x: torch.Tensor, slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write shots x (S, D) with label slots (S,) in order into a (1, P) state; returns the state and
        each step's logits (S, max_way), its prediction before its label is given."""
        logits = []
        for t in range(len(x)):
            label = self.onehot(slots[t : t + 1])
            if not self.label_delay:  # the label goes in with its own image
                state = self.pack({**self.unpack(state), "label": label})
            state, step_logits = self.step(state, x[t : t + 1], label)
            logits.append(step_logits)
        return state, torch.cat(logits) if logits else x.new_zeros(0, self.max_way)

    def read(self, state: torch.Tensor, queries: torch.Tensor) -> torch.Tensor:
        """Logits (Q, max_way) of queries (Q, D) from a (1, P) state: the step binding the last shot's
        label (a blank image), then one step per query that reads and does not write."""
        bound = state
        if self.label_delay:
            blank = queries.new_zeros(1, queries.shape[1])
            bound, _ = self.step(state, blank, queries.new_zeros(1, self.max_way))
        q = queries.shape[0]  # not len(): the exporter traces shape[0] as the dynamic size it is
        _, logits = self.step(bound.expand(q, -1), queries, queries.new_zeros(q, self.max_way), write=False)
        return logits

    def logits(
        self, support: torch.Tensor, support_labels: torch.Tensor, query: torch.Tensor, n_way: int
    ) -> torch.Tensor:
        """The device's reading: support written in the given order, class i in slot i."""
        self.check_way(n_way)
        s, q = self.embed_episode(support, query)
        state, _ = self.write(self.initial_state(device=s.device), s, support_labels)
        return self.read(state, q)[:, :n_way]

    def loss(self, episode: Episode) -> tuple[torch.Tensor, torch.Tensor]:
        """The paper's per-step loss over the support in a shuffled order with permuted slots, plus
        ``query_weight`` times the queries' loss; the accuracy is the queries'."""
        s, q = self.embed_episode(episode.support, episode.query)
        slots = self.random_slots(episode.n_way, s.device)
        order = torch.randperm(len(s), device=s.device)
        labels = episode.support_labels[order]
        state, step_logits = self.write(self.initial_state(device=s.device), s[order], slots[labels])
        loss, acc = query_loss(self.read(state, q)[:, slots], episode.query_labels)
        if not self.label_delay:  # each step saw its own label: only the queries are predictions
            return loss, acc
        support_loss, _ = query_loss(step_logits[:, slots], labels)
        return support_loss + self.query_weight * loss, acc

    def sequence_info(self) -> dict[str, Any]:
        return {"state_size": self.state_size, "write_role": WRITE_ROLE, "read_role": READ_ROLE}

    def write_one(self, state: torch.Tensor, embedding: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        """The device's write graph: state (P,), one shot's embedding (D,) and its slot (float32 scalar) -> state (P,)."""
        return self.write(state[None], embedding[None], label[None].long())[0][0]

    def read_one(self, state: torch.Tensor, queries: torch.Tensor) -> torch.Tensor:
        """The device's read graph: state (P,) and queries (Q, D) -> logits (Q, max_way)."""
        return self.read(state[None], queries)

    def graph_inputs(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Example graph inputs from an image batch: the state after writing all but the last image in
        slots 0, 1, ..., the embeddings, and the slots."""
        emb = self.embed(images).float()
        slots = self.demo_slots(len(emb), emb.device)
        state, _ = self.write(self.initial_state(device=emb.device), emb[:-1], slots[:-1].long())
        return state[0], emb, slots

    def export_graphs(self) -> list[ExportGraph]:
        def write_inputs(images: torch.Tensor) -> tuple[torch.Tensor, ...]:
            state, emb, slots = self.graph_inputs(images)
            return state, emb[-1], slots[-1]

        def read_inputs(images: torch.Tensor) -> tuple[torch.Tensor, ...]:
            state, emb, _ = self.graph_inputs(images)
            return state, emb

        return [
            ExportGraph(WRITE_ROLE, self.write_one, write_inputs, ("state", "embedding", "label"), ("next_state",)),
            ExportGraph(
                READ_ROLE,
                self.read_one,
                read_inputs,
                ("state", "queries"),
                ("logits",),
                {"queries": {0: "queries"}, "logits": {0: "queries"}},
            ),
        ]
