"""Meta-learning methods by name."""

from __future__ import annotations

from typing import Any

from fewshot_edge.models import Backbone

from .anil import ANIL
from .base import FewShotMethod
from .film import FiLMProtoNet
from .protonet import ProtoNet

METHODS: dict[str, type[FewShotMethod]] = {m.name: m for m in (ProtoNet, FiLMProtoNet, ANIL)}


def create_method(name: str, backbone: Backbone, **options: Any) -> FewShotMethod:
    """Build a method by registry name around ``backbone``."""
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; choose from {', '.join(sorted(METHODS))}")
    return METHODS[name](backbone, **options)


__all__ = ["ANIL", "METHODS", "FewShotMethod", "FiLMProtoNet", "ProtoNet", "create_method"]
