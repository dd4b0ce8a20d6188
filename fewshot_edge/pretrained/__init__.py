"""Bundles that ship with the package as data, found with ``importlib.resources``."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from fewshot_edge.runtime.errors import FewShotInputError

DEFAULT_BUNDLE = "omniglot-conv4"


def default_bundle() -> Path:
    """The folder of the pretrained Omniglot Conv-4 bundle (28x28, one channel, inverted, 64-d).

    Raises FewShotInputError when this installation does not have it.
    """
    path = Path(str(resources.files(__name__) / DEFAULT_BUNDLE))
    if not (path / "manifest.json").is_file():
        raise FewShotInputError(
            f"the pretrained bundle is not installed (no {path / 'manifest.json'}); pass a bundle folder with --bundle"
        )
    return path
