"""The fine-tune inner loop in numpy: the device's copy of ``fewshot_edge.methods.anil.adapt_head``.

A linear head (W (C, D), b (C,)) starts from the prototypes (W = 2c, b = -|c|^2) and takes one
gradient step per entry of the learned schedule on C times the mean softmax cross-entropy of the n
support embeddings plus ``l2 / 2 * |head - start|^2``:
    P = softmax(X W^T + b),  G = C (P - onehot(y)) / n
    W <- W - lr_weight[t] * (G^T X + l2 (W - W0)),   b <- b - lr_bias[t] * (sum_i G_i + l2 (b - b0))
``lr_weight[t]`` is one step size or one per embedding dimension. Computed in float64, so it
matches PyTorch's float32 loop to float32 rounding. Deterministic: no randomness, fixed order.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from .errors import FewShotInputError


def prototype_head(protos: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(W, b) = (2c, -|c|^2) for prototypes c (C, D), in float64."""
    c = np.asarray(protos, dtype=np.float64)
    return 2.0 * c, -(c * c).sum(1)


def schedule(
    lr_weight: Sequence[Sequence[float]], lr_bias: Sequence[float], steps: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """The step sizes (steps, 1 or D) and (steps,) for ``steps`` steps (default: as trained); steps past
    the trained ones repeat the last trained step size."""
    w, b = np.asarray(lr_weight, dtype=np.float64), np.asarray(lr_bias, dtype=np.float64)
    trained = len(b)
    if w.ndim != 2 or len(w) != trained:
        raise FewShotInputError(
            f"lr_weight must be (steps, 1 or D) with one row per lr_bias entry, got {w.shape} and {b.shape}"
        )
    steps = trained if steps is None else steps
    if steps < 0:
        raise FewShotInputError(f"steps must be 0 or more, got {steps}")
    if steps > trained and trained == 0:
        raise FewShotInputError("this model learned no fine-tune steps, so it has no step size to repeat")
    keep = np.minimum(np.arange(steps), trained - 1)
    return w[keep], b[keep]


def finetune_head(
    x: np.ndarray, y: np.ndarray, protos: np.ndarray, lr_weight: np.ndarray, lr_bias: np.ndarray, l2: float = 0.0
) -> tuple[np.ndarray, np.ndarray]:
    """The adapted head (W (C, D), b (C,)) float64 for support embeddings x (n, D) with classes y (n,) in
    0..C-1 and prototypes (C, D), one step per row of the ``schedule``."""
    x = np.asarray(x, dtype=np.float64)
    w0, b0 = prototype_head(protos)
    w, b = w0.copy(), b0.copy()
    if not len(x):
        return w, b
    onehot = np.eye(len(w0))[y]
    for lr_w, lr_b in zip(lr_weight, lr_bias, strict=True):
        gw, gb, _ = support_gradient(x, onehot, w, b)
        w, b = w - lr_w * (gw + l2 * (w - w0)), b - lr_b * (gb + l2 * (b - b0))
    return w, b


def support_gradient(
    x: np.ndarray, onehot: np.ndarray, w: np.ndarray, b: np.ndarray
) -> tuple[np.ndarray, np.ndarray, float]:
    """The gradient (dW (C, D), db (C,)) and the value of C times the mean softmax cross-entropy of the head
    (w, b) on embeddings x (n, D), n >= 1, with one-hot targets (n, C): ``anil.support_loss`` in numpy."""
    logits = x @ w.T + b
    z = logits - logits.max(1, keepdims=True)
    log_p = z - np.log(np.exp(z).sum(1, keepdims=True))
    scale = len(w) / len(x)
    g = (np.exp(log_p) - onehot) * scale
    return g.T @ x, g.sum(0), float(-scale * (onehot * log_p).sum())
