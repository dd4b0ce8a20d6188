"""Adaptation modes: small classes behind one interface, found by name in ``ADAPTERS``.

A mode is built from the bundle (its parameters are ``manifest.adaptation.modes[name]``) and the
encoder engine; it is fitted from the stored shots, may take newly enrolled shots in incrementally,
and scores query embeddings as logits (before the calibrated temperature) plus the distance to the
nearest prototype and that class's number of shots, which the model compares with the open-set
threshold for that many shots.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from typing import Any, ClassVar

import numpy as np

from .bundle import Bundle, EmbeddingSpec
from .engine import ContextEngine, Engine
from .errors import FewShotInputError
from .finetune import finetune_head, schedule
from .preprocess import normalize
from .store import Shots


class Adapter(ABC):
    """One adaptation mode. Subclasses set ``name``; ``needs_pixels`` when ``fit`` reads the stored
    preprocessed inputs (a mode that conditions the encoder on the shots, like FiLM, does);
    ``options`` the parameters a user may override at open; ``persistent`` when what ``fit``
    computes is worth keeping in the store (``state``), so a restart need not compute it again."""

    name: ClassVar[str]
    needs_pixels: ClassVar[bool] = False
    options: ClassVar[tuple[str, ...]] = ()
    persistent: ClassVar[bool] = False

    def __init__(self, bundle: Bundle, encoder: Engine, overrides: Mapping[str, Any] | None = None) -> None:
        self.bundle = bundle
        self.encoder = encoder
        self.embedding: EmbeddingSpec = bundle.manifest.embedding
        unknown = sorted(set(overrides or {}) - set(self.options))
        if unknown:
            allowed = f"it takes: {', '.join(self.options)}" if self.options else "it takes none"
            raise FewShotInputError(f"adaptation mode {self.name!r} has no option {unknown[0]!r} ({allowed})")
        self.params = {**bundle.manifest.adaptation.modes[self.name], **(overrides or {})}
        self.labels: list[str] = []
        self.identity = _identity_film(bundle, encoder)

    @property
    def state_key(self) -> str:
        """Names what ``state`` depends on besides the enrolled set: the mode and its parameters."""
        params = json.dumps(self.params, sort_keys=True, default=str)
        return f"{self.name}:{hashlib.sha256(params.encode()).hexdigest()[:16]}"

    def state(self) -> dict[str, np.ndarray]:
        """What ``fit`` computed that ``fit(shots, state)`` can take back instead of computing it."""
        return {}

    def embed(self, batch: np.ndarray) -> np.ndarray:
        """Query embeddings for a normalised batch (N, C, H, W); a FiLM encoder runs under the identity
        FiLM (the unconditioned backbone); modes that condition it override this."""
        return self.encoder.embed(batch, self.identity)

    def condition(self, support: np.ndarray) -> None:  # noqa: B027 (a no-op unless the mode conditions the encoder)
        """Condition ``embed`` on normalised support images (S, C, H, W), every enrolled shot, as ``fit``
        does for a mode that ``needs_pixels``; the encoder of the other modes ignores the shots."""

    @abstractmethod
    def fit(self, shots: Shots, state: Mapping[str, np.ndarray] | None = None) -> None:
        """Fit from every stored shot (possibly none); sets ``labels``, the order of the logits' columns.
        A persistent mode given the ``state`` it saved for these very shots uses it instead of refitting."""

    def add(self, label: str, embeddings: np.ndarray, pixels: np.ndarray) -> bool:
        """Take newly enrolled shots in without a full refit; return False when the mode needs one."""
        return False

    def admit(self, classes: int) -> None:  # noqa: B027 (no limit unless the mode has one)
        """Raise FewShotInputError when the mode cannot hold ``classes`` enrolled classes; the model asks
        before it writes an enrollment, so a class the mode could never read is not stored."""

    def graph(self, role: str) -> Callable[..., Any] | None:
        """What this mode runs the bundle's graph ``role`` with (the graph's inputs in order -> its
        output, or a tuple of outputs), so export checks that very runner; None when it runs no such graph."""
        return None

    @abstractmethod
    def score(self, queries: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Logits (N, C) before temperature (or (N, L, C), L sampled models' logits, for a mode with a
        distribution over models: ``uncertainty.predictive``), each query's nearest-prototype distance
        (N,) and the number of shots of that nearest class (N,) int."""


