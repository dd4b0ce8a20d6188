"""Calibrated class probabilities and their uncertainty: predictive entropy and its epistemic part.

A mode scores each query as logits (N, C) of one model, or as logits (N, L, C) of L models drawn from
a distribution over models (the ``bayes`` mode's samples of its class heads). The calibrated
temperature T divides every model's logits, and the predictive distribution is the mean of their
softmaxes (for L = 1, the softmax). All figures are in nats (natural logarithms):

    entropy    H[p]                                p = mean_l softmax(z_l / T), in [0, log C]
    epistemic  H[p] - mean_l H[softmax(z_l / T)]   the mutual information between the label and the
               model, in [0, entropy]; the rest is the aleatoric part. None for one model.
"""

from __future__ import annotations

import numpy as np


def log_softmax(z: np.ndarray) -> np.ndarray:
    """log softmax over the last axis, without overflow."""
    z = z - z.max(axis=-1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


def log_predictive(logits: np.ndarray, temperature: float | np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
    """log p (N, C) of logits (N, C) or (N, L, C) at ``temperature`` (one, or one per query (N,)), and
    for sampled logits each model's log softmax (N, L, C) (else None); exact in log space, so no
    probability underflows to 0."""
    z = np.asarray(logits, dtype=np.float64)
    t = np.asarray(temperature, dtype=np.float64)
    z = z / t.reshape(t.shape + (1,) * (z.ndim - t.ndim))
    if z.ndim == 2:
        return log_softmax(z), None
    log_each = log_softmax(z)
    top = log_each.max(axis=1, keepdims=True)
    log_mean = np.log(np.exp(log_each - top).mean(axis=1)) + top[:, 0]
    return log_mean, log_each


def entropy(log_p: np.ndarray) -> np.ndarray:
    """Entropy in nats over the last axis of distributions given as log probabilities."""
    return -(np.exp(log_p) * log_p).sum(axis=-1)


def predictive(logits: np.ndarray, temperature: float | np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Probabilities (N, C), entropy (N,) and epistemic part (N,) or None, of logits (N, C) or (N, L, C)
    at ``temperature`` (see the module docstring)."""
    log_p, log_each = log_predictive(logits, temperature)
    total = entropy(log_p)
    epistemic = None if log_each is None else np.maximum(total - entropy(log_each).mean(axis=1), 0.0)
    return np.exp(log_p), total, epistemic
