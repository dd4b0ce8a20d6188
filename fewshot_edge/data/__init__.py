"""Data: load few-shot image sets into memory as uint8 arrays, split them, fetch Omniglot."""

from __future__ import annotations

from .dataset import FewShotDataset
from .download import download_omniglot
from .folders import load_image_folders
from .loaders import LOADERS, load_dataset
from .omniglot import load_omniglot
from .splits import load_splits, split_by_group, split_classes

__all__ = [
    "FewShotDataset",
    "LOADERS",
    "download_omniglot",
    "load_dataset",
    "load_image_folders",
    "load_omniglot",
    "load_splits",
    "split_by_group",
    "split_classes",
]
