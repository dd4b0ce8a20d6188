"""``serve``: the REST service and enrollment page (``fewshot_edge.serve``) on the CLI's bundle and store.

Safe by default: it binds to 127.0.0.1; any other address needs an API key or an explicit
``--insecure``, checked before anything is opened or bound.
"""

from __future__ import annotations

import ipaddress
import socket
from pathlib import Path
from typing import Any

import click

from .common import InputError, main, reports_input_errors, require_modules
from .device import open_model
from .options import engine_options, mode_options, store_options

API_KEY_ENV = "FEWSHOT_EDGE_API_KEY"


def is_loopback(host: str) -> bool:
    """Whether ``host`` names this machine only (localhost, 127.0.0.0/8, ::1)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


@main.command()
@store_options
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to bind; not loopback needs a key.")
@click.option("--port", default=8000, show_default=True, type=click.IntRange(0, 65535), help="TCP port.")
@click.option(
    "--api-key",
    envvar=API_KEY_ENV,
    show_envvar=True,
    metavar="KEY",
    help="Require this key in every API request's X-API-Key header (prefer the environment variable).",
)
@click.option("--insecure", is_flag=True, help="Serve on a non-loopback address without an API key.")
@click.option("--max-request-mb", default=16.0, show_default=True, type=click.FloatRange(min=0, min_open=True))
@click.option("--max-images", default=64, show_default=True, type=click.IntRange(1), help="Images per request.")
@click.option(
    "--max-image-pixels", default=4096 * 4096, show_default=True, type=click.IntRange(1), help="Pixels per image."
)
@click.option(
    "--ssl-certfile",
    type=click.Path(exists=True, dir_okay=False),
    help="Serve HTTPS (browser cameras need it off localhost).",
)
@click.option("--ssl-keyfile", type=click.Path(exists=True, dir_okay=False), help="The certificate's private key.")
@mode_options
@engine_options
@reports_input_errors
def serve(
    bundle: str | None,
    store: str,
    reembed: bool,
    adapt: str | None,
    steps: int | None,
    host: str,
    port: int,
    api_key: str | None,
    insecure: bool,
    max_request_mb: float,
    max_images: int,
    max_image_pixels: int,
    ssl_certfile: str | None,
    ssl_keyfile: str | None,
    engine: dict[str, Any],
) -> None:
    """Serve a REST API and an enrollment page at http://HOST:PORT/ over the bundle and store.

    \b
    The store is the one enroll, predict and classes use: classes enrolled over HTTP are there for
    the CLI, and the other way round. The OpenAPI schema is at /openapi.json; see docs/serve.md.
      fewshot-edge serve --store device.db                        # http://127.0.0.1:8000/
      FEWSHOT_EDGE_API_KEY=... fewshot-edge serve --store device.db --host 0.0.0.0
    """
    if api_key is not None and not api_key.strip():
        raise InputError(f"the API key is empty (--api-key or {API_KEY_ENV})")
    if not is_loopback(host) and api_key is None and not insecure:
        raise InputError(
            f"--host {host} is not a loopback address: give an API key (--api-key or {API_KEY_ENV}),"
            " or --insecure to serve without one"
        )
    if (ssl_certfile is None) != (ssl_keyfile is None):
        raise InputError("give --ssl-certfile and --ssl-keyfile together")
    require_modules("fastapi", "uvicorn", "python_multipart", extra="serve")
    import uvicorn

    from fewshot_edge.serve import LOOPBACK_HOSTS, Limits, create_app

    limits = Limits(int(max_request_mb * 1024 * 1024), max_images, max_image_pixels)
    adapt_options = None if steps is None else {"steps": steps}
    with (
        listening(host, port) as sock,
        open_model(bundle, store, reembed, adapt, create=True, adapt_options=adapt_options, engine=engine) as model,
    ):
        app = create_app(model, engine["precision"], api_key, limits, LOOPBACK_HOSTS if is_loopback(host) else None)
        scheme = "https" if ssl_certfile else "http"
        shown = f"[{host}]" if ":" in host else host
        click.echo(
            f"serving {Path(store)} ({len(model.classes())} classes, mode {model.adapter.name})"
            f" at {scheme}://{shown}:{sock.getsockname()[1]}/{' with an API key' if api_key else ''}"
        )
        config = uvicorn.Config(app, log_level="warning", ssl_certfile=ssl_certfile, ssl_keyfile=ssl_keyfile)
        uvicorn.Server(config).run(sockets=[sock])


def listening(host: str, port: int) -> socket.socket:
    """The server's socket, bound before anything is served, so a port in use or an address this machine
    does not have is one line and exit 2 rather than uvicorn's error after the 'serving' line."""
    address = host.strip("[]")
    sock = socket.socket(socket.AF_INET6 if ":" in address else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((address, port))
    except OSError as exc:
        sock.close()
        raise InputError(f"cannot serve on {host}:{port}: {exc.strerror or exc}") from None
    return sock
