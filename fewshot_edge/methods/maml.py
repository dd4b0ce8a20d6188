"""MAML (Finn et al. 2017) with every layer adapted in the inner loop, over ANIL's Proto-MAML head.

The head is ANIL's (``anil.py``): a linear layer started from the support prototypes (W = 2c,
b = -|c|^2), so it serves any number of classes. The inner loop takes ``inner_steps`` gradient steps
of ANIL's inner loss on the support set with respect to the backbone's parameters and the head
together (``torch.func.functional_call`` + ``torch.func.grad``); the outer loss is the queries' cross-
entropy through the adapted network, differentiated through the steps (second order) or with the inner
gradients treated as constants (``first_order``). Every backbone parameter steps by ``step_size``; the
head by ``head_step_size`` (Meta-SGD learns them instead, ``metasgd.py``).

BatchNorm: full adaptation normalises every forward by the batch's own statistics, in training and
in eval mode alike (transductive, as MAML: the support set in the inner loop, the queries together
after it). Only the training forward of the support set that gives the prototypes updates the
running statistics, so they describe the meta-learned initial network: the one head-only adaptation
(and a device, which embeds each image alone) runs in eval mode. Full adaptation on the running
statistics instead (a plain network's eval mode) lost 11 points (65.9% vs 77.3%) on Omniglot 5-way
1-shot after 3 minutes of training: the inner steps are trained on batch statistics.

A device cannot step its encoder, so a bundle carries the backbone and the head's init and step sizes
for the numpy ``finetune`` mode (ANIL's export): head-only adaptation. ``test_adapt=head`` makes the
PyTorch model do the same in eval mode (what the device computes); ``full`` (the default) adapts the
whole network, as trained.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import ClassVar

import torch
from torch import nn
from torch.func import functional_call, grad

from fewshot_edge.models import Backbone
from fewshot_edge.runtime.errors import FewShotInputError

from .anil import ANIL, Head, head_logits, inner_loss, prototype_head
from .base import register_method
from .protonet import prototypes

Params = dict[str, torch.Tensor]
TEST_ADAPT = ("full", "head")


def full_precision(x: torch.Tensor) -> torch.Tensor:
    """``x`` in float32 when autocast made it narrower; float64 stays float64."""
    return x if x.dtype == torch.float64 else x.float()


@contextmanager
def batch_statistics(module: nn.Module, track: bool = False) -> Iterator[None]:
    """Inside the block BatchNorm layers normalise by the batch's own statistics, and update their running
    statistics only with ``track`` (and when they keep them)."""
    norms = [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    saved = [(m.training, m.track_running_stats) for m in norms]
    for m in norms:
        m.training, m.track_running_stats = True, track and m.track_running_stats
    try:
        yield
    finally:
        for m, (training, tracked) in zip(norms, saved, strict=True):
            m.training, m.track_running_stats = training, tracked


def adapt_network(
    backbone: nn.Module,
    params: Params,
    start: Head,
    x: torch.Tensor,
    y: torch.Tensor,
    step_sizes: Sequence[torch.Tensor | float],
    lr_weight: torch.Tensor,
    lr_bias: torch.Tensor,
    l2: float,
    first_order: bool = False,
) -> tuple[Params, Head]:
    """The inner loop over the backbone's ``params`` and the head: one step per row of ``lr_weight`` on
    ANIL's ``inner_loss`` of the support images ``x`` with labels ``y``. Parameter i steps by
    ``step_sizes[i]`` (a number or a tensor of its shape); call inside ``batch_statistics``."""

    def loss(p: Params, head: Head) -> torch.Tensor:
        emb = full_precision(functional_call(backbone, p, (x,)))
        with torch.autocast(x.device.type, enabled=False):
            return inner_loss(head, start, emb, y, l2)

    step_grad = grad(loss, argnums=(0, 1))
    head = start
    for lr_w, lr_b in zip(lr_weight, lr_bias, strict=True):
        g_params, g_head = step_grad(params, head)
        if first_order:
            g_params = {k: v.detach() for k, v in g_params.items()}
            g_head = {k: v.detach() for k, v in g_head.items()}
        params = {k: v - lr * g_params[k] for (k, v), lr in zip(params.items(), step_sizes, strict=True)}
        head = {"weight": head["weight"] - lr_w * g_head["weight"], "bias": head["bias"] - lr_b * g_head["bias"]}
    return params, head


@register_method
class MAML(ANIL):
    """MAML over a Proto-MAML head: all layers adapted in the inner loop, second- or first-order."""

    name = "maml"
    option_help = {
        "inner_steps": "gradient steps of the inner loop (the device repeats them on the head)",
        "step_size": "inner-loop step size of every backbone parameter (Meta-SGD: initial)",
        "head_step_size": "inner-loop step size of the head, default step_size (Meta-SGD: initial)",
        "first_order": "treat the inner gradients as constants (first-order MAML)",
        "inner_l2": "weight of l2/2 |head - prototype head|^2 in the inner loss",
        "test_adapt": "what eval mode adapts: full (every layer) or head (what a device runs)",
    }
    learned_step_sizes: ClassVar[bool] = False  # Meta-SGD's

    def __init__(
        self,
        backbone: Backbone,
        inner_steps: int = 5,
        step_size: float = 0.01,
        head_step_size: float | None = None,
        first_order: bool = False,
        inner_l2: float = 0.0,
        test_adapt: str = "full",
    ) -> None:
        if test_adapt not in TEST_ADAPT:
            raise FewShotInputError(f"test_adapt must be one of {', '.join(TEST_ADAPT)}, got {test_adapt!r}")
        head_lr = step_size if head_step_size is None else head_step_size
        learned = self.learned_step_sizes
        super().__init__(
            backbone,
            inner_steps,
            head_lr,
            per_parameter=learned,
            first_order=first_order,
            inner_l2=inner_l2,
            learn_step_sizes=learned,
        )
        self.options = {
            "inner_steps": inner_steps,
            "step_size": step_size,
            "head_step_size": head_step_size,
            "first_order": first_order,
            "inner_l2": inner_l2,
            "test_adapt": test_adapt,
        }
        self.step_size = float(step_size)
        self.test_adapt = test_adapt
        if learned:  # Meta-SGD: one learned step size per backbone element
            self.backbone_lr = nn.ParameterList(
                [nn.Parameter(torch.full_like(p, self.step_size)) for p in backbone.parameters()]
            )

    def backbone_step_sizes(self) -> list[torch.Tensor | float]:
        """The inner step size of each backbone parameter, in ``named_parameters`` order."""
        if self.learned_step_sizes:
            return list(self.backbone_lr)
        return [self.step_size] * len(list(self.backbone.parameters()))

    def adapted(self, support: torch.Tensor, support_labels: torch.Tensor, n_way: int) -> tuple[Params, Head]:
        """The backbone's parameters and the head after the inner loop on the support images."""
        with batch_statistics(self.backbone, track=self.training):
            emb = full_precision(self.embed(support))
        with torch.autocast(support.device.type, enabled=False):
            start = prototype_head(prototypes(emb, support_labels, n_way))
        with batch_statistics(self.backbone):
            return adapt_network(
                self.backbone,
                dict(self.backbone.named_parameters()),
                start,
                support,
                support_labels,
                self.backbone_step_sizes(),
                self.lr_weight,
                self.lr_bias,
                self.inner_l2,
                self.first_order,
            )

    def logits(
        self, support: torch.Tensor, support_labels: torch.Tensor, query: torch.Tensor, n_way: int
    ) -> torch.Tensor:
        if self.test_adapt == "head" and not self.training:
            return super().logits(support, support_labels, query, n_way)  # ANIL's: what the device runs
        params, head = self.adapted(support, support_labels, n_way)
        with batch_statistics(self.backbone):
            emb = full_precision(functional_call(self.backbone, params, (query,)))
        with torch.autocast(query.device.type, enabled=False):
            return head_logits(head, emb)
