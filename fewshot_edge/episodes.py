"""N-way K-shot Q-query episodes drawn by index from an in-memory uint8 array, on its device."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from fewshot_edge.data.dataset import FewShotDataset
from fewshot_edge.runtime.errors import FewShotInputError


@dataclass
class Episode:
    """Support and query images (normalised float) with episode labels 0..n_way-1, class-major order."""

    support: torch.Tensor
    support_labels: torch.Tensor
    query: torch.Tensor
    query_labels: torch.Tensor
    n_way: int
    classes: torch.Tensor  # data-set class ids, one per way
    index: torch.Tensor  # data-set image ids (n_way, k_shot + q_query): support first


class EpisodeSampler:
    """Draws episodes with a seeded generator on the data's device; no support/query overlap.

    The images stay uint8 on ``device``; each episode gathers its images by index and normalises
    them with the data set's ``InputSpec.scale_shift`` constants (the runtime's preprocessing).
    """

    def __init__(
        self,
        dataset: FewShotDataset,
        n_way: int,
        k_shot: int,
        q_query: int,
        seed: int = 0,
        device: str | torch.device = "cpu",
    ) -> None:
        counts = dataset.class_counts()
        if n_way > dataset.num_classes:
            raise FewShotInputError(
                f"{n_way}-way episodes need {n_way} classes; the data set has {dataset.num_classes}"
            )
        eligible = np.flatnonzero(counts >= k_shot + q_query)
        if len(eligible) < n_way:
            raise FewShotInputError(
                f"only {len(eligible)} classes have the {k_shot + q_query} images a "
                f"{k_shot}-shot {q_query}-query episode needs; {n_way} are required"
            )
        self.device = torch.device(device)
        self.n_way, self.k_shot, self.q_query = n_way, k_shot, q_query
        self.images = torch.from_numpy(dataset.images).to(self.device)
        order = np.argsort(dataset.labels, kind="stable")
        starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
        table = np.full((dataset.num_classes, int(counts.max())), -1, dtype=np.int64)
        for c in eligible:
            table[c, : counts[c]] = order[starts[c] : starts[c] + counts[c]]
        self.eligible = torch.from_numpy(eligible).to(self.device)
        self.table = torch.from_numpy(table).to(self.device)
        self.valid = self.table >= 0
        scale, shift = dataset.spec.scale_shift()
        self.scale = torch.from_numpy(scale).to(self.device)
        self.shift = torch.from_numpy(shift).to(self.device)
        self.generator = torch.Generator(device=self.device)
        self.generator.manual_seed(seed)
        per = torch.arange(n_way, device=self.device)
        self.support_labels = per.repeat_interleave(k_shot)
        self.query_labels = per.repeat_interleave(q_query)

    def sample(self) -> Episode:
        n, k, q = self.n_way, self.k_shot, self.q_query
        pick = torch.randperm(len(self.eligible), generator=self.generator, device=self.device)[:n]
        classes = self.eligible[pick]
        keys = torch.rand(self.table[classes].shape, generator=self.generator, device=self.device)
        keys = keys.masked_fill(~self.valid[classes], 2.0)  # padding sorts last, never drawn
        slots = keys.argsort(dim=1)[:, : k + q]
        idx = self.table[classes].gather(1, slots)
        images = self.images[idx.flatten()].float() * self.scale + self.shift
        images = images.view(n, k + q, *images.shape[1:])
        return Episode(
            support=images[:, :k].reshape(n * k, *images.shape[2:]),
            support_labels=self.support_labels,
            query=images[:, k:].reshape(n * q, *images.shape[2:]),
            query_labels=self.query_labels,
            n_way=n,
            classes=classes,
            index=idx,
        )
