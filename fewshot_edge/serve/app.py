"""The REST service over one ``FewShotModel``: enroll, add shots, list, rename, remove, predict, and the
operators' page at ``/``.

Every error is one line of JSON, ``{"error": "..."}``, with its status: 400 bad input, 401 no or a wrong
API key, 404 unknown class or path, 409 a label already enrolled, 413 a request or an image over the
limits; anything unexpected is a 500 naming only the exception's type (the traceback goes to the
server's log, never into a response). The model serves reads in parallel and serialises writes; the
service also serialises its check-then-write steps (is the label free? then enroll it), so two requests
enrolling one label get one 201 and one 409.
"""

from __future__ import annotations

import dataclasses
import hmac
import io
import threading
from collections.abc import Awaitable, Callable, Sequence
from importlib import resources
from typing import Any
from urllib.parse import urlsplit

import numpy as np
from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.security import APIKeyHeader
from fastapi.staticfiles import StaticFiles
from PIL import Image
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from fewshot_edge import __version__
from fewshot_edge.runtime import FewShotInputError, FewShotModel, Prediction, validate_label
from fewshot_edge.runtime.store import normalize_label

from .uploads import ApiError, Limits, Upload, decode_all, read_json, read_upload

API_KEY_HEADER = "X-API-Key"
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")
STATIC = resources.files(__package__ or "fewshot_edge.serve") / "static"

# The request bodies the image endpoints read themselves (multipart or JSON), for the OpenAPI schema.
_IMAGES_MULTIPART = {"type": "array", "items": {"type": "string", "format": "binary"}}
_IMAGES_JSON = {"type": "array", "items": {"type": "string", "description": "a base64 image file or data: URL"}}


def _images_body(**fields: dict[str, Any]) -> dict[str, Any]:
    def schema(images: dict[str, Any]) -> dict[str, Any]:
        return {"type": "object", "required": ["images"], "properties": {**fields, "images": images}}

    return {
        "requestBody": {
            "required": True,
            "content": {
                "multipart/form-data": {"schema": schema(_IMAGES_MULTIPART)},
                "application/json": {"schema": schema(_IMAGES_JSON)},
            },
        }
    }


