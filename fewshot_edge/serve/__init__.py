"""``fewshot-edge serve``: a local REST service and an enrollment page over one ``FewShotModel`` (the
``[serve]`` extra: FastAPI, uvicorn, python-multipart). Device side: it imports the runtime, never torch."""

from .app import API_KEY_HEADER, LOOPBACK_HOSTS, create_app
from .uploads import Limits

__all__ = ["API_KEY_HEADER", "LOOPBACK_HOSTS", "Limits", "create_app"]
