"""VERSA (Gordon et al. 2019, "Meta-Learning Probabilistic Inference for Prediction"): amortised
variational inference over each class's linear head on a shared feature extractor.

The backbone embeds shots and queries (D values). The amortisation network maps each class on its own
to a Gaussian over its head: the class's shot embeddings are mean-pooled (the paper's instance pooling)
to h_c, and two MLPs (``hidden`` ReLU units) give the mean and the log-variance of the weight vector
w_c (D) and bias b_c. The weight mean is h_c plus its MLP's output, so training starts from a linear
head whose weights are the class means (a residual; the paper's MLP gives the mean alone), and the
log-variance MLP's output starts at ``INITIAL_LOG_VARIANCE`` (small, so early steps are not noise).

By the local reparameterisation trick a query's logit for class c is Gaussian (mean mu_w.x + mu_b,
variance (x*x).var_w + var_b); ``sampled_logits`` draws L = ``samples`` of them. The predictive is the
mean of their softmaxes; ``logits`` returns its log, so cross-entropy on them is the paper's objective
(the query log-likelihood under the amortised predictive, no KL term). Training draws fresh noise per
query, sample and class; evaluation uses the fixed draw ``runtime.bayes.noise`` shared by every query,
as the device's ``bayes`` mode does (its docstring says why), so PyTorch and the device agree.
The amortisation network exports as the graph "amortise".
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from fewshot_edge.models import Backbone
from fewshot_edge.runtime.bayes import AMORTISE_INPUTS, AMORTISE_OUTPUTS, check_samples, noise
from fewshot_edge.runtime.errors import FewShotInputError

from .base import ExportGraph, FewShotMethod, register_method
from .protonet import prototypes

INITIAL_LOG_VARIANCE = -6.0


class Amortiser(nn.Module):
    """Class means h (K, D) -> weight mean (K, D), bias mean (K,), weight and bias log-variance."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()

        def mlp() -> nn.Sequential:
            return nn.Sequential(nn.Linear(dim, hidden), nn.ReLU(), nn.Linear(hidden, dim + 1))

        self.mean, self.log_variance = mlp(), mlp()
        nn.init.zeros_(self.log_variance[-1].weight)
        nn.init.constant_(self.log_variance[-1].bias, INITIAL_LOG_VARIANCE)

    def forward(self, classes: torch.Tensor) -> tuple[torch.Tensor, ...]:
        mean, log_variance = self.mean(classes), self.log_variance(classes)
        return classes + mean[:, :-1], mean[:, -1], log_variance[:, :-1], log_variance[:, -1]


def log_predictive(sampled: torch.Tensor) -> torch.Tensor:
    """(Q, L, C) sampled logits -> (Q, C) log of the mean of their softmaxes."""
    return torch.logsumexp(torch.log_softmax(sampled, dim=-1), dim=1) - math.log(sampled.size(1))


@register_method
class Versa(FewShotMethod):
    """A Gaussian linear head per class, amortised from its shots; predictions average L sampled heads."""

    name = "versa"
    option_help = {
        "hidden": "hidden units of the amortisation MLPs (mean and log-variance)",
        "samples": "logit samples per query (even: antithetic pairs), in training and on the device",
        "seed": "seed of the fixed draw used in evaluation and by the device's bayes mode",
    }

    def __init__(self, backbone: Backbone, hidden: int = 256, samples: int = 16, seed: int = 0) -> None:
        check_samples(samples)
        if hidden < 1 or seed < 0:
            raise FewShotInputError(f"versa needs hidden >= 1 and seed >= 0, got hidden={hidden}, seed={seed}")
        super().__init__(backbone, hidden=hidden, samples=samples, seed=seed)
        self.amortiser = Amortiser(backbone.out_dim, hidden)

    def logits(
        self, support: torch.Tensor, support_labels: torch.Tensor, query: torch.Tensor, n_way: int
    ) -> torch.Tensor:
        emb = self.embed(torch.cat([support, query])).float()
        return log_predictive(self.sampled_logits(emb[: len(support)], support_labels, emb[len(support) :], n_way))

    def sampled_logits(
        self, support: torch.Tensor, support_labels: torch.Tensor, query: torch.Tensor, n_way: int
    ) -> torch.Tensor:
        """(Q, L, n_way) logit samples of embeddings: fresh noise in training, the fixed draw in eval."""
        weight_mean, bias_mean, weight_log_var, bias_log_var = self.amortiser(
            prototypes(support, support_labels, n_way)
        )
        mean = query @ weight_mean.T + bias_mean
        std = torch.sqrt(query.square() @ weight_log_var.exp().T + bias_log_var.exp())
        samples = self.options["samples"]
        if self.training:
            eps = torch.randn(len(query), samples, n_way, device=query.device)
        else:
            eps = torch.from_numpy(noise(samples, n_way, self.options["seed"])).float().to(query.device)[None]
        return mean[:, None, :] + std[:, None, :] * eps

    def export_info(self) -> dict[str, Any]:
        bayes = {
            "samples": self.options["samples"],
            "seed": self.options["seed"],
            "head": "Gaussian linear head per class from the amortise graph of its mean shot embedding",
        }
        return {"metric": "sqeuclidean", "scale": 1.0, "modes": {"bayes": bayes}}

    def export_graphs(self) -> list[ExportGraph]:
        """ "amortise": ``classes`` (K, D) mean shot embeddings -> each class's head mean and log-variance."""
        classes = {0: "classes"}
        axes = {name: classes for name in (*AMORTISE_INPUTS, *AMORTISE_OUTPUTS)}
        return [
            ExportGraph(
                "amortise",
                self.amortiser,
                lambda images: (self.embed(images).float(),),
                AMORTISE_INPUTS,
                AMORTISE_OUTPUTS,
                axes,
            )
        ]
