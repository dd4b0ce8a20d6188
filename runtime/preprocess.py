"""The one preprocessing function shared by training and the device.

Two stages, so training can keep its data set as compact uint8 arrays:
``to_pixels`` decodes, turns the image upright (EXIF orientation), brings 16-bit images to 8 bits,
composites transparency on the spec's background, converts to L or RGB, resizes (whole image, or
shorter side then centre crop) and optionally inverts, giving uint8 (C, H, W);
``normalize`` scales to [0, 1] and normalises with the spec's mean and std. ``preprocess`` runs both.
The training pipeline loads every image through ``to_pixels`` and normalises on its device with
``InputSpec.scale_shift``, the same constants ``normalize`` uses here.
"""

from __future__ import annotations

import hashlib
import io
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import ExifTags, Image, ImageOps, UnidentifiedImageError

from .errors import FewShotInputError

# Resampling filters by name. The default, "box" (area averaging), is an antialiased downscale at about a
# fifth of Lanczos's cost (105 -> 28 px: ~22 vs ~99 us here), which the device's per-image budget needs;
# "bicubic" is what most timm models were evaluated with.
RESAMPLING = {
    "box": Image.Resampling.BOX,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
}
# How the image is fitted to H x W, named as in timm's ``crop_mode``: "squash" resizes the whole image to
# (H, W) / crop_pct ignoring its aspect ratio; "center" resizes its shorter side to match, keeping the
# aspect ratio; both then cut the centre H x W (nothing when crop_pct is 1 and the mode is "squash").
CROP_MODES = ("squash", "center")
CHANNEL_ORDERS = ("RGB", "BGR")
_ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa")


@dataclass(frozen=True)
class Frame:
    """A decoded image array with its channel order stated, as a camera loop gives it: (H, W) or
    (H, W, 1) gray, (H, W, 3) colour or (H, W, 4) colour with alpha last, in ``order`` "RGB" or "BGR"
    (OpenCV's). A bare colour array is refused, as nothing in it says which order it is in."""

    pixels: np.ndarray
    order: str

    def __post_init__(self) -> None:
        if not isinstance(self.pixels, np.ndarray):
            raise FewShotInputError(f"Frame pixels must be a numpy array, got {type(self.pixels).__name__}")
        if self.order not in CHANNEL_ORDERS:
            raise FewShotInputError(f"Frame order must be 'RGB' or 'BGR', got {self.order!r}")


ImageLike = str | Path | Image.Image | np.ndarray | Frame


@dataclass(frozen=True)
class InputSpec:
    """What the encoder expects: channels (1 = L, 3 = RGB), size, normalisation, inversion.

    ``layout`` is the encoder input's axis order; the runtime feeds NCHW batches only, so nothing else is accepted.
    ``resize`` names the resampling filter; ``crop_mode`` ("squash" or "center") and ``crop_pct`` (in (0, 1],
    output size / resized size) how the image is fitted to H x W, as timm's eval transform does.
    ``background`` (uint8, 1 or ``channels`` values, before inversion) is what transparent pixels are
    composited on; white by default, so a drawing on a transparent page reads as ink on paper.
    """

    channels: int
    height: int
    width: int
    mean: tuple[float, ...] = (0.0,)
    std: tuple[float, ...] = (1.0,)
    invert: bool = False
    layout: str = "NCHW"
    resize: str = "box"
    crop_mode: str = "squash"
    crop_pct: float = 1.0
    background: tuple[int, ...] = (255,)

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
        if self.crop_mode not in CROP_MODES:
            raise FewShotInputError(f"crop_mode must be one of {', '.join(CROP_MODES)}, got {self.crop_mode!r}")
        if not 0.0 < self.crop_pct <= 1.0:
            raise FewShotInputError(f"crop_pct must be in (0, 1], got {self.crop_pct}")
        object.__setattr__(self, "crop_pct", float(self.crop_pct))
        background = tuple(self.background)
        if len(background) == 1:
            background = background * self.channels
        if len(background) != self.channels or not all(float(v).is_integer() and 0 <= v <= 255 for v in background):
            raise FewShotInputError(
                f"background needs 1 or {self.channels} integers in [0, 255], got {self.background}"
            )
        object.__setattr__(self, "background", tuple(int(v) for v in background))

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
        d["mean"], d["std"], d["background"] = list(self.mean), list(self.std), list(self.background)
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
            crop_mode=d.get("crop_mode", "squash"),
            crop_pct=float(d.get("crop_pct", 1.0)),
            background=tuple(d.get("background", (255,))),
        )


