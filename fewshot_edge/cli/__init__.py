"""The ``fewshot-edge`` command line. Commands import torch-side modules only when they run."""

from __future__ import annotations

from .common import main
from . import training  # noqa: F401  (registers train, eval)
from . import export  # noqa: F401  (registers export)
from . import device  # noqa: F401  (registers enroll, predict, classes)
from . import bench  # noqa: F401  (registers bench)
from . import demo  # noqa: F401  (registers demo)
from . import deploy  # noqa: F401  (registers info, build-engine)

__all__ = ["main"]
