"""Meta-learning methods by name: each registers itself with ``register_method``."""

from __future__ import annotations

from typing import Any

from fewshot_edge.models import Backbone
from fewshot_edge.runtime.errors import FewShotInputError

from .anil import ANIL
from .base import METHODS, FewShotMethod, MethodOption, register_method
from .film import FiLMProtoNet
from .maml import MAML
from .mann import MANN
from .matching import MatchingNet
from .metalstm import MetaLSTM
from .metasgd import MetaSGD
from .protonet import ProtoNet
from .relation import RelationNet
from .transformer import SetTransformer
from .versa import Versa


def create_method(name: str, backbone: Backbone, **options: Any) -> FewShotMethod:
    """Build a method by registry name around ``backbone``."""
    if name not in METHODS:
        raise FewShotInputError(f"unknown method {name!r}; choose from {', '.join(sorted(METHODS))}")
    return METHODS[name](backbone, **options)


__all__ = [
    "ANIL",
    "METHODS",
    "FewShotMethod",
    "FiLMProtoNet",
    "MAML",
    "MANN",
    "MatchingNet",
    "MetaLSTM",
    "MetaSGD",
    "MethodOption",
    "ProtoNet",
    "RelationNet",
    "SetTransformer",
    "Versa",
    "create_method",
    "register_method",
]
