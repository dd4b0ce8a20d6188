"""Bundles that ship with the runtime as package data, opened by name: ``FewShotModel.open("omniglot-conv4")``
or ``--bundle omniglot-conv4``; ``DEFAULT_BUNDLE`` is what the CLI uses without ``--bundle``."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from .bundle import MANIFEST
from .errors import FewShotInputError

DEFAULT_BUNDLE = "omniglot-conv4"


def _folder() -> Path:
    return Path(str(resources.files(__package__ or "fewshot_edge.runtime") / "bundles"))


def shipped_bundles() -> list[str]:
    """The names of the bundles this installation ships, sorted."""
    folder = _folder()
    return sorted(p.name for p in folder.iterdir() if (p / MANIFEST).is_file()) if folder.is_dir() else []


def shipped_bundle(name: str) -> Path:
    """The folder of the shipped bundle ``name``; FewShotInputError naming the shipped ones when there is none."""
    path = _folder() / name
    if name not in shipped_bundles():
        shipped = ", ".join(shipped_bundles()) or "none"
        raise FewShotInputError(f"no bundle folder or shipped bundle named {name!r} (shipped: {shipped})")
    return path


def default_bundle() -> Path:
    """The folder of the default shipped bundle, the pretrained Omniglot Conv-4 (28x28, one channel, 64-d)."""
    return shipped_bundle(DEFAULT_BUNDLE)


def resolve_bundle(path: str | Path) -> Path:
    """``path`` itself when it exists or names a folder (has a separator), else the shipped bundle of that name."""
    root = Path(path)
    if root.exists() or len(root.parts) != 1 or str(path).startswith("."):
        return root
    return shipped_bundle(str(path))
