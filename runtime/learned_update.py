"""The ``learned-update`` mode: the meta-learner LSTM's update rule (Ravi & Larochelle 2017) in numpy, the
device's copy of ``fewshot_edge.methods.metalstm.learned_update``.

A linear head (W (C, D), b (C,)) starts from the prototypes (W = 2c, b = -|c|^2); its parameters theta
(W flattened, then b) are the cell state of a coordinate-wise LSTM. With g the gradient and L the value of
C times the mean softmax cross-entropy on the stored shots (``finetune.support_gradient``), each of the
``steps`` steps runs, for every coordinate,

    x = [pre(g), pre(L), pre(theta), gate_{t-1}]          (gate_0 = 0)
    i, f = sigmoid(x . gate_weight[k] + gate_bias[k])      (k = 0: input gate, reading i_{t-1};
                                                            k = 1: forget gate, reading f_{t-1})
    theta <- f * theta - i * g

where pre(v) = (log(max(|v|, e^-p)) / p, clip(e^p v, -1, 1)) with p = ``preprocess_p``. The manifest's
mode parameters hold ``steps``, ``gate_weight`` (2, 7), ``gate_bias`` (2,) and ``preprocess_p``. Computed in
float64, so it matches PyTorch's float32 rule to float32 rounding. Any enrollment change refits (``add``
returns False): the rule reads every shot's gradient; the head is the state the store keeps.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from .adapters import HeadAdapter, register
from .bundle import Bundle
from .engine import Engine
from .errors import FewShotInputError
from .finetune import prototype_head, support_gradient

FEATURES = 7  # pre(g), pre(L), pre(theta), the gate's previous value
PREPROCESS_P = 10.0


def preprocess(v: np.ndarray | float, p: float = PREPROCESS_P, out: np.ndarray | None = None) -> np.ndarray:
    """(2, ...): log(max(|v|, e^-p)) / p and clip(e^p v, -1, 1), float64, written into ``out`` when given."""
    v = np.asarray(v, dtype=np.float64)
    out = np.empty((2, *v.shape)) if out is None else out
    log, scaled = out[0, ...], out[1, ...]  # views, also for a single value
    np.log(np.maximum(np.abs(v, out=log), np.exp(-p), out=log), out=log)
    log /= p
    np.clip(np.multiply(v, np.exp(p), out=scaled), -1.0, 1.0, out=scaled)
    return out


def gate(z: np.ndarray, out: np.ndarray) -> np.ndarray:
    """sigmoid(z) = (1 + tanh(z / 2)) / 2 into ``out``: no overflow, and 0 and 1 exactly far out."""
    np.tanh(np.multiply(z, 0.5, out=out), out=out)
    out *= 0.5
    out += 0.5
    return out


@dataclass(frozen=True)
class UpdateRule:
    """The learned rule's parameters: steps, gate_weight (2, FEATURES), gate_bias (2,), preprocess_p."""

    steps: int
    gate_weight: np.ndarray
    gate_bias: np.ndarray
    preprocess_p: float = PREPROCESS_P

    @classmethod
    def from_params(cls, params: Mapping[str, Any]) -> UpdateRule:
        """The rule from a manifest's mode parameters; a one-line FewShotInputError when they are unusable."""
        steps = params.get("steps")
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
            raise FewShotInputError(f"learned-update steps must be a whole number, 0 or more, got {steps!r}")
        try:
            weight = np.asarray(params["gate_weight"], dtype=np.float64)
            bias = np.asarray(params["gate_bias"], dtype=np.float64)
            p = float(params.get("preprocess_p", PREPROCESS_P))
        except (KeyError, TypeError, ValueError) as exc:
            raise FewShotInputError(f"bundle's learned-update parameters are unusable: {exc!r}") from None
        if weight.shape != (2, FEATURES) or bias.shape != (2,) or not p > 0:
            raise FewShotInputError(
                f"bundle's learned-update parameters are unusable: gate_weight must be (2, {FEATURES}), gate_bias (2,)"
                f" and preprocess_p positive, got {weight.shape}, {bias.shape} and {p}"
            )
        return cls(steps, weight, bias, p)


def learned_update(x: np.ndarray, y: np.ndarray, protos: np.ndarray, rule: UpdateRule) -> tuple[np.ndarray, np.ndarray]:
    """The adapted head (W (C, D), b (C,)) float64 for support embeddings x (n, D) with classes y (n,) in
    0..C-1 and prototypes (C, D), after ``rule.steps`` steps of the rule (module docstring)."""
    x = np.asarray(x, dtype=np.float64)
    w, b = prototype_head(protos)
    if not len(x):
        return w, b
    shape, onehot, p, weight = w.shape, np.eye(len(w))[y], rule.preprocess_p, rule.gate_weight
    theta = np.concatenate([w.ravel(), b])
    # the per-coordinate arrays are written in place: fresh ones of this size cost more (page faults) than the arithmetic
    g, features = np.empty_like(theta), np.empty((4, len(theta)))  # features: pre(g), pre(theta)
    z, gates = np.empty((2, len(theta))), np.zeros((2, len(theta)))  # gates: input, forget
    for _ in range(rule.steps):
        gw, gb, loss = support_gradient(x, onehot, theta[: w.size].reshape(shape), theta[w.size :])
        g[: w.size], g[w.size :] = gw.ravel(), gb
        preprocess(g, p, out=features[0:2])
        preprocess(theta, p, out=features[2:4])
        np.matmul(weight[:, [0, 1, 4, 5]], features, out=z)
        z += np.multiply(gates, weight[:, 6:7], out=gates)  # the gates' previous values
        z += weight[:, 2:4] @ preprocess(loss, p)[:, None] + rule.gate_bias[:, None]  # one loss for every coordinate
        gate(z, out=gates)
        theta *= gates[1]
        theta -= np.multiply(gates[0], g, out=g)
    return theta[: w.size].reshape(shape), theta[w.size :]


@register
class LearnedUpdateAdapter(HeadAdapter):
    """A prototype-initialised linear head updated by the bundle's learned LSTM rule (module docstring)."""

    name = "learned-update"

    def __init__(self, bundle: Bundle, encoder: Engine, overrides: Mapping[str, Any] | None = None) -> None:
        super().__init__(bundle, encoder, overrides)
        self.rule = UpdateRule.from_params(self.params)

    def fit_head(self, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return learned_update(x, y, self.prototypes, self.rule)