ADAPTERS: dict[str, type[Adapter]] = {}


def _identity_film(bundle: Bundle, encoder: Engine) -> np.ndarray | None:
    """The film vector (F,) that leaves a FiLM encoder unconditioned (the film mode's ``identity``), or
    None for a plain encoder."""
    if not encoder.takes_film:
        return None
    identity = bundle.manifest.adaptation.modes.get("film", {}).get("identity")
    if identity is None:
        raise FewShotInputError("the encoder takes a FiLM input but the bundle's film mode records no identity FiLM")
    return np.asarray(identity, dtype=np.float32)


def register(cls: type[Adapter]) -> type[Adapter]:
    """Class decorator: make a mode available under its ``name``."""
    ADAPTERS[cls.name] = cls
    return cls


def distances(queries: np.ndarray, prototypes: np.ndarray, metric: str) -> np.ndarray:
    """(N, C) distances: squared Euclidean, or 1 - cosine similarity for the cosine metric."""
    if metric == "cosine":
        return 1.0 - _unit(queries) @ _unit(prototypes).T
    d = (queries * queries).sum(1, keepdims=True) - 2.0 * queries @ prototypes.T + (prototypes * prototypes).sum(1)
    return np.maximum(d, 0.0)


def logits_from_distances(d: np.ndarray, embedding: EmbeddingSpec) -> np.ndarray:
    """-scale * squared distance, or scale * cosine similarity."""
    return embedding.scale * (1.0 - d) if embedding.metric == "cosine" else -embedding.scale * d


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


