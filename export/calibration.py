"""Calibration on held-out classes, through the runtime's own adapters on the exported graphs.

Each calibration episode draws ``2 * n_way`` classes and splits them into two disjoint ``n_way``-way
episodes A and B with the same number of shots (1..max_shot, as devices enroll 1-5 shots; each count
in as many episodes as ``episodes`` allows).
A query of A scored against A's prototypes gives logits and its "known" nearest distance; scored
against B's prototypes (none of them its class) it gives an "unknown" nearest distance; and vice versa.
From these: the softmax temperature minimising the queries' NLL, and the open-set thresholds on the
nearest distance at the target false-reject rate, each pooled and per shot count (fewer shots give
noisier prototypes and larger distances, so one pooled threshold rejects too many 1-shot queries, and
one pooled temperature leaves 1-shot predictions over-confident and 5-shot ones under-confident).
Embeddings come from the adapter of the bundle's default mode: a mode that conditions the encoder on
the shots (FiLM) embeds each episode pair under the context of its own support images (both episodes'
shots, as a device's context covers every enrolled class). With a fine-tune mode, a second temperature
is fitted on the logits of the runtime's ``FinetuneAdapter`` fitted on each episode's shots. Any other
mode (not in ``PROTOTYPE_MODES``: matching, relation, sequence) is fitted on each episode's shot
embeddings and calibrated on its own ``score``: its logits and its distance statistic.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from fewshot_edge.data.dataset import FewShotDataset
from fewshot_edge.episodes import EpisodeSampler
from fewshot_edge.runtime import ADAPTERS, Adapter, Calibration, OpenSet
from fewshot_edge.runtime.adapters import distances, logits_from_distances
from fewshot_edge.runtime.bundle import OPEN_SET_BY_SHOTS
from fewshot_edge.runtime.errors import FewShotInputError
from fewshot_edge.runtime.preprocess import normalize
from fewshot_edge.runtime.store import Shots
from fewshot_edge.runtime.uncertainty import log_predictive

EpisodeEmbedder = Callable[
    [np.ndarray, int], np.ndarray
]  # ids (2n, shots + queries), shot count -> (2n, shots + queries, D)

TEMPERATURE_BOUNDS = (1e-4, 1e6)
MIN_QUERIES_PER_SHOT = 250  # fewer and a per-count temperature is noise (all queries right would fit T -> 0)
PROTOTYPE_MODES = ("prototype", "film", "finetune")  # modes whose logits and distance are the prototypes'
_GOLDEN = (np.sqrt(5.0) - 1.0) / 2.0


def nll(logits: np.ndarray, labels: np.ndarray, temperature: float = 1.0) -> float:
    """Mean negative log-likelihood of ``labels`` under softmax(logits / temperature); for sampled
    logits (N, L, C) (the bayes mode's) under the mean of the L softmaxes, as the device predicts."""
    log_p = log_predictive(logits, temperature)[0]
    return float(-np.mean(log_p[np.arange(len(log_p)), labels]))


def fit_temperature(
    logits: np.ndarray, labels: np.ndarray, bounds: tuple[float, float] = TEMPERATURE_BOUNDS, iterations: int = 80
) -> float:
    """The temperature in ``bounds`` minimising ``nll``: golden-section search on log T.

    The NLL is convex in 1/T, so it has one minimum along log T and the search finds it.
    """

    def f(log_t: float) -> float:
        return nll(logits, labels, float(np.exp(log_t)))

    a, b = np.log(bounds[0]), np.log(bounds[1])
    c, d = b - _GOLDEN * (b - a), a + _GOLDEN * (b - a)
    fc, fd = f(c), f(d)
    for _ in range(iterations):
        if fc < fd:
            b, d, fd = d, c, fc
            c = b - _GOLDEN * (b - a)
            fc = f(c)
        else:
            a, c, fc = c, d, fd
            d = a + _GOLDEN * (b - a)
            fd = f(d)
    return float(np.exp((a + b) / 2.0))


def fit_temperatures(
    logits: np.ndarray, labels: np.ndarray, shots: np.ndarray
) -> tuple[float, dict[int, float] | None]:
    """The pooled ``fit_temperature`` and one per shot count (query i's episode has ``shots[i]``);
    ``None`` for the latter when a count has fewer than ``MIN_QUERIES_PER_SHOT`` queries."""
    counts = np.unique(shots)
    by_shots = None
    if all(np.count_nonzero(shots == k) >= MIN_QUERIES_PER_SHOT for k in counts):
        by_shots = {int(k): fit_temperature(logits[shots == k], labels[shots == k]) for k in counts}
    return fit_temperature(logits, labels), by_shots


def fit_open_set(
    known: np.ndarray,
    unknown: np.ndarray,
    target_false_reject: float = 0.05,
    fitted_on: str | None = None,
    shots: np.ndarray | None = None,
) -> OpenSet:
    """Threshold = the (1 - target) quantile of the known nearest distances (linear interpolation);
    records the false-accept rate on ``unknown`` and the false-reject rate on ``known`` it gives.

    With ``shots`` (query i's episode shot count; ``known[i]`` and ``unknown[i]`` are query i's
    distances), one more threshold per shot count, fitted the same way on that count's queries.
    """
    if not 0.0 < target_false_reject < 1.0:
        raise FewShotInputError(f"target false-reject rate must be in (0, 1), got {target_false_reject}")
    threshold, false_accept, false_reject = _fit_threshold(known, unknown, target_false_reject)
    by_shots: dict[str, dict[int, float] | None] = dict.fromkeys(OPEN_SET_BY_SHOTS)
    if shots is not None:
        if not len(shots) == len(known) == len(unknown):
            raise ValueError(
                f"shots, known and unknown must have one entry per query, got {len(shots)}, {len(known)}, {len(unknown)}"
            )
        fits = {
            int(k): _fit_threshold(known[shots == k], unknown[shots == k], target_false_reject)
            for k in np.unique(shots)
        }
        by_shots = {name: {k: fit[i] for k, fit in fits.items()} for i, name in enumerate(OPEN_SET_BY_SHOTS)}
    return OpenSet(
        threshold=threshold,
        statistic="nearest_distance",
        target_false_reject=target_false_reject,
        false_accept=false_accept,
        false_reject=false_reject,
        fitted_on=fitted_on,
        **by_shots,
    )


def _fit_threshold(known: np.ndarray, unknown: np.ndarray, target_false_reject: float) -> tuple[float, float, float]:
    """(threshold, false-accept rate, false-reject rate) of ``fit_open_set``'s rule."""
    threshold = float(np.quantile(known, 1.0 - target_false_reject))
    return threshold, float(np.mean(unknown <= threshold)), float(np.mean(known > threshold))


def episode_sizes(data: FewShotDataset, n_way: int = 5, max_shot: int = 5, q_query: int = 5) -> tuple[int, int, int]:
    """``calibrate``'s (n_way, max_shot, q_query), shrunk to fit a small calibration set: two disjoint
    episodes need ``2 * n_way`` classes, and every class at least ``max_shot + q_query`` images."""
    smallest = int(data.class_counts().min())
    n_way, q_query = min(n_way, data.num_classes // 2), min(q_query, smallest // 2)
    max_shot = min(max_shot, smallest - q_query)
    if n_way < 2 or q_query < 1:
        raise FewShotInputError(
            f"calibration needs at least 4 classes of at least 2 images; got {data.num_classes} classes,"
            f" the smallest with {smallest} images"
        )
    return n_way, max_shot, q_query


def calibrate(
    adapter: Adapter,
    data: FewShotDataset,
    episodes: int = 500,
    n_way: int = 5,
    max_shot: int = 5,
    q_query: int = 5,
    target_false_reject: float = 0.05,
    seed: int = 0,
) -> tuple[Calibration, Calibration | None]:
    """Temperatures and open-set thresholds fitted on ``episodes`` episode pairs from ``data`` (held-out
    classes) embedded by ``adapter`` (the bundle's default mode), and the fine-tuned head's temperatures
    (a ``Calibration`` without open-set test) when the bundle has a fine-tune mode."""
    if episodes < 1:
        raise FewShotInputError(f"calibration needs at least 1 episode, got {episodes}")
    sampler = EpisodeSampler(data, 2 * n_way, max_shot, q_query, seed=seed)
    index = np.stack([sampler.sample().index.cpu().numpy() for _ in range(episodes)])  # (E, 2n, shots + queries)
    shots = np.random.default_rng(seed).permutation(np.arange(episodes) % max_shot + 1)
    embed_episode = episode_embedder(adapter, data, index)
    embedding = adapter.embedding
    head = (
        ADAPTERS["finetune"](adapter.bundle, adapter.encoder)
        if "finetune" in adapter.bundle.manifest.adaptation.modes
        else None
    )
    own_scores = adapter.name not in PROTOTYPE_MODES
    logits, head_logits, known, unknown = [], [], [], []
    for e, k in enumerate(shots):
        emb = embed_episode(index[e], int(k))
        protos = emb[:, :k].mean(axis=1)
        for own, other in ((slice(0, n_way), slice(n_way, None)), (slice(n_way, None), slice(0, n_way))):
            queries = emb[own, max_shot:].reshape(-1, emb.shape[-1])
            if own_scores:  # the mode's own logits and distance, fitted on each episode's shots as on a device
                adapter.fit(_episode_shots(emb[own, :k]))
                scored, nearest, _ = adapter.score(queries)
                logits.append(scored)
                known.append(nearest)
                adapter.fit(_episode_shots(emb[other, :k]))
                unknown.append(adapter.score(queries)[1])
                continue
            d = distances(queries, protos[own], embedding.metric)
            logits.append(logits_from_distances(d, embedding))
            if head is not None:
                head.fit(_episode_shots(emb[own, :k]))
                head_logits.append(head.score(queries)[0])
            known.append(d.min(axis=1))
            unknown.append(distances(queries, protos[other], embedding.metric).min(axis=1))
    labels = np.tile(np.repeat(np.arange(n_way), q_query), 2 * episodes)
    query_shots = np.repeat(shots, 2 * n_way * q_query)
    fitted_on = (
        f"{episodes} pairs of disjoint {n_way}-way 1..{max_shot}-shot episodes ({q_query} queries per class)"
        f" on {data.num_classes} held-out classes"
    )
    temperature, by_shots = fit_temperatures(np.concatenate(logits), labels, query_shots)
    calibration = Calibration(
        temperature=temperature,
        open_set=fit_open_set(
            np.concatenate(known), np.concatenate(unknown), target_false_reject, fitted_on, query_shots
        ),
        temperatures_by_shots=by_shots,
    )
    if not head_logits:
        return calibration, None
    head_temperature, head_by_shots = fit_temperatures(np.concatenate(head_logits), labels, query_shots)
    return calibration, Calibration(head_temperature, temperatures_by_shots=head_by_shots)


def _episode_shots(support: np.ndarray) -> Shots:
    """An episode's support embeddings (n, k, D) as the store hands them to an adapter: class c is label "c"."""
    n, k, size = support.shape
    return Shots(
        ids=np.arange(n * k),
        labels=[str(c) for c in range(n)],
        targets=np.repeat(np.arange(n), k),
        embeddings=support.reshape(-1, size).astype(np.float32),
        pixels=None,
        version=0,
    )


def episode_embedder(adapter: Adapter, data: FewShotDataset, index: np.ndarray) -> EpisodeEmbedder:
    """How the episodes of ``index`` (E, 2n or n, shots + queries) are embedded by ``adapter``: once per
    image when its encoder ignores the shots, per episode under its support's conditioning when it
    ``needs_pixels`` (FiLM)."""
    return _conditioned_episodes(adapter, data) if adapter.needs_pixels else _plain_episodes(adapter, data, index)


def _plain_episodes(adapter: Adapter, data: FewShotDataset, index: np.ndarray) -> EpisodeEmbedder:
    """Embeddings do not depend on the episode: every image in ``index`` is embedded once, episodes look them up."""
    used = np.unique(index)
    table = _embed_pixels(adapter.embed, data, used)
    return lambda ids, shots: table[np.searchsorted(used, ids)]


def _conditioned_episodes(adapter: Adapter, data: FewShotDataset) -> EpisodeEmbedder:
    """Each episode's images embedded with the adapter conditioned on its support images (the first
    ``shots`` per class), as the device's ``fit`` conditions it on every enrolled shot."""

    def embed(ids: np.ndarray, shots: int) -> np.ndarray:
        adapter.condition(normalize(data.images[ids[:, :shots].ravel()], data.spec))
        return _embed_pixels(adapter.embed, data, ids.ravel()).reshape(*ids.shape, -1)

    return embed


def _embed_pixels(
    embed: Callable[[np.ndarray], np.ndarray], data: FewShotDataset, ids: np.ndarray, chunk: int = 256
) -> np.ndarray:
    """Embeddings (len(ids), D) of data-set images, normalised a chunk at a time to bound memory."""
    return np.concatenate(
        [embed(normalize(data.images[ids[i : i + chunk]], data.spec)) for i in range(0, len(ids), chunk)]
    )
