"""The ``bayes`` mode (VERSA): a Gaussian over each class's linear head, and the predictive by sampling.

The bundle's amortisation graph (role "amortise") maps each class's mean shot embedding h_c (the
store's shots pooled as ``PrototypeAdapter`` keeps them, sums and counts) to the mean and log-variance
of that class's weight vector w_c (D) and bias b_c. By the local reparameterisation trick a query x's
logit for class c is Gaussian:

    z_c ~ N(m_c, s_c^2),   m_c = mu_w_c . x + mu_b_c,   s_c^2 = (x * x) . var_w_c + var_b_c

``score`` returns L samples of these logits per query, (N, L, C): z_lc = m_c + s_c * eps_lc with the
fixed draw ``noise(L, C, seed)`` (L = ``samples`` and ``seed`` from the manifest). The model averages
their tempered softmaxes (``uncertainty.predictive``), which gives the predictive distribution and
its epistemic part. Each class's head depends on its own shots only, so ``add`` amortises the changed
class alone (no refit). The open-set distance is the nearest class mean's, as the prototype mode's.

Why a fixed draw and not fresh samples or a quadrature: the device must give PyTorch's predictions
(export checks it) and the same prediction for the same query every time, so both sides use this one
seeded draw; a quadrature over C independent Gaussians needs a grid exponential in C, while L draws
per class estimate the predictive without bias at any C. Half the draws are the other half negated
(antithetic), so the samples' mean logit is exactly m_c. Column c comes from its own stream seeded
(seed, c), so it does not depend on how many classes there are: enrolling a class leaves the others'
draws as they were (removing one shifts the later classes' columns, and their draws with them).
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
from .store import Shots

AMORTISE_INPUTS = ("classes",)
AMORTISE_OUTPUTS = ("weight_mean", "bias_mean", "weight_log_variance", "bias_log_variance")


def noise(samples: int, classes: int, seed: int) -> np.ndarray:
    """The fixed standard-normal draw (samples, classes), float64: for each column c, samples / 2 draws of
    numpy's default generator seeded (seed, c), then the same negated."""
    check_samples(samples)
    half = [np.random.default_rng((seed, c)).standard_normal(samples // 2) for c in range(classes)]
    draws = np.stack(half, axis=1) if half else np.zeros((samples // 2, 0))
    return np.concatenate([draws, -draws])


def check_samples(samples: object) -> None:
    """Raise FewShotInputError unless ``samples`` is an even whole number, 2 or more (antithetic pairs)."""
    if isinstance(samples, bool) or not isinstance(samples, int) or samples < 2 or samples % 2:
        raise FewShotInputError(f"bayes samples must be an even whole number, 2 or more, got {samples!r}")


@register
class BayesAdapter(PrototypeAdapter):
    """Sampled logits of each class's Gaussian linear head (see the module docstring)."""

    name = "bayes"

    def __init__(self, bundle: Bundle, encoder: Engine, overrides: Mapping[str, Any] | None = None) -> None:
        super().__init__(bundle, encoder, overrides)
        samples: Any = self.params.get("samples")
        seed: Any = self.params.get("seed")
        check_samples(samples)
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise FewShotInputError(f"bundle's bayes seed must be a whole number, 0 or more, got {seed!r}")
        self.samples: int = samples
        self.seed: int = seed
        self.amortiser = GraphEngine(bundle.file("amortise"), encoder.providers, encoder.threads, AMORTISE_INPUTS)
        if self.amortiser.output_names != list(AMORTISE_OUTPUTS):
            raise FewShotInputError(
                f"bundle's amortise graph must give {', '.join(AMORTISE_OUTPUTS)}; it gives {', '.join(self.amortiser.output_names)}"
            )

    def graph(self, role: str) -> Callable[..., Any] | None:
        return self.amortiser.run if role == "amortise" else None

    def fit(self, shots: Shots, state: Mapping[str, np.ndarray] | None = None) -> None:
        super().fit(shots)
        self._heads = self._amortise(self.prototypes)
        self._noise = noise(self.samples, len(self.labels), self.seed)

    def add(self, label: str, embeddings: np.ndarray, pixels: np.ndarray) -> bool:
        new = label not in self.labels
        super().add(label, embeddings, pixels)
        i = self.labels.index(label)
        head = self._amortise(self.prototypes[i : i + 1])
        if new:
            self._heads = [np.concatenate([old, part]) for old, part in zip(self._heads, head, strict=True)]
            self._noise = noise(self.samples, len(self.labels), self.seed)
        else:
            for old, part in zip(self._heads, head, strict=True):
                old[i] = part[0]
        return True

    def score(self, queries: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        _, nearest, shots = super().score(queries)
        weight_mean, bias_mean, weight_variance, bias_variance = self._heads
        x = queries.astype(np.float64)
        mean = x @ weight_mean.T + bias_mean
        std = np.sqrt((x * x) @ weight_variance.T + bias_variance)
        return mean[:, None, :] + std[:, None, :] * self._noise[None], nearest, shots

    def _amortise(self, classes: np.ndarray) -> list[np.ndarray]:
        """[weight mean (K, D), bias mean (K,), weight variance (K, D), bias variance (K,)] in float64."""
        if not len(classes):
            size = self.embedding.size
            return [np.zeros((0, size)), np.zeros(0), np.zeros((0, size)), np.zeros(0)]
        w_mean, b_mean, w_log_var, b_log_var = (
            np.asarray(out, dtype=np.float64) for out in self.amortiser.run(classes.astype(np.float32))
        )
        return [w_mean, b_mean, np.exp(w_log_var), np.exp(b_log_var)]