@register
class PrototypeAdapter(Adapter):
    """Prototypical networks: each class is the mean of its shot embeddings, kept as sums and counts
    so added shots update it without rereading the store."""

    name = "prototype"

    def fit(self, shots: Shots, state: Mapping[str, np.ndarray] | None = None) -> None:
        n_classes = len(shots.labels)
        self._sums = np.zeros((n_classes, self.embedding.size), dtype=np.float64)
        np.add.at(self._sums, shots.targets, shots.embeddings.reshape(-1, self.embedding.size))
        self._counts = np.bincount(shots.targets, minlength=n_classes).astype(np.float64)
        self.labels = list(shots.labels)
        self._update_prototypes()

    def add(self, label: str, embeddings: np.ndarray, pixels: np.ndarray) -> bool:
        if label in self.labels:
            i = self.labels.index(label)
            self._sums[i] += embeddings.sum(0)
            self._counts[i] += len(embeddings)
        else:
            self.labels.append(label)
            self._sums = np.vstack([self._sums, embeddings.sum(0, dtype=np.float64)])
            self._counts = np.append(self._counts, len(embeddings))
        self._update_prototypes()
        return True

    def score(self, queries: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        d = distances(queries, self.prototypes, self.embedding.metric)
        nearest = d.argmin(axis=1)
        return (
            logits_from_distances(d, self.embedding),
            d[np.arange(len(d)), nearest],
            self._counts[nearest].astype(np.int64),
        )

    def _update_prototypes(self) -> None:
        self.prototypes = (self._sums / np.maximum(self._counts, 1.0)[:, None]).astype(np.float32)


@register
class FilmAdapter(PrototypeAdapter):
    """FiLM-conditioned prototypes: the bundle's context graph (role "context") turns ALL stored
    shots' normalised pixels into one film vector (F,), the encoder's second input; the support is
    re-embedded under it, classes are the means of those embeddings (as ``PrototypeAdapter``) and
    queries are embedded under the same film.

    Any enrollment change needs a refit (``add`` returns False), so the context runs once per
    change, never per query. The embeddings the store keeps are ``embed`` at enrollment time (the
    current film, or before the first fit the identity film): this mode ignores them and re-embeds
    the pixels at every fit. An empty store leaves the identity film and no classes.
    """

    name = "film"
    needs_pixels = True

    def __init__(self, bundle: Bundle, encoder: Engine, overrides: Mapping[str, Any] | None = None) -> None:
        super().__init__(bundle, encoder, overrides)
        if self.identity is None:
            raise FewShotInputError(
                f"adaptation mode 'film' needs a FiLM encoder; {encoder.path.name} takes no film input"
            )
        size = self.params.get("film_size")
        for what, n in (("identity FiLM", len(self.identity)), ("encoder's film input", encoder.film_size)):
            if n is not None and n != size:
                raise FewShotInputError(f"bundle's film mode records film_size {size!r}, but its {what} has {n} values")
        self.context = ContextEngine(
            bundle.file("context"), encoder.providers, encoder.threads, self.params.get("context_input")
        )
        self.film: np.ndarray | None = self.identity

    def embed(self, batch: np.ndarray) -> np.ndarray:
        return self.encoder.embed(batch, self.film)

    def graph(self, role: str) -> Callable[..., Any] | None:
        return self.context.run if role == "context" else None

    def condition(self, support: np.ndarray) -> None:
        """The film vector becomes the context graph's for ``support`` (one or more images)."""
        self.film = self.context.run(support)

    def fit(self, shots: Shots, state: Mapping[str, np.ndarray] | None = None) -> None:
        self.film = self.identity
        if len(shots.ids):
            assert shots.pixels is not None, "the film mode needs_pixels: the store reads them for it"
            images = normalize(shots.pixels, self.bundle.manifest.input_spec)
            self.condition(images)
            shots = dataclasses.replace(shots, embeddings=self.embed(images))
        super().fit(shots)

    def add(self, label: str, embeddings: np.ndarray, pixels: np.ndarray) -> bool:
        return False


class HeadAdapter(PrototypeAdapter):
    """A linear head (W (C, D), b (C,)) fitted on the stored shot embeddings by ``fit_head``, which a
    subclass defines (started from the prototypes); ``score`` gives its logits, while the open-set test
    still uses the prototype distances. Any enrollment change refits (``add`` returns False); the head is
    the state the store keeps."""

    persistent = True

    @abstractmethod
    def fit_head(self, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The head for shot embeddings x (n, D) of classes y (n,), with ``self.prototypes`` set."""

    def fit(self, shots: Shots, state: Mapping[str, np.ndarray] | None = None) -> None:
        super().fit(shots)
        if state is not None:
            self.weight, self.bias = state["weight"], state["bias"]
        else:
            self.weight, self.bias = self.fit_head(shots.embeddings.reshape(-1, self.embedding.size), shots.targets)

    def add(self, label: str, embeddings: np.ndarray, pixels: np.ndarray) -> bool:
        return False

    def state(self) -> dict[str, np.ndarray]:
        return {"weight": self.weight, "bias": self.bias}

    def score(self, queries: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        _, nearest, shots = super().score(queries)
        return queries.astype(np.float64) @ self.weight.T + self.bias, nearest, shots


@register
class FinetuneAdapter(HeadAdapter):
    """A linear head fine-tuned on the stored shot embeddings (``finetune.finetune_head``): started from
    the prototypes and stepped with the schedule learned in meta-training (manifest parameters
    ``steps``, ``lr_weight``, ``lr_bias``, ``l2``). Option ``steps`` runs more (or fewer) steps than
    trained, repeating the last step size."""

    name = "finetune"
    options = ("steps",)

    def __init__(self, bundle: Bundle, encoder: Engine, overrides: Mapping[str, Any] | None = None) -> None:
        super().__init__(bundle, encoder, overrides)
        if self.params.get("init", "prototype") != "prototype":
            raise FewShotInputError(
                f"bundle's fine-tune head init {self.params['init']!r} is not supported (this runtime has: prototype)"
            )
        steps = self.params.get("steps")
        if steps is not None and (isinstance(steps, bool) or not isinstance(steps, int) or steps < 0):
            raise FewShotInputError(f"fine-tune steps must be a whole number, 0 or more, got {steps!r}")
        try:
            self.lr_weight, self.lr_bias = schedule(self.params["lr_weight"], self.params["lr_bias"], steps)
        except (KeyError, ValueError) as exc:
            raise FewShotInputError(f"bundle's fine-tune parameters are unusable: {exc}") from None
        self.l2 = float(self.params.get("l2", 0.0))

    def fit_head(self, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return finetune_head(x, y, self.prototypes, self.lr_weight, self.lr_bias, self.l2)
