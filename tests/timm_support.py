"""Small timm models and drawn photos for the timm and frozen-export tests; nothing is downloaded."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

timm = pytest.importorskip("timm", reason="timm (the [train] extra) does not import here")

CNN, VIT = "test_resnet", "test_vit"  # timm's own tiny test models (ResNet, VisionTransformer)
SIZE = 32  # input size the tests build them at (the ViT's patch is 16: 2 x 2 tokens)
COLOURS = [(220, 40, 40), (40, 160, 60), (40, 70, 220), (230, 200, 30), (160, 50, 200), (30, 190, 200)]


def draw_shapes(root: Path, classes: int = 6, per_class: int = 16, size: int = 40, seed: int = 0) -> Path:
    """A class-per-folder set of PNG photos: class c is a filled square (c even) or disc (c odd) of its
    own colour, placed and sized at random on a light background."""
    rng = np.random.default_rng(seed)
    for c in range(classes):
        folder = root / f"class{c}"
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            image = Image.new("RGB", (size, size), tuple(int(v) for v in rng.integers(200, 256, 3)))
            x0, y0, w, h = (int(v) for v in (*rng.integers(2, size // 3, 2), *rng.integers(size // 3, size // 2, 2)))
            draw = ImageDraw.Draw(image)
            (draw.ellipse if c % 2 else draw.rectangle)([x0, y0, x0 + w, y0 + h], fill=COLOURS[c])
            image.save(folder / f"{i:02d}.png")
    return root


def save_weights(path: Path, model: str, seed: int) -> Path:
    """A seeded timm model's state dict (with its 1000-class head) as safetensors or, for .pt, torch.save."""
    import torch
    from safetensors.torch import save_file

    torch.manual_seed(seed)
    state = timm.create_model(model).state_dict()
    if path.suffix == ".safetensors":
        save_file(state, str(path))
    else:
        torch.save(state, path)
    return path
