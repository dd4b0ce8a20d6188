"""The in-memory few-shot data set: every image as uint8, a class per label, a group per class."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from fewshot_edge.runtime.preprocess import InputSpec


@dataclass
class FewShotDataset:
    """Images (N, C, H, W) uint8 after ``to_pixels``; labels index ``classes``.

    ``groups[c]`` names the group of class c (the Omniglot alphabet; the class itself for
    class-per-folder sets); hold-out splits are made over groups so no group leaks.
    """

    images: np.ndarray
    labels: np.ndarray
    classes: list[str]
    groups: list[str]
    spec: InputSpec
    source: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.images.dtype != np.uint8 or self.images.ndim != 4:
            raise ValueError(f"images must be uint8 (N, C, H, W), got {self.images.dtype} {self.images.shape}")
        if len(self.labels) != len(self.images):
            raise ValueError("labels and images differ in length")
        if len(self.groups) != len(self.classes):
            raise ValueError("groups must give one group per class")

    def __len__(self) -> int:
        return len(self.images)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def class_counts(self) -> np.ndarray:
        return np.bincount(self.labels, minlength=self.num_classes)

    def subset(self, class_ids: list[int] | np.ndarray) -> FewShotDataset:
        """The data set restricted to ``class_ids``, relabelled 0..len-1 in that order."""
        class_ids = np.asarray(class_ids, dtype=np.int64)
        remap = np.full(self.num_classes, -1, dtype=np.int64)
        remap[class_ids] = np.arange(len(class_ids))
        keep = remap[self.labels] >= 0
        return FewShotDataset(
            images=self.images[keep],
            labels=remap[self.labels[keep]],
            classes=[self.classes[c] for c in class_ids],
            groups=[self.groups[c] for c in class_ids],
            spec=self.spec,
            source=dict(self.source),
        )
