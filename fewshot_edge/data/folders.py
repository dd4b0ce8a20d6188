"""Class-per-folder image sets (``<class>/<file>.jpg``) from folders or zips, e.g. miniImageNet."""

from __future__ import annotations

from collections.abc import Sequence

from fewshot_edge.runtime.errors import FewShotInputError
from fewshot_edge.runtime.preprocess import InputSpec

from ._sources import PathLike, collect, decode, open_sources
from .dataset import FewShotDataset

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def load_image_folders(
    sources: PathLike | Sequence[PathLike],
    size: int = 84,
    channels: int = 3,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    max_per_class: int | None = None,
    class_names: Sequence[str] | None = None,
    cache: bool = True,
    cache_dir: PathLike | None = None,
    resize: str = "box",
    crop_mode: str = "squash",
    crop_pct: float = 1.0,
) -> FewShotDataset:
    """Load one set from several folders or zips of ``<class>/<file>`` images (one top folder allowed).

    Each class is its own group. ``mean``/``std`` default to ImageNet's for RGB, (0, 1) for L;
    ``resize``, ``crop_mode`` and ``crop_pct`` fit each image to ``size`` as ``InputSpec`` says.
    ``max_per_class`` keeps the first files by sorted name; ``class_names`` keeps those classes,
    in that order. A class found in two sources is an error. Caching as in ``load_omniglot``.
    """
    if max_per_class is not None and max_per_class < 1:
        raise FewShotInputError(f"max_per_class must be positive, got {max_per_class}")
    rgb = channels == 3
    spec = InputSpec(
        channels=channels,
        height=size,
        width=size,
        mean=tuple(mean) if mean is not None else (IMAGENET_MEAN if rgb else (0.0,)),
        std=tuple(std) if std is not None else (IMAGENET_STD if rgb else (1.0,)),
        resize=resize,
        crop_mode=crop_mode,
        crop_pct=crop_pct,
    )
    with open_sources(sources) as trees:
        classes = {key: files[:max_per_class] for key, files in collect(trees, depth=1).items()}
        if class_names is not None:
            unknown = [c for c in class_names if (c,) not in classes]
            if unknown or len(set(class_names)) != len(class_names):
                raise FewShotInputError(f"class_names must be distinct known classes; unknown: {unknown}")
            classes = {(c,): classes[(c,)] for c in class_names}
        images, labels = decode(classes, spec, cache=cache, cache_dir=cache_dir, desc="images")
        paths = [str(t.path) for t in trees]
    names = [key[0] for key in classes]
    return FewShotDataset(
        images=images,
        labels=labels,
        classes=names,
        groups=list(names),
        spec=spec,
        source={"loader": "folders", "sources": paths, "size": size, "max_per_class": max_per_class},
    )
