"""Data: load few-shot image sets into memory as uint8 arrays, split them, fetch Omniglot."""

from __future__ import annotations

from typing import Any, Callable, Sequence

from ._sources import PathLike
from .dataset import FewShotDataset
from .download import download_omniglot
from .folders import load_image_folders
from .omniglot import load_omniglot
from .splits import split_by_group, split_classes

LOADERS: dict[str, Callable[..., FewShotDataset]] = {
    "omniglot": load_omniglot,
    "folders": load_image_folders,
}


def load_dataset(kind: str, sources: PathLike | Sequence[PathLike], **opts: Any) -> FewShotDataset:
    """Load a data set with the loader registered as ``kind`` (see ``LOADERS``), passing ``opts`` on."""
    try:
        loader = LOADERS[kind]
    except KeyError:
        raise ValueError(f"unknown data set kind {kind!r}; known: {', '.join(sorted(LOADERS))}") from None
    return loader(sources, **opts)


__all__ = [
    "FewShotDataset", "LOADERS", "download_omniglot", "load_dataset", "load_image_folders",
    "load_omniglot", "split_by_group", "split_classes",
]
