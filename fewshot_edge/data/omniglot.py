"""Omniglot from the official zips (or the same tree unpacked): one class per character."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from fewshot_edge.runtime.preprocess import InputSpec

from ._sources import PathLike, collect, decode, open_sources
from .dataset import FewShotDataset

ROTATIONS = (0, 90, 180, 270)


def load_omniglot(
    sources: PathLike | Sequence[PathLike],
    size: int = 28,
    rotations: bool = False,
    cache: bool = True,
    cache_dir: PathLike | None = None,
) -> FewShotDataset:
    """Load Omniglot zips or folders (``<Alphabet>/characterNN/IIII_DD.png`` at any depth).

    Images are ``size`` x ``size``, one channel, inverted so strokes are bright on dark. Classes are
    "Alphabet/characterNN" (sorted), each in the group of its alphabet. With ``rotations`` every
    character gives four classes, "Alphabet/characterNN/rot0" .. "/rot270" (counter-clockwise).
    Decoded images are cached as .npz under ``cache_dir`` (default: $FEWSHOT_EDGE_CACHE or
    ~/.cache/fewshot-edge) unless ``cache`` is False.
    """
    spec = InputSpec(channels=1, height=size, width=size, mean=(0.0,), std=(1.0,), invert=True)
    with open_sources(sources) as trees:
        classes = collect(trees, depth=2)
        # One thread: these tiny PNGs spend most time in Python, and on 2 cores two threads
        # decoding them ran 1.7x slower than one (GIL hand-offs); photos do gain from threads.
        images, labels = decode(classes, spec, cache=cache, cache_dir=cache_dir, desc="omniglot", workers=1)
        paths = [str(t.path) for t in trees]
    names = ["/".join(key) for key in classes]
    groups = [key[0] for key in classes]
    if rotations:
        images, labels = _rotate(images, labels)
        names = [f"{name}/rot{angle}" for name in names for angle in ROTATIONS]
        groups = [group for group in groups for _ in ROTATIONS]
    return FewShotDataset(
        images=images,
        labels=labels,
        classes=names,
        groups=groups,
        spec=spec,
        source={"loader": "omniglot", "sources": paths, "size": size, "rotations": rotations},
    )


def _rotate(images: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Every image at each rotation; class c at rotation k becomes class 4c + k, kept in order."""
    k = len(ROTATIONS)
    rotated = np.stack([np.rot90(images, i, axes=(2, 3)) for i in range(k)], axis=1)
    new_labels = (labels[:, None] * k + np.arange(k)).reshape(-1)
    order = np.argsort(new_labels, kind="stable")
    return np.ascontiguousarray(rotated.reshape(-1, *images.shape[1:])[order]), new_labels[order]


def upright(ds: FewShotDataset) -> FewShotDataset:
    """Only the unrotated classes of a data set loaded with ``rotations`` (the data set itself otherwise)."""
    if not ds.source.get("rotations"):
        return ds
    return ds.subset([i for i, name in enumerate(ds.classes) if name.endswith("/rot0")])
