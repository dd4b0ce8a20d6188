"""Procedural handwritten-looking symbols for the offline demo: numpy and Pillow only.

``draw(seed)`` makes a new symbol from a few random pen strokes (polylines, curves through control
points, arcs), black on white at 105x105 like Omniglot; ``perturb(glyph, seed)`` redraws it the way
another hand would: a small affine jitter, a thicker or thinner pen, a few stray pixels.
Both are deterministic in their seed.
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

SIZE = 105
INK, PAPER = 0, 255


def draw(seed: int, size: int = SIZE) -> np.ndarray:
    """A new symbol: uint8 (size, size), black strokes (0) on white (255)."""
    rng = np.random.default_rng([seed, 0])
    image = Image.new("L", (size, size), PAPER)
    pen = ImageDraw.Draw(image)
    width = int(rng.integers(4, 6)) * size // SIZE or 1
    for _ in range(int(rng.integers(2, 5))):
        points = _stroke(rng) * (size - 1)
        pen.line([tuple(p) for p in points], fill=INK, width=width, joint="curve")
        for x, y in (points[0], points[-1]):
            r = width / 2
            pen.ellipse((x - r, y - r, x + r, y + r), fill=INK)
    return np.asarray(image, dtype=np.uint8).copy()


def perturb(glyph: np.ndarray, seed: int, strength: float = 1.0) -> np.ndarray:
    """Another drawing of ``glyph`` (uint8 (H, W), black on white): rotated, scaled, sheared and shifted
    a little (``strength`` scales all four), the pen half a pixel thicker or thinner, a few pixels flipped."""
    rng = np.random.default_rng([seed, 1])
    h, w = glyph.shape
    angle = np.deg2rad(rng.uniform(-10, 10) * strength)
    scale = 1.0 + rng.uniform(-0.1, 0.1) * strength
    shear = rng.uniform(-0.15, 0.15) * strength
    shift = rng.uniform(-0.04, 0.04, size=2) * strength * (w, h)
    forward = (
        scale
        * np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
        @ np.array([[1, shear], [0, 1]])
    )
    inverse = np.linalg.inv(forward)  # PIL maps output pixels back to input pixels
    centre = np.array([(w - 1) / 2, (h - 1) / 2])
    offset = centre - inverse @ (centre + shift)
    coeffs = (*inverse[0], offset[0], *inverse[1], offset[1])
    image = Image.fromarray(glyph).transform(
        (w, h), Image.Transform.AFFINE, coeffs, Image.Resampling.BILINEAR, fillcolor=PAPER
    )
    pen = int(rng.integers(-1, 2)) if rng.random() < strength else 0
    if pen:  # at 4x the resolution, so the stroke grows or shrinks by half a pixel: the model is sensitive to pen width
        image = image.resize((4 * w, 4 * h), Image.Resampling.NEAREST)
        image = image.filter(ImageFilter.MinFilter(3) if pen > 0 else ImageFilter.MaxFilter(3)).resize(
            (w, h), Image.Resampling.BOX
        )
    out = np.where(np.asarray(image) < 128, INK, PAPER).astype(np.uint8)
    flips = rng.random(out.shape) < 0.0005 * strength
    out[flips] = PAPER + INK - out[flips]
    return out


def _stroke(rng: np.random.Generator) -> np.ndarray:
    """One pen stroke as (P, 2) points in [0.15, 0.85]^2: a polyline, a smooth curve or an arc."""
    kind = rng.integers(3)
    if kind == 0:
        points = rng.uniform(0.15, 0.85, size=(int(rng.integers(2, 4)), 2))
    elif kind == 1:
        points = _bezier(rng.uniform(0.15, 0.85, size=(int(rng.integers(3, 5)), 2)))
    else:
        centre = rng.uniform(0.35, 0.65, size=2)
        radius = rng.uniform(0.1, 0.3)
        start = rng.uniform(0, 2 * np.pi)
        t = start + np.linspace(0, rng.uniform(0.6, 1.6) * np.pi, 24)
        points = centre + radius * np.stack([np.cos(t), np.sin(t)], axis=1)
    return np.clip(points, 0.15, 0.85)


def _bezier(control: np.ndarray, steps: int = 32) -> np.ndarray:
    """Points along the Bezier curve of ``control`` (K, 2), by de Casteljau."""
    t = np.linspace(0, 1, steps)[:, None, None]
    points = np.broadcast_to(control, (steps, *control.shape))
    while points.shape[1] > 1:
        points = (1 - t) * points[:, :-1] + t * points[:, 1:]
    return points[:, 0]


def on_camera(glyph: np.ndarray, seed: int, size: int = 128, strength: float = 1.0, noise: float = 4.0) -> np.ndarray:
    """``glyph`` (uint8 (H, W) <= ``size``) as a camera might see it: ``perturb``-ed by ``strength``, shifted
    on a tinted sheet of ``size`` x ``size`` pixels, with Gaussian sensor noise of ``noise`` grey levels:
    uint8 RGB (size, size, 3)."""
    rng = np.random.default_rng([seed, 2])
    h, w = glyph.shape
    sheet = rng.uniform(200, 250, size=3)  # paper under some light: RGB
    top, left = (int(rng.integers(0, size - n + 1)) for n in (h, w))
    ink = np.zeros((size, size), dtype=bool)
    ink[top : top + h, left : left + w] = perturb(glyph, seed, strength) == INK
    frame = np.where(ink[..., None], rng.uniform(0, 40, size=3), sheet) + rng.normal(0, noise, size=(size, size, 3))
    return np.clip(np.rint(frame), 0, 255).astype(np.uint8)
