"""The one preprocessing function shared by training and the device.

Two stages, so training can keep its data set as compact uint8 arrays:
``to_pixels`` decodes, converts to L or RGB, resizes and optionally inverts, giving uint8 (C, H, W);
``normalize`` scales to [0, 1] and normalises with the spec's mean and std. ``preprocess`` runs both.
The training pipeline loads every image through ``to_pixels`` and normalises on its device with
``InputSpec.scale_shift``, the same constants ``normalize`` uses here.
"""

from __future__ import annotations

import hashlib
import io
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

from .errors import FewShotInputError

ImageLike = str | Path | Image.Image | np.ndarray

# Resampling filters by name. The default, "box" (area averaging), is an antialiased downscale at about a
# fifth of Lanczos's cost (105 -> 28 px: ~22 vs ~99 us here), which the device's per-image budget needs.
RESAMPLING = {"box": Image.Resampling.BOX, "bilinear": Image.Resampling.BILINEAR, "lanczos": Image.Resampling.LANCZOS}


@dataclass(frozen=True)
class InputSpec:
    """What the encoder expects: channels (1 = L, 3 = RGB), size, normalisation, inversion.

    ``layout`` is the encoder input's axis order; the runtime feeds NCHW batches only, so nothing else is accepted.
    """

    channels: int
    height: int
    width: int
    mean: tuple[float, ...] = (0.0,)
    std: tuple[float, ...] = (1.0,)
    invert: bool = False
    layout: str = "NCHW"
    resize: str = "box"

    def __post_init__(self) -> None:
        if self.channels not in (1, 3):
            raise FewShotInputError(f"channels must be 1 or 3, got {self.channels}")
        if self.height < 1 or self.width < 1:
            raise FewShotInputError(f"image size must be positive, got {self.height}x{self.width}")
        for name in ("mean", "std"):
            values = tuple(float(v) for v in getattr(self, name))
            if len(values) == 1:
                values = values * self.channels
            if len(values) != self.channels:
                raise FewShotInputError(f"{name} needs 1 or {self.channels} values, got {len(values)}")
            object.__setattr__(self, name, values)
        if any(s <= 0 for s in self.std):
            raise FewShotInputError(f"std must be positive, got {self.std}")
        if self.layout != "NCHW":
            raise FewShotInputError(f"input layout must be NCHW (the only one the runtime feeds), got {self.layout!r}")
        if self.resize not in RESAMPLING:
            raise FewShotInputError(f"resize must be one of {', '.join(RESAMPLING)}, got {self.resize!r}")

    @property
    def mode(self) -> str:
        return "L" if self.channels == 1 else "RGB"

    def scale_shift(self) -> tuple[np.ndarray, np.ndarray]:
        """Per-channel (scale, shift) with normalised = pixels * scale + shift, shaped (C, 1, 1)."""
        std = np.asarray(self.std, dtype=np.float32).reshape(-1, 1, 1)
        mean = np.asarray(self.mean, dtype=np.float32).reshape(-1, 1, 1)
        return (1.0 / (255.0 * std)).astype(np.float32), (-mean / std).astype(np.float32)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["mean"], d["std"] = list(self.mean), list(self.std)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> InputSpec:
        return cls(
            channels=int(d["channels"]),
            height=int(d["height"]),
            width=int(d["width"]),
            mean=tuple(d.get("mean", (0.0,))),
            std=tuple(d.get("std", (1.0,))),
            invert=bool(d.get("invert", False)),
            layout=d.get("layout", "NCHW"),
            resize=d.get("resize", "box"),
        )


def load_image(source: ImageLike) -> Image.Image:
    """Open a path, pass a PIL image through, or wrap a uint8/float array (H, W[, C]) as an image."""
    if isinstance(source, Image.Image):
        return source
    if isinstance(source, np.ndarray):
        return _array_to_image(source)
    if isinstance(source, (str, Path)):
        path = Path(source)
        if not path.is_file():
            raise FewShotInputError(f"image file not found: {path}")
        return decode_image(path, path)
    raise FewShotInputError(f"unsupported image type: {type(source).__name__}")


