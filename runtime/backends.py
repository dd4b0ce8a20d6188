"""Backend selection: which engine runs the encoder on this machine, and why the others do not.

The chain, best first: a TensorRT engine run directly (``tensorrt`` and CUDA bindings importable) ->
onnxruntime's TensorrtExecutionProvider -> CUDAExecutionProvider -> CPUExecutionProvider. ``select``
walks it, skipping what this machine lacks, and logs one line naming the choice and each skip's reason.
Availability is injectable (``providers``, ``tensorrt_missing``) so the order is testable anywhere.
"""

from __future__ import annotations

import importlib.util
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import onnxruntime as ort

from .bundle import Bundle
from .engine import Engine, Provider
from .errors import FewShotInputError

log = logging.getLogger("fewshot_edge.runtime")

AUTO = "auto"
TENSORRT = "tensorrt"  # a TensorRT engine, run with the tensorrt Python API
ORT_PROVIDERS = {  # onnxruntime backends: their provider lists, best first, each with its fallbacks
    "tensorrt-ep": ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"),
    "cuda": ("CUDAExecutionProvider", "CPUExecutionProvider"),
    "cpu": ("CPUExecutionProvider",),
}
BACKENDS = (TENSORRT, *ORT_PROVIDERS)
CUDA_BINDINGS = ("cuda.bindings.runtime", "cuda.cudart")  # cuda-python >= 12.6 and older


@dataclass(frozen=True)
class Selection:
    """The chosen backend; ``providers`` are the onnxruntime providers it uses (for the TensorRT
    engine, those that run the bundle's other graphs); ``skipped`` maps better backends to why not."""

    backend: str
    providers: tuple[str, ...]
    skipped: dict[str, str] = field(default_factory=dict)

    def describe(self) -> str:
        """One line: the choice and why each better backend was skipped."""
        text = (
            f"backend {self.backend} ({', '.join(self.providers)})"
            if self.backend != TENSORRT
            else "backend tensorrt (engine)"
        )
        if self.skipped:
            text += "; skipped " + "; ".join(f"{name}: {why}" for name, why in self.skipped.items())
        return text


def tensorrt_missing() -> str | None:
    """Why a TensorRT engine cannot run here (None when ``tensorrt`` and CUDA bindings are importable)."""
    if importlib.util.find_spec("tensorrt") is None:
        return "tensorrt is not installed"
    if not any(_importable(name) for name in CUDA_BINDINGS):
        return "CUDA bindings (cuda-python) are not installed"
    return None


