"""Backbones by name, and by family (``timm:NAME``)."""

from .backbones import (
    BACKBONES,
    FAMILIES,
    Backbone,
    BlockBackbone,
    backbone_names,
    create_backbone,
    register_backbone,
    register_family,
)
from .timm_backbones import TimmBackbone, timm_input_spec, timm_model_name

__all__ = [
    "BACKBONES",
    "FAMILIES",
    "Backbone",
    "BlockBackbone",
    "TimmBackbone",
    "backbone_names",
    "create_backbone",
    "register_backbone",
    "register_family",
    "timm_input_spec",
    "timm_model_name",
]