def decode_image(source: bytes | Path, name: str | Path) -> Image.Image:
    """Decode an image file, or an encoded image's bytes, fully loaded; ``name`` is the file or where the
    bytes were read from. An image that does not decode is a one-line ``FewShotInputError`` naming it."""
    try:
        image = Image.open(io.BytesIO(source) if isinstance(source, bytes) else source)
        with image:
            image.load()
        return image
    except (UnidentifiedImageError, OSError, SyntaxError) as exc:
        raise FewShotInputError(f"not a readable image: {name} ({exc.__class__.__name__})") from None


def source_hash(source: ImageLike) -> str:
    """sha256 of an image source: a file's bytes, or an array's or PIL image's type, shape and pixels."""
    digest = hashlib.sha256()
    if isinstance(source, (str, Path)):
        digest.update(Path(source).read_bytes())
    elif isinstance(source, np.ndarray):
        digest.update(f"{source.dtype.str}{source.shape}".encode())
        digest.update(np.ascontiguousarray(source).tobytes())
    elif isinstance(source, Image.Image):
        digest.update(f"{source.mode}{source.size}".encode())
        digest.update(source.tobytes())
    else:
        raise FewShotInputError(f"unsupported image type: {type(source).__name__}")
    return digest.hexdigest()


def _array_to_image(a: np.ndarray) -> Image.Image:
    if a.ndim == 3 and a.shape[2] == 1:
        a = a[:, :, 0]
    if not (a.ndim == 2 or (a.ndim == 3 and a.shape[2] in (3, 4))):
        raise FewShotInputError(f"image array must be (H, W), (H, W, 1), (H, W, 3) or (H, W, 4); got shape {a.shape}")
    if a.size == 0:
        raise FewShotInputError("image array is empty")
    if a.dtype == np.uint8:
        return Image.fromarray(a)
    if a.dtype == np.bool_:
        return Image.fromarray(a.astype(np.uint8) * 255)
    if not np.issubdtype(a.dtype, np.floating) and not np.issubdtype(a.dtype, np.integer):
        raise FewShotInputError(f"image array dtype must be numeric, got {a.dtype}")
    if not np.isfinite(a).all():
        raise FewShotInputError("image array contains NaN or infinite values")
    if np.issubdtype(a.dtype, np.floating):
        if a.min() < 0.0 or a.max() > 1.0:
            raise FewShotInputError("float image arrays must hold values in [0, 1]")
        a = np.rint(a * 255.0)
    elif a.min() < 0 or a.max() > 255:
        raise FewShotInputError("integer image arrays must hold values in [0, 255]")
    return Image.fromarray(a.astype(np.uint8))


def to_pixels(source: ImageLike, spec: InputSpec) -> np.ndarray:
    """Decode, convert to the spec's mode, resize (antialiased) and optionally invert: uint8 (C, H, W)."""
    image = load_image(source)
    if image.mode != spec.mode:
        image = image.convert(spec.mode)
    if image.size != (spec.width, spec.height):
        image = image.resize((spec.width, spec.height), RESAMPLING[spec.resize])
    pixels = np.asarray(image, dtype=np.uint8)
    pixels = pixels[None] if pixels.ndim == 2 else pixels.transpose(2, 0, 1)
    if spec.invert:
        pixels = 255 - pixels
    return np.ascontiguousarray(pixels)


def normalize(pixels: np.ndarray, spec: InputSpec) -> np.ndarray:
    """uint8 pixels (..., C, H, W) to the encoder's float32 input."""
    scale, shift = spec.scale_shift()
    return pixels.astype(np.float32) * scale + shift


def preprocess(images: Sequence[ImageLike], spec: InputSpec) -> np.ndarray:
    """Images (paths, PIL images or arrays) to a float32 batch (N, C, H, W) for the encoder."""
    if len(images) == 0:
        raise FewShotInputError("no images given")
    return normalize(np.stack([to_pixels(im, spec) for im in images]), spec)