def _importable(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:  # a missing parent package
        return False


_DETECT: Any = object()


def select(
    backend: str = AUTO, providers: Sequence[str] | None = None, tensorrt_reason: str | None = _DETECT
) -> Selection:
    """The backend to run: ``backend`` itself (an error when it cannot run here) or, for "auto", the
    first of ``BACKENDS`` that can. ``providers`` (default: this onnxruntime's) and ``tensorrt_reason``
    (why no TensorRT engine can run, None = it can; default: ``tensorrt_missing()``) describe the machine."""
    available = list(ort.get_available_providers() if providers is None else providers)
    reasons = availability(available, tensorrt_reason)
    if backend != AUTO and backend not in BACKENDS:
        raise FewShotInputError(f"backend must be one of {', '.join((AUTO, *BACKENDS))}, got {backend!r}")
    skipped: dict[str, str] = {}
    for name in BACKENDS if backend == AUTO else (backend,):
        why = reasons[name]
        if why is None:
            return Selection(name, _ort_fallback(available) if name == TENSORRT else _usable(name, available), skipped)
        if backend != AUTO:
            raise FewShotInputError(f"backend {name} cannot run here: {why}")
        skipped[name] = why
    raise FewShotInputError(f"no backend can run here: {'; '.join(f'{k}: {v}' for k, v in skipped.items())}")


def availability(
    providers: Sequence[str] | None = None, tensorrt_reason: str | None = _DETECT
) -> dict[str, str | None]:
    """Backend -> why it cannot run here (None: it can), best first; arguments as ``select``'s."""
    available = list(ort.get_available_providers() if providers is None else providers)
    trt_reason = tensorrt_missing() if tensorrt_reason is _DETECT else tensorrt_reason
    return {name: trt_reason if name == TENSORRT else _provider_missing(name, available) for name in BACKENDS}


def _provider_missing(backend: str, available: Sequence[str]) -> str | None:
    first = ORT_PROVIDERS[backend][0]
    return None if first in available else f"{first} is not in this onnxruntime build"


def _usable(backend: str, available: Sequence[str]) -> tuple[str, ...]:
    """The backend's provider list less the fallbacks this build lacks (its first provider it has)."""
    return tuple(p for p in ORT_PROVIDERS[backend] if p in available)


def _ort_fallback(available: Sequence[str]) -> tuple[str, ...]:
    """CUDA then CPU where present: the providers of the graphs a TensorRT engine does not run."""
    return _usable("cuda", available) if "CUDAExecutionProvider" in available else ("CPUExecutionProvider",)


def provider_options(providers: Sequence[str], precision: str, cache_dir: Path) -> list[Provider]:
    """The providers as onnxruntime takes them: TensorrtExecutionProvider with its engine and timing
    caches in ``cache_dir`` and the precision's flag (fp16; int8 for a QDQ model, with fp16 beside)."""
    trt_options = {
        "trt_engine_cache_enable": True,
        "trt_engine_cache_path": str(cache_dir),
        "trt_timing_cache_enable": True,
        "trt_timing_cache_path": str(cache_dir),
        "trt_fp16_enable": precision in ("fp16", "int8"),
        "trt_int8_enable": precision == "int8",
    }
    return [(p, trt_options) if p == "TensorrtExecutionProvider" else p for p in providers]


def engine_dir(bundle_dir: str | Path, override: str | Path | None = None) -> Path:
    """Where engines of this bundle are cached: ``override``, else ``<bundle>/engines`` when the bundle
    folder is writable, else ``~/.cache/fewshot-edge/engines/<bundle folder name>``."""
    if override is not None:
        return Path(override)
    bundle = Path(bundle_dir)
    if os.access(bundle, os.W_OK):
        return bundle / "engines"
    return (
        Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
        / "fewshot-edge"
        / "engines"
        / bundle.resolve().name
    )


def announce(selection: Selection) -> None:
    """The one log line (INFO, logger ``fewshot_edge.runtime``) naming the backend and the skips."""
    log.info("fewshot-edge: %s", selection.describe())


def open_encoder(
    bundle: Bundle,
    precision: str = "fp32",
    backend: str = AUTO,
    providers: Sequence[str] | None = None,
    threads: int | None = None,
    film_input: str = "film",
    engines: str | Path | None = None,
) -> Engine:
    """The bundle's ``precision`` encoder on ``backend`` ("auto": the best this machine can run, logged),
    or on exactly ``providers`` when given (an onnxruntime provider list, as before backends existed).
    onnxruntime runs a variant without the graph optimizers its manifest entry names (``disabled_optimizers``)."""
    disabled = tuple(bundle.manifest.variants.get(precision, {}).get("disabled_optimizers", ()))
    if providers is not None:
        if backend != AUTO:
            raise FewShotInputError("give a backend or a provider list, not both")
        return Engine(
            bundle.encoder_file(precision), providers, threads, film_input=film_input, disabled_optimizers=disabled
        )
    selection = select(backend)
    announce(selection)
    cache = engine_dir(bundle.path, engines)
    if selection.backend == TENSORRT:
        from .tensorrt import open_engine

        return open_engine(bundle, precision, cache, selection.providers, threads, film_input)
    if selection.backend == "tensorrt-ep":
        from .tensorrt import engine_source

        source = engine_source(bundle, precision)
        return Engine(
            source,
            provider_options(selection.providers, precision, cache / "ort-tensorrt"),
            threads,
            film_input=film_input,
        )
    return Engine(
        bundle.encoder_file(precision),
        selection.providers,
        threads,
        film_input=film_input,
        disabled_optimizers=disabled,
    )
