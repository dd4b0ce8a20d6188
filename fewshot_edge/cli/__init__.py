"""The ``fewshot-edge`` command line. Commands import torch-side modules only when they run."""

from __future__ import annotations

from .common import main
from . import training  # noqa: F401  (registers train, eval)

__all__ = ["main"]