def create_app(
    model: FewShotModel,
    precision: str = "fp32",
    api_key: str | None = None,
    limits: Limits | None = None,
    hosts: Sequence[str] | None = LOOPBACK_HOSTS,
) -> FastAPI:
    """The service over ``model`` (opened by the caller, who closes it). With ``api_key``, every
    endpoint but ``/health``, the page and the OpenAPI schema needs it in the ``X-API-Key`` header.

    Requests must name one of ``hosts`` in their Host header (None = any: for a service bound beyond
    loopback), so a web page cannot reach a loopback service by rebinding its own name to 127.0.0.1;
    a browser's cross-origin POST, PATCH or DELETE (an Origin that is not the Host) is refused (403)."""
    limits = limits or Limits()
    service = _Service(model, precision, limits)
    app = FastAPI(
        title="fewshot-edge",
        version=__version__,
        description="Few-shot enrollment and prediction on the device. Errors: one line, {'error': ...}.",
        docs_url=None,  # the interactive docs load their scripts from a CDN; the device may be offline
        redoc_url=None,
    )
    app.add_middleware(_BodyLimit, max_bytes=limits.max_request_bytes)
    app.add_middleware(_SameOrigin, hosts=hosts)
    _add_error_handlers(app)
    api = APIRouter(dependencies=[Depends(_key_check(api_key))])

    @app.get("/health")
    def health() -> dict[str, str]:
        return {"status": "ok"}

    @api.get("/info")
    def info() -> dict[str, Any]:
        return service.info(api_key is not None)

    @api.get("/classes")
    def list_classes() -> dict[str, Any]:
        return {"classes": [{"label": label, "shots": n} for label, n in model.classes()]}

    @api.get("/classes/{label}")
    def get_class(label: str) -> dict[str, Any]:
        name = service.enrolled(label)
        return {"label": name, "shots": dict(model.classes()).get(name, 0)}

    @api.get("/classes/{label}/thumbnail", response_class=Response, responses={200: {"content": {"image/png": {}}}})
    def thumbnail(label: str) -> Response:
        return Response(service.thumbnail(label), media_type="image/png", headers={"Cache-Control": "no-cache"})

    @api.post("/classes", status_code=201, openapi_extra=_images_body(label={"type": "string"}))
    async def enroll(request: Request) -> dict[str, Any]:
        """Enroll a new class from its images (all or nothing): 409 when the label is enrolled."""
        upload = await read_upload(request, limits)
        return await run_in_threadpool(service.enroll, upload)

    @api.post("/classes/{label}/shots", openapi_extra=_images_body())
    async def add_shots(label: str, request: Request) -> dict[str, Any]:
        """Add images to an enrolled class (all or nothing); images it already holds are skipped."""
        upload = await read_upload(request, limits)
        return await run_in_threadpool(service.add_shots, label, upload)

    @api.patch(
        "/classes/{label}",
        openapi_extra={
            "requestBody": {
                "required": True,
                "content": {
                    "application/json": {
                        "schema": {"type": "object", "required": ["label"], "properties": {"label": {"type": "string"}}}
                    }
                },
            }
        },
    )
    async def rename(label: str, request: Request) -> dict[str, Any]:
        """Rename a class: ``{"label": NEW}``."""
        new = (await read_json(request)).get("label")
        return await run_in_threadpool(service.rename, label, new)

    @api.delete("/classes/{label}")
    def remove(label: str) -> dict[str, Any]:
        return service.remove(label)

    @api.post("/predict", openapi_extra=_images_body(top_k={"type": "integer", "minimum": 1, "default": 1}))
    async def predict(request: Request) -> dict[str, Any]:
        """The class of each image: label ("unknown" beyond the open-set threshold), probability,
        distance to the nearest class, the uncertainty the model gives (entropy, epistemic), the top k and
        every class's probability."""
        upload = await read_upload(request, limits)
        return await run_in_threadpool(service.predict, upload)

    app.include_router(api)

    @app.get("/", include_in_schema=False)
    def page() -> FileResponse:
        return FileResponse(str(STATIC / "index.html"))

    app.mount("/static", StaticFiles(directory=str(STATIC)), name="static")
    return app


