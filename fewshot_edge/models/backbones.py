"""Backbones by name: Conv-4 and ResNet-12, each a stack of blocks that accepts optional FiLM, and
families of names resolved by prefix (``timm:NAME``, see ``timm_backbones``).

Every backbone maps (N, C, H, W) normalised images to (N, out_dim) embeddings; a ``BlockBackbone``
also exposes ``block_channels`` so a FiLM generator knows the per-block (gamma, beta) shapes.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TypeVar

import torch
from torch import nn

from fewshot_edge.runtime.errors import FewShotInputError

FiLM = Sequence[tuple[torch.Tensor, torch.Tensor]]


def _film(x: torch.Tensor, params: tuple[torch.Tensor, torch.Tensor] | None) -> torch.Tensor:
    if params is None:
        return x
    gamma, beta = params
    return x * gamma.view(1, -1, 1, 1) + beta.view(1, -1, 1, 1)


class ConvBlock(nn.Module):
    """conv3x3 -> BN -> (FiLM) -> ReLU -> max-pool 2."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(cout)
        self.pool = nn.MaxPool2d(2)

    def forward(self, x: torch.Tensor, film: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        return self.pool(torch.relu(_film(self.bn(self.conv(x)), film)))


class ResBlock(nn.Module):
    """ResNet-12 block: three conv3x3-BN (leaky ReLU between), 1x1 shortcut, (FiLM), leaky ReLU, max-pool 2."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        for i in range(3):
            layers += [nn.Conv2d(cin if i == 0 else cout, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout)]
            if i < 2:
                layers.append(nn.LeakyReLU(0.1))
        self.body = nn.Sequential(*layers)
        self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, bias=False), nn.BatchNorm2d(cout))
        self.act = nn.LeakyReLU(0.1)
        self.pool = nn.MaxPool2d(2)

    def forward(self, x: torch.Tensor, film: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        return self.pool(self.act(_film(self.body(x) + self.shortcut(x), film)))


class Backbone(nn.Module):
    """The interface every backbone has: ``forward`` maps (N, C, H, W) normalised images to (N, ``out_dim``)."""

    out_dim: int


class BlockBackbone(Backbone):
    """Blocks applied in order, then flatten (Conv-4) or global average pooling (ResNet-12); each block
    takes an optional FiLM (gamma, beta) of ``block_channels[i]`` channels."""

    def __init__(self, blocks: list[nn.Module], block_channels: list[int], out_dim: int, global_pool: bool) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(blocks)
        self.block_channels = block_channels
        self.out_dim = out_dim
        self.global_pool = global_pool

    def forward(self, x: torch.Tensor, film: FiLM | None = None) -> torch.Tensor:
        for i, block in enumerate(self.blocks):
            x = block(x, None if film is None else film[i])
        return x.mean(dim=(2, 3)) if self.global_pool else x.flatten(1)


BACKBONES: dict[str, Callable[..., Backbone]] = {}
FAMILIES: dict[str, Callable[..., Backbone]] = {}
B = TypeVar("B", bound=Callable[..., Backbone])


def register_backbone(builder: B) -> B:
    """Decorator: make a backbone builder ``(in_channels, image_size) -> Backbone`` available by its name."""
    BACKBONES[builder.__name__] = builder
    return builder


def register_family(prefix: str) -> Callable[[B], B]:
    """Decorator: resolve every name ``PREFIX:MODEL`` with a builder
    ``(model, in_channels, image_size, *, weights, pretrained) -> Backbone``."""

    def register(builder: B) -> B:
        FAMILIES[prefix] = builder
        return builder

    return register


@register_backbone
def conv4(in_channels: int, image_size: int, width: int = 64) -> Backbone:
    """The standard Conv-4: four 64-filter blocks; 28 px -> 64-d, 84 px -> 1600-d."""
    side = image_size
    for _ in range(4):
        side //= 2
    if side < 1:
        raise FewShotInputError(f"image_size {image_size} is too small for Conv-4 (needs >= 16)")
    blocks = [ConvBlock(in_channels if i == 0 else width, width) for i in range(4)]
    return BlockBackbone(blocks, [width] * 4, width * side * side, global_pool=False)


@register_backbone
def resnet12(in_channels: int, image_size: int, widths: Sequence[int] = (64, 160, 320, 640)) -> Backbone:
    """The few-shot ResNet-12 (Lee et al. 2019): four residual blocks, global average pooling."""
    if image_size < 16:
        raise FewShotInputError(f"image_size {image_size} is too small for ResNet-12 (needs >= 16)")
    chans = [in_channels, *widths]
    blocks = [ResBlock(chans[i], chans[i + 1]) for i in range(4)]
    return BlockBackbone(blocks, list(widths), widths[-1], global_pool=True)


def backbone_names() -> list[str]:
    """The registered names, then one ``PREFIX:NAME`` pattern per family."""
    return [*sorted(BACKBONES), *(f"{prefix}:NAME" for prefix in sorted(FAMILIES))]


def create_backbone(
    name: str, in_channels: int, image_size: int, *, weights: str | Path | None = None, pretrained: bool = False
) -> Backbone:
    """Build a backbone by registry name, or ``PREFIX:MODEL`` by its family (e.g. ``timm:resnet50``);
    ``weights`` (a file) or ``pretrained`` (its hub) start a family's model from trained weights."""
    prefix, sep, model = name.partition(":")
    if sep and prefix in FAMILIES:
        return FAMILIES[prefix](model, in_channels, image_size, weights=weights, pretrained=pretrained)
    if name not in BACKBONES:
        raise FewShotInputError(f"unknown backbone {name!r}; choose from {', '.join(backbone_names())}")
    if weights is not None or pretrained:
        raise FewShotInputError(
            f"{name} starts from random weights (or --init-from a checkpoint); --weights and"
            " --pretrained are for timm:NAME backbones"
        )
    return BACKBONES[name](in_channels, image_size)
