"""The data-set loaders by kind (``--data``), and loading one by name."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from fewshot_edge.runtime.errors import FewShotInputError

from ._sources import PathLike
from .dataset import FewShotDataset
from .folders import load_image_folders
from .omniglot import load_omniglot

LOADERS: dict[str, Callable[..., FewShotDataset]] = {
    "omniglot": load_omniglot,
    "folders": load_image_folders,
}


def load_dataset(kind: str, sources: PathLike | Sequence[PathLike], **opts: Any) -> FewShotDataset:
    """Load a data set with the loader registered as ``kind`` (see ``LOADERS``), passing ``opts`` on."""
    try:
        loader = LOADERS[kind]
    except KeyError:
        raise FewShotInputError(f"unknown data set kind {kind!r}; known: {', '.join(sorted(LOADERS))}") from None
    return loader(sources, **opts)
