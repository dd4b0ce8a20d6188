"""The sequence adaptation mode: an exported sequence model (MANN, set-Transformer) reads the stored
shots with their labels, then answers the queries.

The mode's manifest parameters say how (``form``) and how many classes it can read (``max_way``: its
model has that many trained label slots; class i, in enrollment order, takes slot i, and the logits
are the first C slot columns for C enrolled classes):

- ``recurrent`` (MANN): the graph of role ``write_role`` ("sequence_write") takes ``state`` (P,),
  one shot's ``embedding`` (D,) and its slot ``label`` (a scalar) and gives the next state; the
  shots are written one at a time in insertion order (shot id), from an all-zero state of
  ``state_size`` values, so the order of enrollment matters. An enrolled shot is written on top of
  the state (``add``), no refit. The graph of role ``read_role`` ("sequence") takes ``state`` and
  ``queries`` (Q, D) and gives logits (Q, max_way).
- ``set`` (set-Transformer): the ``read_role`` graph takes every shot's embedding (``support`` (S, D)),
  their slots (``labels`` (S,)) and the ``queries`` (Q, D); the order of the shots does not
  matter to it. Enrolling appends shots, no refit.

Every input is float32 (``GraphEngine``), slots too: whole numbers, cast inside the graphs.

The open-set test is the prototype mode's: the distance to the nearest class mean of the shot
embeddings, in the bundle's metric, and that class's number of shots.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from .adapters import Adapter, distances, register
from .bundle import Bundle
from .engine import Engine
from .errors import FewShotInputError
from .graph import GraphEngine
from .store import Shots

FORMS = {  # form -> the read graph's inputs
    "recurrent": ("state", "queries"),
    "set": ("support", "labels", "queries"),
}
WRITE_INPUTS = ("state", "embedding", "label")


@register
class SequenceAdapter(Adapter):
    """A sequence model over the stored shots in insertion order (see the module docstring)."""

    name = "sequence"

    def __init__(self, bundle: Bundle, encoder: Engine, overrides: Mapping[str, Any] | None = None) -> None:
        super().__init__(bundle, encoder, overrides)
        self.form = self.params.get("form")
        if self.form not in FORMS:
            raise FewShotInputError(
                f"bundle's sequence mode has form {self.form!r}; this runtime reads: {', '.join(FORMS)}"
            )
        self.max_way = _positive(self.params.get("max_way"), "max_way")
        self.roles = {"read": str(self.params.get("read_role", "sequence"))}
        self.reader = GraphEngine(bundle.file(self.roles["read"]), encoder.providers, encoder.threads, FORMS[self.form])
        self.state_size = 0
        if self.form == "recurrent":
            self.state_size = _positive(self.params.get("state_size"), "state_size")
            self.roles["write"] = str(self.params.get("write_role", "sequence_write"))
            self.writer = GraphEngine(
                bundle.file(self.roles["write"]), encoder.providers, encoder.threads, WRITE_INPUTS
            )
        empty = np.zeros((0, self.embedding.size), dtype=np.float32)
        self.fit(Shots(np.zeros(0, np.int64), [], np.zeros(0, np.int64), empty, None, 0))

    def graph(self, role: str) -> Callable[..., Any] | None:
        if role == self.roles["read"]:
            return self.reader.run
        return self.writer.run if role == self.roles.get("write") else None

    def fit(self, shots: Shots, state: Mapping[str, np.ndarray] | None = None) -> None:
        self.admit(len(shots.labels))
        order = np.argsort(shots.ids, kind="stable")  # insertion order: shot ids grow as shots are stored
        self.labels = list(shots.labels)
        self.support = np.zeros((0, self.embedding.size), dtype=np.float32)
        self.slots = np.zeros(0, dtype=np.int64)
        self.memory = np.zeros(self.state_size, dtype=np.float32)
        self._take(shots.embeddings[order].reshape(-1, self.embedding.size), shots.targets[order])

    def add(self, label: str, embeddings: np.ndarray, pixels: np.ndarray) -> bool:
        slot = self.labels.index(label) if label in self.labels else len(self.labels)
        self.admit(slot + 1)
        if slot == len(self.labels):
            self.labels.append(label)
        self._take(embeddings, np.full(len(embeddings), slot, dtype=np.int64))
        return True

    def score(self, queries: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        if self.form == "recurrent":
            (logits,) = self.reader.run(self.memory, queries)
        else:
            (logits,) = self.reader.run(self.support, self.slots, queries)
        d = distances(queries, self.prototypes, self.embedding.metric)
        nearest = d.argmin(axis=1)
        return logits[:, : len(self.labels)].astype(np.float64), d[np.arange(len(d)), nearest], self.counts[nearest]

    def admit(self, classes: int) -> None:
        """Refuse more classes than the model has label slots."""
        if classes > self.max_way:
            raise FewShotInputError(
                f"the sequence mode reads at most {self.max_way} classes (its model was trained with"
                f" {self.max_way} label slots), not {classes}: remove a class or use another adaptation mode"
            )

    def _take(self, embeddings: np.ndarray, slots: np.ndarray) -> None:
        """Append shots in order (a recurrent model writes each into its state); update the class means."""
        embeddings = np.ascontiguousarray(embeddings, dtype=np.float32)
        self.support = np.concatenate([self.support, embeddings])
        self.slots = np.concatenate([self.slots, slots.astype(np.int64)])
        for embedding, slot in zip(embeddings, slots, strict=True) if self.form == "recurrent" else ():
            (written,) = self.writer.run(self.memory, embedding, np.float32(slot))
            self.memory = written.reshape(self.state_size)
        n = len(self.labels)
        self.counts = np.bincount(self.slots, minlength=n).astype(np.int64)
        sums = np.zeros((n, self.embedding.size), dtype=np.float64)
        np.add.at(sums, self.slots, self.support)
        self.prototypes = (sums / np.maximum(self.counts, 1)[:, None]).astype(np.float32)


def _positive(value: object, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise FewShotInputError(f"bundle's sequence mode needs a positive whole number {name}, got {value!r}")
    return value
