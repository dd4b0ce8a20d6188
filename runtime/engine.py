"""The encoder engine: one onnxruntime session, an explicit provider list, embeddings in chunks.

A FiLM encoder takes a second input, the film vector (F,) that conditions it; ``ContextEngine``
runs the graph that computes that vector from a set of images.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
from onnxruntime.capi.onnxruntime_pybind11_state import InvalidArgument

from .errors import FewShotInputError

DEFAULT_PROVIDERS = ("CPUExecutionProvider",)


Provider = str | tuple[str, dict[str, Any]]  # a name, or (name, provider options)


def _open_session(
    path: str | Path,
    providers: Sequence[Provider],
    threads: int | None,
    what: str,
    disabled_optimizers: Sequence[str] = (),
) -> ort.InferenceSession:
    """An optimised session on exactly these providers, less the named graph optimizers (a model may
    need one off to run fast); a missing provider or unreadable model is a FewShotInputError."""
    missing = [
        p for p in (p if isinstance(p, str) else p[0] for p in providers) if p not in ort.get_available_providers()
    ]
    if missing:
        raise FewShotInputError(
            f"execution provider(s) not available: {', '.join(missing)} (available: {', '.join(ort.get_available_providers())})"
        )
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads is not None:
        if threads < 1:
            raise FewShotInputError(f"threads must be positive, got {threads}")
        options.intra_op_num_threads = threads
    try:
        extra = {"disabled_optimizers": list(disabled_optimizers)} if disabled_optimizers else {}
        return ort.InferenceSession(str(path), sess_options=options, providers=list(providers), **extra)
    except Exception as exc:  # onnxruntime raises its own exception types for unreadable models
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else exc.__class__.__name__
        raise FewShotInputError(f"cannot load {what} {path}: {reason}") from None


def _static(shape: Sequence[object]) -> tuple[int | None, ...]:
    return tuple(d if isinstance(d, int) else None for d in shape)


class Engine:
    """An ONNX encoder: float32 images (N, C, H, W) in, float32 embeddings (N, D) out.

    ``providers`` are tried in order (default CPU only), each a name or (name, options); asking for
    one this onnxruntime build lacks is an error rather than a silent CPU fallback. ``threads`` sets intra-op threads
    (None = onnxruntime's default). Batches above ``max_batch`` (or a fixed batch size in the
    graph) are run in chunks. A FiLM encoder has a second input named ``film_input``, a float32
    vector (F,) that ``embed`` must then be given (``film_size`` is F when the graph fixes it).
    """

    def __init__(
        self,
        onnx_path: str | Path,
        providers: Sequence[Provider] | None = None,
        threads: int | None = None,
        max_batch: int = 64,
        film_input: str = "film",
        disabled_optimizers: Sequence[str] = (),
    ) -> None:
        self.path = Path(onnx_path)
        self.providers = list(providers or DEFAULT_PROVIDERS)
        self.threads = threads
        self._session = _open_session(onnx_path, self.providers, threads, "encoder", disabled_optimizers)
        inputs, outputs = self._session.get_inputs(), self._session.get_outputs()
        films = [i for i in inputs if i.name == film_input] if len(inputs) == 2 else []
        if len(inputs) != 1 and not films:
            raise FewShotInputError(
                f"encoder {onnx_path} must take one input (images) or two (images and {film_input!r}),"
                f" it takes {', '.join(i.name for i in inputs)}"
            )
        images = next(i for i in inputs if i.name != film_input) if films else inputs[0]
        self._input_name = images.name
        self._film_name: str | None = films[0].name if films else None
        self.film_size: int | None = _static(films[0].shape)[0] if films and films[0].shape else None
        self._output_names = [outputs[0].name]
        self.input_shape = _static(images.shape)
        self._fixed_batch = self.input_shape[0] if self.input_shape else None
        self.max_batch = self._fixed_batch or max_batch

    @property
    def takes_film(self) -> bool:
        return self._film_name is not None

    def embed(self, batch: np.ndarray, film: np.ndarray | None = None) -> np.ndarray:
        """Embeddings (N, D) for a float32 batch (N, C, H, W), under ``film`` (F,) for a FiLM encoder."""
        if (film is None) != (self._film_name is None):
            raise FewShotInputError(
                f"encoder {self.path.name} takes a FiLM input {self._film_name!r}: embed with a film vector (adaptation mode 'film')"
                if film is None
                else f"encoder {self.path.name} takes no FiLM input, but a film vector was given"
            )
        if self._fixed_batch is None and len(batch) <= self.max_batch:
            return self._run(batch, film)
        return np.concatenate(
            [self._run_padded(batch[i : i + self.max_batch], film) for i in range(0, len(batch), self.max_batch)]
        )

    def _run_padded(self, chunk: np.ndarray, film: np.ndarray | None) -> np.ndarray:
        """Run a chunk, zero-padding it to the graph's fixed batch size when it has one."""
        n = len(chunk)
        if self._fixed_batch is None or n == self._fixed_batch:
            return self._run(chunk, film)
        padded = np.zeros((self._fixed_batch, *chunk.shape[1:]), dtype=chunk.dtype)
        padded[:n] = chunk
        return self._run(padded, film)[:n]

    def _run(self, batch: np.ndarray, film: np.ndarray | None) -> np.ndarray:
        feed = {self._input_name: batch}
        if film is not None:
            feed[self._film_name] = film
        try:
            return self._session.run(self._output_names, feed)[0]
        except InvalidArgument as exc:
            raise FewShotInputError(f"encoder input rejected: {str(exc).splitlines()[0]}") from None


class ContextEngine:
    """A FiLM context graph: float32 images (S, C, H, W), the whole support set in one run, in; the
    film vector (F,) out. One session, on the same providers and threads as the encoder."""

    def __init__(
        self,
        onnx_path: str | Path,
        providers: Sequence[Provider] | None = None,
        threads: int | None = None,
        input_name: str | None = None,
    ) -> None:
        self._session = _open_session(onnx_path, list(providers or DEFAULT_PROVIDERS), threads, "context graph")
        inputs = self._session.get_inputs()
        names = [i.name for i in inputs]
        if len(inputs) != 1 or (input_name is not None and names != [input_name]):
            raise FewShotInputError(
                f"context graph {onnx_path} must take one input {input_name or 'images'!r}, it takes {', '.join(names)}"
            )
        self._input_name = names[0]
        self._output_names = [self._session.get_outputs()[0].name]

    def run(self, images: np.ndarray) -> np.ndarray:
        """The film vector (F,) float32 for a normalised set of images (S, C, H, W)."""
        try:
            film = self._session.run(self._output_names, {self._input_name: images})[0]
        except InvalidArgument as exc:
            raise FewShotInputError(f"context graph input rejected: {str(exc).splitlines()[0]}") from None
        return np.asarray(film, dtype=np.float32).reshape(-1)