class _Service:
    """What the endpoints do, on the model (blocking: called from worker threads)."""

    def __init__(self, model: FewShotModel, precision: str, limits: Limits) -> None:
        self.model = model
        self.precision = precision
        self.limits = limits
        self._writes = threading.Lock()  # a check (is the label enrolled?) and the write it guards, as one step

    def info(self, auth: bool) -> dict[str, Any]:
        model, spec = self.model, self.model.spec
        providers = [p if isinstance(p, str) else p[0] for p in getattr(model.engine, "providers", [])]
        return {
            "version": __version__,
            "bundle": str(model.bundle.path),
            "model_id": model.bundle.model_id,
            "mode": model.adapter.name,
            "precision": self.precision,
            "backend": _backend(type(model.engine).__name__, providers),
            "providers": providers,
            "input": {"channels": spec.channels, "height": spec.height, "width": spec.width},
            "store": model.store.name,
            "classes": len(model.classes()),
            "auth": auth,
            "limits": dataclasses.asdict(self.limits),
        }

    def enrolled(self, label: str) -> str:
        """The stored label ``label`` names (normalised as enrollment stores it); 404 when none."""
        name = normalize_label(label)
        if name not in dict(self.model.classes()):
            raise ApiError(404, f"no class {name!r} enrolled")
        return name

    def enroll(self, upload: Upload) -> dict[str, Any]:
        label = validate_label(_text(upload.fields, "label"))
        images = decode_all(upload.images, self.limits)
        with self._writes:
            if label in dict(self.model.classes()):
                raise ApiError(409, f"class {label!r} is already enrolled; POST more images to /classes/<label>/shots")
            self.model.enroll_many({label: images})
            return {"label": label, "shots": dict(self.model.classes())[label]}

    def add_shots(self, label: str, upload: Upload) -> dict[str, Any]:
        images = decode_all(upload.images, self.limits)
        with self._writes:
            name = self.enrolled(label)
            skipped = self.model.enroll_many({name: images}, add=True).get(name, [])
            shots = dict(self.model.classes())[name]
        return {"label": name, "shots": shots, "added": len(images) - len(skipped), "skipped": skipped}

    def rename(self, label: str, new: object) -> dict[str, Any]:
        if not isinstance(new, str):
            raise ApiError(400, "give the new name as {'label': NEW}")
        new = validate_label(new)
        with self._writes:
            old = self.enrolled(label)
            if new in dict(self.model.classes()) and new != old:
                raise ApiError(409, f"class {new!r} already exists")
            self.model.rename(old, new)
            return {"label": new, "shots": dict(self.model.classes())[new]}

    def remove(self, label: str) -> dict[str, Any]:
        with self._writes:
            name = self.enrolled(label)
            shots = dict(self.model.classes())[name]
            self.model.remove_class(name)
        return {"removed": name, "shots": shots}

    def predict(self, upload: Upload) -> dict[str, Any]:
        top_k = _top_k(upload.fields.get("top_k", 1))
        images = decode_all(upload.images, self.limits)
        # every class ranked in one pass: the first k are the top k, all of them the probabilities
        predictions = self.model.predict(images, top_k=2**31 - 1)
        return {
            "predictions": [
                _prediction(name, p, top_k) for (name, _), p in zip(upload.images, predictions, strict=True)
            ]
        }

    def thumbnail(self, label: str) -> bytes:
        """A PNG of the class's first stored shot, as the model sees it (inversion undone)."""
        name = self.enrolled(label)
        shots = self.model.store.shots(pixels=True)
        if name not in shots.labels or shots.pixels is None:  # removed in between
            raise ApiError(404, f"no class {name!r} enrolled")
        first = int(np.flatnonzero(shots.targets == shots.labels.index(name))[0])
        pixels = shots.pixels[first]
        pixels = 255 - pixels if self.model.spec.invert else pixels
        image = Image.fromarray(pixels[0] if pixels.shape[0] == 1 else pixels.transpose(1, 2, 0))
        out = io.BytesIO()
        image.save(out, format="PNG")
        return out.getvalue()


def _prediction(name: str, p: Prediction, top_k: int) -> dict[str, Any]:
    return {
        "image": name,
        "label": p.label,
        "probability": p.probability,
        "distance": p.distance,
        "entropy": p.entropy,
        "epistemic": p.epistemic,
        "unknown": p.label != p.top_k[0][0],
        "top_k": [{"label": k, "probability": v} for k, v in p.top_k[:top_k]],
        "probabilities": dict(p.top_k),
    }


def _backend(engine_type: str, providers: list[str]) -> str:
    """The backend's name as ``--backend`` spells it."""
    if engine_type == "TensorRTEngine":
        return "tensorrt"
    names = {"TensorrtExecutionProvider": "tensorrt-ep", "CUDAExecutionProvider": "cuda", "CPUExecutionProvider": "cpu"}
    return names.get(providers[0], providers[0]) if providers else "unknown"


def _text(fields: dict[str, Any], name: str) -> str:
    value = fields.get(name)
    if not isinstance(value, str):
        raise ApiError(400, f"give the class's {name} as the '{name}' field")
    return value


