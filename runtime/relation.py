"""The ``relation`` mode: the bundle's relation module (role "relation") scores every (query, class) pair.

The store keeps each shot's flattened feature maps (the encoder's output, C*h*w values); a class's
feature is the mean of its shots', kept as sums and counts (as ``PrototypeAdapter``), so ``add`` updates
it without rereading the store. ``score`` reshapes queries and class features to the graph's (C, h, w)
and runs queries x classes through it, as many queries per run as keep the pairs under ``MAX_PAIRS``:

    logits = z (Q, K), the relation logits;  c* = argmax_c z_c
    distance = 1 - sigmoid(z_c*)   (1 - the best relation score: in [0, 1], larger = farther)
    shots = the number of shots of c*

The embedding spec's metric is not used by this mode.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from .adapters import PrototypeAdapter, register
from .bundle import Bundle
from .engine import Engine
from .errors import FewShotInputError
from .graph import GraphEngine

MAX_PAIRS = 2048  # (query, class) pairs per run of the relation graph: bounds its memory


def sigmoid(z: np.ndarray) -> np.ndarray:
    """1 / (1 + exp(-z)), without overflow."""
    return np.exp(-np.logaddexp(0.0, -z))


@register
class RelationAdapter(PrototypeAdapter):
    """Relation scores of queries against class-mean feature maps (see the module docstring)."""

    name = "relation"

    def __init__(self, bundle: Bundle, encoder: Engine, overrides: Mapping[str, Any] | None = None) -> None:
        super().__init__(bundle, encoder, overrides)
        self.relation = GraphEngine(bundle.file("relation"), encoder.providers, encoder.threads, ("queries", "classes"))
        shape = self.relation.input_shapes[0][1:]
        dims = tuple(d for d in shape if d is not None)
        if len(dims) != len(shape) or int(np.prod(dims)) != self.embedding.size:
            raise FewShotInputError(
                f"bundle's relation graph takes feature maps {shape}, which do not hold its {self.embedding.size}-value embeddings"
            )
        self.map_shape = dims

    def graph(self, role: str) -> Callable[..., Any] | None:
        return self.relation.run if role == "relation" else None

    def score(self, queries: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        classes = self.prototypes.reshape(-1, *self.map_shape)
        maps = queries.astype(np.float32).reshape(-1, *self.map_shape)
        step = max(1, MAX_PAIRS // len(classes))
        z = np.concatenate([self.relation.run(maps[i : i + step], classes)[0] for i in range(0, len(maps), step)])
        best = z.argmax(axis=1)
        rows = np.arange(len(z))
        return (
            z.astype(np.float64),
            1.0 - sigmoid(z[rows, best].astype(np.float64)),
            self._counts[best].astype(np.int64),
        )
