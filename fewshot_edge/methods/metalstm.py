"""Meta-learner LSTM (Ravi & Larochelle 2017) over ANIL's Proto-MAML head.

The learner is a linear head on the embeddings, started from the prototypes (``anil.prototype_head``:
W = 2c, b = -|c|^2), so any number of classes works. Its update rule is a coordinate-wise LSTM whose
cell state is the head's parameters theta (W flattened, then b): at each of ``inner_steps`` steps, with
g the gradient and L the value of ``anil.support_loss`` (C times the mean softmax cross-entropy on the
support), every coordinate runs

    x = [pre(g), pre(L), pre(theta), gate_{t-1}]          (7 features; gate_0 = 0)
    i_t = sigmoid(w_i . x_i + b_i),   f_t = sigmoid(w_f . x_f + b_f)
    theta <- f_t * theta - i_t * g

with x_i holding i_{t-1} and x_f holding f_{t-1}: the input gate is a learned step size and the forget
gate a learned decay, one pair of (7 weights, 1 bias) shared by every coordinate and step. ``pre`` is
Andrychowicz et al.'s (2016) preprocessing of a value v into two features with p = ``PREPROCESS_P``:
(log(max(|v|, e^-p)) / p, clip(e^p v, -1, 1)), which is (log|v| / p, sign v) when |v| >= e^-p, else
(-1, e^p v). The gradient and loss features are constants to the outer loop, as in the paper; theta's
are not. The gates start as SGD with step ``step_size`` and decay sigmoid(``forget_bias``) (all 7
weights zero). Departures from the paper: one LSTM layer (the paper puts a 20-unit LSTM before the
gates), theta is preprocessed like the other inputs (head biases -|c|^2 would saturate the gates) and
the head starts from the prototypes rather than a learned theta_0. The device repeats the rule in numpy
(runtime/learned_update.py).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn
from torch.func import grad_and_value

from fewshot_edge.models import Backbone
from fewshot_edge.runtime.errors import FewShotInputError
from fewshot_edge.runtime.learned_update import FEATURES, PREPROCESS_P

from .anil import Head, HeadMethod, support_loss
from .base import register_method


def preprocess(v: torch.Tensor, p: float = PREPROCESS_P) -> torch.Tensor:
    """(..., 2): log(max(|v|, e^-p)) / p and clip(e^p v, -1, 1) (``runtime.learned_update.preprocess``, transposed)."""
    log = torch.log(v.abs().clamp_min(math.exp(-p))) / p
    return torch.stack([log, (math.exp(p) * v).clamp(-1.0, 1.0)], -1)


def learned_update(
    start: Head,
    x: torch.Tensor,
    y: torch.Tensor,
    gate_weight: torch.Tensor,
    gate_bias: torch.Tensor,
    steps: int,
    first_order: bool = False,
) -> Head:
    """The head after ``steps`` steps of the LSTM rule (module docstring); gate_weight (2, 7) and
    gate_bias (2,) hold the input gate's row, then the forget gate's."""
    step = grad_and_value(support_loss)
    n_weight = start["weight"].numel()
    theta = torch.cat([start["weight"].flatten(), start["bias"]])
    gates = theta.new_zeros(len(theta), 2)
    for _ in range(steps):
        head = {"weight": theta[:n_weight].view_as(start["weight"]), "bias": theta[n_weight:]}
        g, loss = step(head, x.detach() if first_order else x, y)
        g_flat = torch.cat([g["weight"].flatten(), g["bias"]])
        if first_order:
            g_flat = g_flat.detach()
        shared = torch.cat([preprocess(g_flat.detach()), preprocess(loss.detach()).expand(len(theta), 2)], 1)
        features = torch.cat([shared, preprocess(theta)], 1)  # (P, 6)
        gates = torch.sigmoid(features @ gate_weight[:, :6].T + gates * gate_weight[:, 6] + gate_bias)
        theta = gates[:, 1] * theta - gates[:, 0] * g_flat
    return {"weight": theta[:n_weight].view_as(start["weight"]), "bias": theta[n_weight:]}


@register_method
class MetaLSTM(HeadMethod):
    """Meta-learner LSTM: a prototype-initialised linear head updated by a learned coordinate-wise LSTM rule."""

    name = "metalstm"
    option_help = {
        "inner_steps": "LSTM update steps of the head (the device repeats them)",
        "step_size": "initial input gate: the step size the rule starts as",
        "forget_bias": "initial forget-gate bias (sigmoid of it is the initial decay; large = none)",
        "first_order": "treat the inner gradients as constants (no second-order terms)",
    }

    def __init__(
        self,
        backbone: Backbone,
        inner_steps: int = 5,
        step_size: float = 0.001,
        forget_bias: float = 5.0,
        first_order: bool = False,
    ) -> None:
        if inner_steps < 0:
            raise FewShotInputError(f"inner_steps must be 0 or more, got {inner_steps}")
        if not 0.0 < step_size < 1.0:
            raise FewShotInputError(f"step_size must be in (0, 1) (it is the input gate's start), got {step_size}")
        super().__init__(
            backbone,
            inner_steps=inner_steps,
            step_size=step_size,
            forget_bias=forget_bias,
            first_order=first_order,
        )
        self.inner_steps = inner_steps
        self.first_order = first_order
        self.gate_weight = nn.Parameter(torch.zeros(2, FEATURES))
        self.gate_bias = nn.Parameter(torch.tensor([math.log(step_size / (1.0 - step_size)), float(forget_bias)]))

    def adapt(self, start: Head, x: torch.Tensor, y: torch.Tensor) -> Head:
        return learned_update(start, x, y, self.gate_weight, self.gate_bias, self.inner_steps, self.first_order)

    def export_info(self) -> dict[str, Any]:
        rule = {
            "steps": self.inner_steps,
            "gate_weight": self.gate_weight.detach().cpu().tolist(),
            "gate_bias": self.gate_bias.detach().cpu().tolist(),
            "preprocess_p": PREPROCESS_P,
        }
        return {"metric": "sqeuclidean", "scale": 1.0, "modes": {"learned-update": rule, "prototype": {}}}
