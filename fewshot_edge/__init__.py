"""fewshot-edge: few-shot learning from meta-training to on-device enrollment.

This module imports nothing heavy, so ``import fewshot_edge.runtime`` works on a device
without torch. The training half lives in submodules that import torch themselves.
"""

from __future__ import annotations

# The version has one source, pyproject's [project] version, read back from the installed package's
# metadata. It is looked up on first access (PEP 562), not at import: importlib.metadata alone costs
# ~25 ms to import, which every `import fewshot_edge.runtime` on a device would otherwise pay.
__version__: str

_UNKNOWN_VERSION = "0+unknown"


def _metadata_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("fewshot-edge")
    except PackageNotFoundError:
        # Imported from a source tree that was never installed (PYTHONPATH pointing at a checkout, or the
        # runtime copied into an app): there is no metadata, and a number typed here would drift from
        # pyproject. A PEP 440 local version that sorts below every release says "unknown" honestly.
        return _UNKNOWN_VERSION


def __getattr__(name: str) -> str:
    if name == "__version__":
        value = _metadata_version()
        globals()["__version__"] = value  # later lookups find the attribute and skip this function
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
