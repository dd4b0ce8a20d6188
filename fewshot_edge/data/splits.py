"""Train / held-out splits that never share a group (an Omniglot alphabet) or a class; a run's splits."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from fewshot_edge.config import TrainConfig
from fewshot_edge.runtime.errors import FewShotInputError

from .dataset import FewShotDataset
from .loaders import load_dataset
from .omniglot import upright


def split_by_group(
    ds: FewShotDataset, holdout: int | Sequence[str], seed: int = 0
) -> tuple[FewShotDataset, FewShotDataset]:
    """(train, held-out), holding out ``holdout`` whole groups drawn with ``seed``, or the named groups."""
    held = _pick(sorted(set(ds.groups)), holdout, seed, "group")
    return _partition(ds, [g in held for g in ds.groups])


def split_classes(ds: FewShotDataset, holdout: int | float, seed: int = 0) -> tuple[FewShotDataset, FewShotDataset]:
    """(train, held-out), holding out a count or fraction of classes, ignoring groups.

    For rotated Omniglot use ``split_by_group``: this may put rotations of one character on both sides.
    """
    count = holdout if isinstance(holdout, (int, np.integer)) else round(holdout * ds.num_classes)
    held = _pick(list(ds.classes), int(count), seed, "class")
    return _partition(ds, [c in held for c in ds.classes])


def load_splits(config: TrainConfig) -> tuple[FewShotDataset, FewShotDataset]:
    """(train, validation): validation is ``val_sources`` when given, else held-out groups of the data.

    Rotated Omniglot classes train; validation uses the held-out characters upright, as drawn.
    """
    data = load_dataset(config.data, config.sources, **config.data_options)
    if config.val_sources:
        train_data, val_data = data, load_dataset(config.data, config.val_sources, **config.data_options)
    else:
        train_data, val_data = split_by_group(data, config.holdout_groups or config.holdout, seed=config.seed)
    return train_data, upright(val_data)


def _pick(units: list[str], holdout: int | Sequence[str], seed: int, what: str) -> set[str]:
    if isinstance(holdout, (int, np.integer)):
        if not 1 <= holdout < len(units):
            raise FewShotInputError(f"can hold out 1 to {len(units) - 1} of {len(units)} {what}s, not {holdout}")
        order = np.random.default_rng(seed).permutation(len(units))
        return {units[i] for i in order[:holdout]}
    held = {holdout} if isinstance(holdout, str) else set(holdout)
    unknown = sorted(held - set(units))
    if unknown:
        raise FewShotInputError(f"unknown {what}s: {', '.join(unknown)}")
    if not held or len(held) == len(units):
        raise FewShotInputError(f"hold out at least one and fewer than all {len(units)} {what}s")
    return held


def _partition(ds: FewShotDataset, held: list[bool]) -> tuple[FewShotDataset, FewShotDataset]:
    mask = np.asarray(held)
    return ds.subset(np.flatnonzero(~mask)), ds.subset(np.flatnonzero(mask))
