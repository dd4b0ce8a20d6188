"""The ``matching`` mode: Matching Networks' attention over every stored shot (no class means).

With the stored shot embeddings k_i (S, D) of classes y_i and a query's embedding q, scale s (the
bundle's ``embedding.scale``):

    logit_c(q) = log sum_{i: y_i = c} exp(s * cos(q, k_i))     (softmax over c = the attention mass on c)
    distance(q) = 1 - max_{i: y_i = c*} cos(q, k_i),  c* = argmax_c logit_c(q)
    shots(q) = the number of shots of c*

The distance (the nearest shot of the predicted class, in cosine distance) is what the open-set
threshold is calibrated on. Without full-context embeddings (``fce`` false) k_i are the stored
embeddings, so ``add`` appends new shots as keys, no refit. With ``fce`` the keys are the bundle's
"fce_support" graph over every stored embedding in store order, and each query goes through its
"fce_query" graph with those keys first: any enrollment change refits (``add`` returns False).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from .adapters import Adapter, register
from .bundle import Bundle
from .engine import Engine
from .graph import GraphEngine
from .store import Shots

FCE_GRAPHS = {"fce_support": ("support",), "fce_query": ("queries", "keys")}


def unit_rows(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length (float64; a zero row stays zero)."""
    x = np.asarray(x, dtype=np.float64)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def class_logsumexp(scores: np.ndarray, targets: np.ndarray, n_classes: int) -> np.ndarray:
    """(N, C): per class, log of the summed exp(scores) over its columns (``targets`` gives each column's class)."""
    top = scores.max(axis=1, keepdims=True)
    onehot = np.zeros((len(targets), n_classes))
    onehot[np.arange(len(targets)), targets] = 1.0
    with np.errstate(divide="ignore"):  # a class without shots is -inf
        return np.log(np.exp(scores - top) @ onehot) + top


@register
class MatchingAdapter(Adapter):
    """Attention over all stored shots (see the module docstring); incremental without ``fce``."""

    name = "matching"

    def __init__(self, bundle: Bundle, encoder: Engine, overrides: Mapping[str, Any] | None = None) -> None:
        super().__init__(bundle, encoder, overrides)
        self.fce = bool(self.params.get("fce", False))
        self._graphs = (
            {
                role: GraphEngine(bundle.file(role), encoder.providers, encoder.threads, names)
                for role, names in FCE_GRAPHS.items()
            }
            if self.fce
            else {}
        )
        self._shots = np.zeros((0, self.embedding.size), dtype=np.float32)
        self._targets = np.zeros(0, dtype=np.int64)
        self._update_keys()

    def graph(self, role: str) -> Callable[..., Any] | None:
        engine = self._graphs.get(role)
        return engine.run if engine is not None else None

    def fit(self, shots: Shots, state: Mapping[str, np.ndarray] | None = None) -> None:
        self.labels = list(shots.labels)
        self._shots = shots.embeddings.reshape(-1, self.embedding.size).astype(np.float32)
        self._targets = shots.targets.astype(np.int64)
        self._update_keys()

    def add(self, label: str, embeddings: np.ndarray, pixels: np.ndarray) -> bool:
        if self.fce:
            return False
        if label not in self.labels:
            self.labels.append(label)
        self._shots = np.vstack([self._shots, embeddings.astype(np.float32)])
        self._targets = np.append(self._targets, np.full(len(embeddings), self.labels.index(label)))
        self._update_keys()
        return True

    def score(self, queries: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        if self.fce:
            queries = self._graphs["fce_query"].run(queries, self._keys)[0]
        cosines = unit_rows(queries) @ self._unit_keys.T  # (N, S)
        logits = class_logsumexp(self.embedding.scale * cosines, self._targets, len(self.labels))
        predicted = logits.argmax(axis=1)
        members = self._targets[None, :] == predicted[:, None]
        distance = 1.0 - np.where(members, cosines, -np.inf).max(axis=1)
        counts = np.bincount(self._targets, minlength=len(self.labels))
        return logits, distance, counts[predicted].astype(np.int64)

    def _update_keys(self) -> None:
        """The keys: the stored embeddings, or with ``fce`` the support graph's encoding of all of them."""
        fce = self.fce and len(self._shots) > 0
        self._keys = self._graphs["fce_support"].run(self._shots)[0] if fce else self._shots
        self._unit_keys = unit_rows(self._keys)