def _top_k(value: object) -> int:
    try:
        top_k = int(value)  # type: ignore[call-overload]
    except (TypeError, ValueError):
        raise ApiError(400, f"top_k must be a whole number, got {value!r}") from None
    if top_k < 1 or str(top_k) != str(value).strip():
        raise ApiError(400, f"top_k must be a whole number of at least 1, got {value!r}")
    return top_k


def _key_check(api_key: str | None) -> Callable[[str | None], None]:
    header = APIKeyHeader(name=API_KEY_HEADER, auto_error=False)

    def check(given: str | None = Depends(header)) -> None:
        if api_key is not None and not (given and hmac.compare_digest(given.encode(), api_key.encode())):
            raise ApiError(401, f"missing or wrong API key (send it in the {API_KEY_HEADER} header)")

    return check


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": " ".join(message.split())}, status_code=status)


def _add_error_handlers(app: FastAPI) -> None:
    """One-line JSON errors with their status codes; never a traceback in a response."""

    async def api_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, ApiError)
        return _error(exc.status, exc.message)

    async def input_error(request: Request, exc: Exception) -> Response:
        return _error(400, str(exc))

    async def http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        return _error(exc.status_code, str(exc.detail))

    async def invalid(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, RequestValidationError)
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(part) for part in first.get("loc", ()))
        return _error(400, f"{where}: {first.get('msg', 'invalid request')}")

    async def unexpected(request: Request, exc: Exception) -> Response:
        return _error(500, f"internal error ({exc.__class__.__name__}); see the server's log")

    handlers: dict[Any, Callable[[Request, Exception], Awaitable[Response]]] = {
        ApiError: api_error,
        FewShotInputError: input_error,
        HTTPException: http_error,
        RequestValidationError: invalid,
        Exception: unexpected,
    }
    for kind, handler in handlers.items():
        app.add_exception_handler(kind, handler)


class _BodyLimit:
    """Reads a request's body up to ``max_bytes`` before the app sees it; a larger one (by its
    Content-Length, or as it streams in) is answered 413 without reading the rest."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = dict(scope["headers"]).get(b"content-length", b"0")
        if not length.isdigit() or int(length) > self.max_bytes:
            await self._refuse(scope, receive, send, length)
            return
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.max_bytes:
                await self._refuse(scope, receive, send, str(size).encode() + b"+")
                return
            more = message.get("more_body", False)
        body, delivered = b"".join(chunks), False

        async def replay() -> Message:
            nonlocal delivered
            if delivered:
                return await receive()
            delivered = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, replay, send)

    async def _refuse(self, scope: Scope, receive: Receive, send: Send, length: bytes) -> None:
        if not length.rstrip(b"+").isdigit():
            response = _error(400, "bad Content-Length header")
        else:
            response = _error(
                413, f"request body of {length.decode()} bytes is over the limit of {self.max_bytes} bytes"
            )
        response.headers["Connection"] = "close"
        await response(scope, receive, send)


class _SameOrigin:
    """Refuses a Host header outside ``hosts`` (400; None = any) and a cross-origin POST, PATCH, PUT or
    DELETE from a browser (403: its Origin names another host and port than the request's Host)."""

    def __init__(self, app: ASGIApp, hosts: Sequence[str] | None) -> None:
        self.app = app
        self.hosts = None if hosts is None else {h.lower() for h in hosts}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
            host = headers.get("host", "")
            origin = headers.get("origin")
            refusal = None
            if self.hosts is not None and (_hostname(host) or "") not in self.hosts:
                refusal = _error(400, f"Host {host!r} is not served here (a loopback service answers loopback names)")
            elif scope["method"] not in ("GET", "HEAD", "OPTIONS") and origin and urlsplit(origin).netloc != host:
                refusal = _error(403, f"cross-origin {scope['method']} from {origin} refused")
            if refusal is not None:
                await refusal(scope, receive, send)
                return
        await self.app(scope, receive, send)


def _hostname(host: str) -> str | None:
    try:
        return urlsplit(f"//{host}").hostname
    except ValueError:
        return None
