"""N-way K-shot accuracy with a 95% confidence interval over many episodes."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass

import numpy as np
import torch
from tqdm import tqdm

from fewshot_edge.data.dataset import FewShotDataset
from fewshot_edge.episodes import EpisodeSampler
from fewshot_edge.methods import FewShotMethod
from fewshot_edge.runtime.stats import confidence_interval


@dataclass
class EvalResult:
    """Mean episode accuracy and the half-width of its 95% CI (1.96 * std / sqrt(episodes)), in [0, 1]."""

    accuracy: float
    ci95: float
    episodes: int
    n_way: int
    k_shot: int
    q_query: int

    def to_dict(self) -> dict:
        return asdict(self)

    def __str__(self) -> str:
        return (
            f"{self.n_way}-way {self.k_shot}-shot: {100 * self.accuracy:.2f}% "
            f"+- {100 * self.ci95:.2f} (95% CI, {self.episodes} episodes)"
        )


@torch.no_grad()
def evaluate(
    method: FewShotMethod,
    dataset: FewShotDataset,
    n_way: int,
    k_shot: int,
    q_query: int = 15,
    episodes: int = 1000,
    seed: int = 0,
    device: str | torch.device = "cpu",
    progress: bool = False,
) -> EvalResult:
    """Accuracy of ``method`` on episodes drawn from ``dataset`` (BatchNorm in eval mode)."""
    sampler = EpisodeSampler(dataset, n_way, k_shot, q_query, seed=seed, device=device)
    return evaluate_sampler(method, sampler, episodes, progress=progress)


@torch.no_grad()
def evaluate_sampler(
    method: FewShotMethod, sampler: EpisodeSampler, episodes: int, progress: bool = False
) -> EvalResult:
    """Accuracy over ``episodes`` episodes from ``sampler``; restores the method's train/eval mode."""
    was_training = method.training
    method.eval()
    accs = torch.empty(episodes, device=sampler.device)
    with encoded_once(method, sampler) as encoded:
        for i in tqdm(range(episodes), desc="eval", disable=not progress, leave=False):
            ep = sampler.sample()
            if encoded is None:
                logits = method.logits(ep.support, ep.support_labels, ep.query, ep.n_way)
            else:
                k = sampler.k_shot
                support, query = encoded[ep.index[:, :k].flatten()], encoded[ep.index[:, k:].flatten()]
                logits = method.logits(support, ep.support_labels, query, ep.n_way)
            accs[i] = (logits.argmax(-1) == ep.query_labels).float().mean()
    method.train(was_training)
    mean, ci = confidence_interval(accs.cpu().numpy().astype(np.float64))
    return EvalResult(mean, ci, episodes, sampler.n_way, sampler.k_shot, sampler.q_query)


@contextmanager
def encoded_once(method: FewShotMethod, sampler: EpisodeSampler, batch: int = 256) -> Iterator[torch.Tensor | None]:
    """Every image of ``sampler``'s data set through the method's ``image_encoder`` once (eval mode),
    with that encoder replaced by the identity inside the block, so ``logits`` takes the encodings where
    it took images: the episodes and their answers are the same, and a 1,000-episode evaluation encodes
    each image once rather than once per episode it appears in. Yields None (nothing replaced) for a
    method whose encoding depends on the episode."""
    name = method.image_encoder
    if name is None:
        yield None
        return
    encode = getattr(method, name)
    scale, shift = sampler.scale, sampler.shift
    encoded = torch.cat(
        [encode(sampler.images[i : i + batch].float() * scale + shift) for i in range(0, len(sampler.images), batch)]
    )
    # an instance attribute shadows the class's method for this block only, so no method needs a second
    # code path that takes encodings instead of images
    setattr(method, name, lambda x: x)
    try:
        yield encoded
    finally:
        delattr(method, name)