def load_image(source: ImageLike) -> Image.Image:
    """Open a path or pass a PIL image through, turned upright by its EXIF orientation; or wrap an array
    as an image: a gray (H, W[, 1]) array, or a ``Frame`` (colour arrays need one, for their channel order)."""
    if isinstance(source, Image.Image):
        return _upright(source)
    if isinstance(source, Frame):
        return _array_to_image(source.pixels, source.order)
    if isinstance(source, np.ndarray):
        return _array_to_image(source, None)
    if isinstance(source, (str, Path)):
        path = Path(source)
        if not path.is_file():
            raise FewShotInputError(f"image file not found: {path}")
        return _upright(decode_image(path, path))
    raise FewShotInputError(f"unsupported image type: {type(source).__name__}")


def decode_image(source: bytes | Path, name: str | Path) -> Image.Image:
    """Decode an image file, or an encoded image's bytes, fully loaded; ``name`` is the file or where the
    bytes were read from. An image that does not decode is a one-line ``FewShotInputError`` naming it."""
    try:
        image = Image.open(io.BytesIO(source) if isinstance(source, bytes) else source)
        with image:
            image.load()
        return image
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:  # the warning when raised as an error
        raise FewShotInputError(
            f"image too large to decode safely: {name} (over Pillow's limit of {Image.MAX_IMAGE_PIXELS} pixels;"
            f" {exc.__class__.__name__})"
        ) from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise FewShotInputError(f"not a readable image: {name} ({exc.__class__.__name__})") from None


def source_hash(source: ImageLike) -> str:
    """sha256 of an image source: a file's bytes, or an array's (a Frame's with its order) or PIL image's type, shape and pixels."""
    digest = hashlib.sha256()
    if isinstance(source, (str, Path)):
        digest.update(Path(source).read_bytes())
    elif isinstance(source, (np.ndarray, Frame)):
        array = source.pixels if isinstance(source, Frame) else source
        digest.update(f"{source.order if isinstance(source, Frame) else ''}{array.dtype.str}{array.shape}".encode())
        digest.update(np.ascontiguousarray(array).tobytes())
    elif isinstance(source, Image.Image):
        digest.update(f"{source.mode}{source.size}".encode())
        digest.update(source.tobytes())
    else:
        raise FewShotInputError(f"unsupported image type: {type(source).__name__}")
    return digest.hexdigest()


def _array_to_image(a: np.ndarray, order: str | None) -> Image.Image:
    """An (H, W[, 1|3|4]) array as an L, RGB or RGBA image; colour needs ``order``. uint8 is taken as is,
    bool as 0/255, uint16 as 16-bit (scaled), other integers as [0, 255] and floats as [0, 1]."""
    if a.ndim == 3 and a.shape[2] == 1:
        a = a[:, :, 0]
    if not (a.ndim == 2 or (a.ndim == 3 and a.shape[2] in (3, 4))):
        raise FewShotInputError(f"image array must be (H, W), (H, W, 1), (H, W, 3) or (H, W, 4); got shape {a.shape}")
    if a.size == 0:
        raise FewShotInputError("image array is empty")
    if a.ndim == 3 and order is None:
        raise FewShotInputError(
            f"a colour image array {a.shape} has no channel order: pass Frame(array, 'RGB') or Frame(array, 'BGR')"
            " (OpenCV gives BGR)"
        )
    if order == "BGR" and a.ndim == 3:
        a = a[:, :, [2, 1, 0, 3][: a.shape[2]]]
    return Image.fromarray(_to_uint8(a))


