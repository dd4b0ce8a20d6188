"""Backbones by name."""

from .backbones import BACKBONES, Backbone, create_backbone, register_backbone

__all__ = ["BACKBONES", "Backbone", "create_backbone", "register_backbone"]
