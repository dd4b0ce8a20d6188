"""ANIL with a Proto-MAML head (Raghu et al. 2020; Triantafillou et al. 2020) and Meta-SGD step sizes.

The inner loop adapts only a linear head over the embedding: it starts from the prototypes
(W = 2c, b = -|c|^2, so its logits are ProtoNet's up to a per-query constant) and takes a few
gradient steps of softmax cross-entropy plus ``inner_l2 / 2`` times the squared distance of the
head from that start. The cross-entropy is the support mean times the number of classes (for
K shots each: the sum over the support divided by K), so a class's gradient, and so the learned
step sizes, do not shrink with the number of classes: a device fine-tunes as well on 5 classes as
on the 20 or 60 of the training episodes. Step t updates W by ``lr_weight[t]`` (one size, or
one per embedding dimension shared by every class: Meta-SGD made class-agnostic, so any N works)
and b by ``lr_bias[t]``; both are meta-learned. The outer loop trains the backbone and the step
sizes through the adapted head on the queries, second-order or first-order (the inner gradients
are treated as constants). The device repeats the same loop in numpy (runtime/finetune.py).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.func import grad
from torch.nn import functional as F

from fewshot_edge.models import Backbone
from fewshot_edge.runtime.errors import FewShotInputError

from .base import FewShotMethod, register_method
from .protonet import prototypes

Head = dict[str, torch.Tensor]


def prototype_head(protos: torch.Tensor) -> Head:
    """The Proto-MAML head: weight 2c (C, D), bias -|c|^2 (C,)."""
    return {"weight": 2.0 * protos, "bias": -protos.pow(2).sum(-1)}


def head_logits(head: Head, x: torch.Tensor) -> torch.Tensor:
    return x @ head["weight"].T + head["bias"]


def support_loss(head: Head, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Softmax cross-entropy of the head on (x, y), mean times the number of classes."""
    return len(head["bias"]) * F.cross_entropy(head_logits(head, x), y)


def inner_loss(head: Head, start: Head, x: torch.Tensor, y: torch.Tensor, l2: float) -> torch.Tensor:
    """``support_loss`` plus l2/2 * |head - start|^2."""
    penalty = sum((head[k] - start[k]).pow(2).sum() for k in head)
    return support_loss(head, x, y) + 0.5 * l2 * penalty


def adapt_head(
    start: Head,
    x: torch.Tensor,
    y: torch.Tensor,
    lr_weight: torch.Tensor,
    lr_bias: torch.Tensor,
    l2: float,
    first_order: bool = False,
) -> Head:
    """Run the inner loop: one step per row of ``lr_weight`` (steps, 1 or D) and entry of ``lr_bias`` (steps,)."""
    step_grad = grad(inner_loss)
    anchor = {k: v.detach() for k, v in start.items()} if first_order else start
    head = start
    for lr_w, lr_b in zip(lr_weight, lr_bias, strict=True):
        g = step_grad(head, anchor, x.detach() if first_order else x, y, l2)
        if first_order:
            g = {k: v.detach() for k, v in g.items()}
        head = {"weight": head["weight"] - lr_w * g["weight"], "bias": head["bias"] - lr_b * g["bias"]}
    return head


class HeadMethod(FewShotMethod):
    """A method that adapts a linear head started from the support's prototypes (``adapt``) and scores the
    queries with it; ANIL's and the meta-learner LSTM's heads differ only in their update rule."""

    def adapt(self, start: Head, x: torch.Tensor, y: torch.Tensor) -> Head:
        """The head after the method's inner loop from ``start`` on support embeddings x with labels y."""
        raise NotImplementedError

    def adapted_head(self, support: torch.Tensor, support_labels: torch.Tensor, n_way: int) -> Head:
        """The head after the inner loop on support embeddings (float32, outside autocast)."""
        with torch.autocast(support.device.type, enabled=False):
            return self.adapt(prototype_head(prototypes(support, support_labels, n_way)), support, support_labels)

    def logits(
        self, support: torch.Tensor, support_labels: torch.Tensor, query: torch.Tensor, n_way: int
    ) -> torch.Tensor:
        emb = self.embed(torch.cat([support, query])).float()
        head = self.adapted_head(emb[: len(support)], support_labels, n_way)
        with torch.autocast(query.device.type, enabled=False):
            return head_logits(head, emb[len(support) :])


@register_method
class ANIL(HeadMethod):
    """ANIL / Proto-MAML: a linear head started from the prototypes, fine-tuned by a few learned steps."""

    name = "anil"
    option_help = {
        "inner_steps": "gradient steps of the head's inner loop (the device repeats them)",
        "step_size": "initial inner-loop step sizes",
        "per_parameter": "one weight step size per embedding dimension (else one per step)",
        "first_order": "treat the inner gradients as constants (no second-order terms)",
        "inner_l2": "weight of l2/2 |head - prototype head|^2 in the inner loss",
        "learn_step_sizes": "meta-learn the step sizes (else keep step_size)",
    }

    def __init__(
        self,
        backbone: Backbone,
        inner_steps: int = 5,
        step_size: float = 0.001,
        per_parameter: bool = False,
        first_order: bool = False,
        inner_l2: float = 0.0,
        learn_step_sizes: bool = True,
    ) -> None:
        if inner_steps < 0:
            raise FewShotInputError(f"inner_steps must be 0 or more, got {inner_steps}")
        if inner_l2 < 0:
            raise FewShotInputError(f"inner_l2 must be 0 or more, got {inner_l2}")
        super().__init__(
            backbone,
            inner_steps=inner_steps,
            step_size=step_size,
            per_parameter=per_parameter,
            first_order=first_order,
            inner_l2=inner_l2,
            learn_step_sizes=learn_step_sizes,
        )
        self.first_order = first_order
        self.inner_l2 = inner_l2
        width = backbone.out_dim if per_parameter else 1
        self.lr_weight = nn.Parameter(
            torch.full((inner_steps, width), float(step_size)), requires_grad=learn_step_sizes
        )
        self.lr_bias = nn.Parameter(torch.full((inner_steps,), float(step_size)), requires_grad=learn_step_sizes)

    def adapt(self, start: Head, x: torch.Tensor, y: torch.Tensor) -> Head:
        return adapt_head(start, x, y, self.lr_weight, self.lr_bias, self.inner_l2, self.first_order)

    def export_info(self) -> dict[str, Any]:
        finetune = {
            "init": "prototype",  # W = 2c, b = -|c|^2
            "steps": int(self.lr_weight.shape[0]),
            "lr_weight": self.lr_weight.detach().cpu().tolist(),
            "lr_bias": self.lr_bias.detach().cpu().tolist(),
            "l2": float(self.inner_l2),
            "loss": "classes x mean softmax cross-entropy over the support + l2/2 |head - init|^2",
        }
        return {"metric": "sqeuclidean", "scale": 1.0, "modes": {"finetune": finetune, "prototype": {}}}