def _to_uint8(a: np.ndarray) -> np.ndarray:
    if a.dtype == np.uint8:
        return np.ascontiguousarray(a)
    if a.dtype == np.bool_:
        return a.astype(np.uint8) * 255
    if a.dtype == np.uint16:
        return _from_16_bit(a)
    if not np.issubdtype(a.dtype, np.floating) and not np.issubdtype(a.dtype, np.integer):
        raise FewShotInputError(f"image array dtype must be numeric, got {a.dtype}")
    if not np.isfinite(a).all():
        raise FewShotInputError("image array contains NaN or infinite values")
    if np.issubdtype(a.dtype, np.floating):
        if a.min() < 0.0 or a.max() > 1.0:
            raise FewShotInputError("float image arrays must hold values in [0, 1]")
        a = np.rint(a * 255.0)
    elif a.min() < 0 or a.max() > 255:
        raise FewShotInputError("integer image arrays (but uint16) must hold values in [0, 255]")
    return a.astype(np.uint8)


def _from_16_bit(a: np.ndarray) -> np.ndarray:
    """16-bit values to 8 bits, rounded: v * 255 / 65535, so 65535 -> 255 and 257 * k -> k."""
    wide = np.clip(a, 0, 65535).astype(np.uint32)
    return ((wide * 255 + 32767) // 65535).astype(np.uint8)


def _upright(image: Image.Image) -> Image.Image:
    """The image as it is meant to be seen: rotated or flipped by its EXIF (or XMP) orientation."""
    if image.getexif().get(ExifTags.Base.Orientation, 1) == 1:
        return image
    return ImageOps.exif_transpose(image)


def _to_mode(image: Image.Image, spec: InputSpec) -> Image.Image:
    """16-bit gray ("I;16", "I") scaled to L; transparency composited on the spec's background; then L or RGB."""
    if image.mode.startswith("I"):
        image = Image.fromarray(_from_16_bit(np.asarray(image)))
    if image.mode in _ALPHA_MODES or "transparency" in image.info:
        rgba = image.convert("RGBA")
        flat = Image.new(spec.mode, rgba.size, spec.background if spec.channels == 3 else spec.background[0])
        flat.paste(rgba.convert(spec.mode), mask=rgba.getchannel("A"))
        return flat
    return image if image.mode == spec.mode else image.convert(spec.mode)


def _fit(image: Image.Image, spec: InputSpec) -> Image.Image:
    """Resize to (H, W) / crop_pct, the whole image ("squash") or keeping the aspect ratio with the
    shorter side matching ("center", as torchvision's Resize(int)), then cut the centre H x W."""
    height, width = math.floor(spec.height / spec.crop_pct), math.floor(spec.width / spec.crop_pct)
    w, h = image.size
    if spec.crop_mode == "center":
        if height * w >= width * h:  # the height binds: (height / h) >= (width / w)
            width = max(width, int(w * height / h))
        else:
            height = max(height, int(h * width / w))
    if image.size != (width, height):
        image = image.resize((width, height), RESAMPLING[spec.resize])
    if (width, height) == (spec.width, spec.height):
        return image
    top, left = round((height - spec.height) / 2), round((width - spec.width) / 2)
    return image.crop((left, top, left + spec.width, top + spec.height))


def to_pixels(source: ImageLike, spec: InputSpec) -> np.ndarray:
    """Decode, turn upright, convert to the spec's mode (compositing transparency), resize and crop
    (antialiased) and optionally invert: uint8 (C, H, W)."""
    image = load_image(source)
    if image.width < 1 or image.height < 1:
        raise FewShotInputError(f"image is empty ({image.width}x{image.height} pixels)")
    try:
        image.load()  # a closed PIL image fails here, in its own words
    except (ValueError, OSError) as exc:
        raise FewShotInputError(f"image cannot be read ({exc})") from None
    try:
        image = _fit(_to_mode(image, spec), spec)
    except (ValueError, OSError) as exc:
        raise FewShotInputError(f"cannot convert a {image.mode} image to {spec.mode} ({exc})") from None
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
