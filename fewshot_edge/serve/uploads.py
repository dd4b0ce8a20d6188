"""Reading a request's images and fields, multipart or JSON, within the service's limits.

Each image arrives as encoded bytes (a multipart file part, or a base64 string in a JSON body, a
``data:`` URL included); its size in pixels is read from its header before it is decoded, so an image
over the limit costs no decoding memory.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
from dataclasses import dataclass
from typing import Any

from PIL import Image, UnidentifiedImageError
from starlette.datastructures import UploadFile
from starlette.requests import Request

from fewshot_edge.runtime.preprocess import decode_image

_MAX_PARTS = 100_000  # the body's size already bounds the number of parts


class ApiError(Exception):
    """An error the service answers with ``status`` and ``{"error": message}`` (one line)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = " ".join(message.split())


@dataclass(frozen=True)
class Limits:
    """What one request may hold: its body in bytes, its number of images, each image's pixels."""

    max_request_bytes: int = 16 * 1024 * 1024
    max_images: int = 64
    max_image_pixels: int = 4096 * 4096


@dataclass(frozen=True)
class Upload:
    """The fields of a request (text values) and its images: (name, encoded bytes) in the order sent."""

    fields: dict[str, Any]
    images: list[tuple[str, bytes]]


async def read_upload(request: Request, limits: Limits) -> Upload:
    """A multipart form (text fields; images as file parts named ``images``) or a JSON object (its
    fields; ``images`` a list of base64 strings), whichever the request's content type says."""
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if kind in ("multipart/form-data", "application/x-www-form-urlencoded"):  # the latter: a form without files
        form = await request.form(max_files=_MAX_PARTS, max_fields=_MAX_PARTS)  # counted below; bytes are capped
        fields: dict[str, Any] = {k: v for k, v in form.multi_items() if isinstance(v, str)}
        files = [v for k, v in form.multi_items() if k == "images" and isinstance(v, UploadFile)]
        _check_count(len(files), limits)
        images = [(f.filename or f"image {i}", await f.read()) for i, f in enumerate(files)]
        await form.close()
        return Upload(fields, images)
    if kind == "application/json":
        body = await read_json(request)
        given = body.get("images", [])
        if not isinstance(given, list) or not all(isinstance(g, str) for g in given):
            raise ApiError(400, "images must be a list of base64-encoded image files")
        _check_count(len(given), limits)
        return Upload(body, [(f"image {i}", _from_base64(g, i)) for i, g in enumerate(given)])
    raise ApiError(400, f"send multipart/form-data or application/json, not {kind or 'no content type'}")


async def read_json(request: Request) -> dict[str, Any]:
    """The request's body as a JSON object."""
    try:
        body = json.loads(await request.body())
    except (ValueError, UnicodeDecodeError) as exc:
        raise ApiError(400, f"the body is not valid JSON ({exc.__class__.__name__})") from None
    if not isinstance(body, dict):
        raise ApiError(400, "the body must be a JSON object")
    return body


def decode_all(images: list[tuple[str, bytes]], limits: Limits) -> list[Image.Image]:
    """Every image decoded (blocking: run it in a worker thread); none given is a 400, one over the
    pixel limit a 413, one that does not decode a 400 naming it."""
    if not images:
        raise ApiError(400, "no images given (send them as 'images')")
    return [_decode(name, data, limits) for name, data in images]


def _decode(name: str, data: bytes, limits: Limits) -> Image.Image:
    try:
        with Image.open(io.BytesIO(data)) as header:
            width, height = header.size
    except Image.DecompressionBombError:
        raise ApiError(413, f"image {name} is over Pillow's limit of {Image.MAX_IMAGE_PIXELS} pixels") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise ApiError(400, f"not a readable image: {name} ({exc.__class__.__name__})") from None
    if width * height > limits.max_image_pixels:
        raise ApiError(
            413, f"image {name} is {width}x{height} pixels, over the limit of {limits.max_image_pixels} pixels"
        )
    return decode_image(data, name)


def _from_base64(text: str, index: int) -> bytes:
    payload = text.split(",", 1)[1] if text.startswith("data:") else text
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise ApiError(400, f"image {index} is not valid base64") from None


def _check_count(count: int, limits: Limits) -> None:
    if count > limits.max_images:
        raise ApiError(413, f"{count} images in one request, over the limit of {limits.max_images}")
