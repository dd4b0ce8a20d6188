"""The ``fewshot-edge`` command line. Commands import torch-side modules only when they run."""

from __future__ import annotations

from . import (
    bench,  # noqa: F401  (registers bench)
    demo,  # noqa: F401  (registers demo)
    deploy,  # noqa: F401  (registers info, build-engine)
    device,  # noqa: F401  (registers enroll, predict, classes)
    export,  # noqa: F401  (registers export)
    serve,  # noqa: F401  (registers serve)
    training,  # noqa: F401  (registers train, eval)
    watch,  # noqa: F401  (registers watch)
)
from .common import main

__all__ = ["main"]
