"""The encoder engine: one onnxruntime session, an explicit provider list, embeddings in chunks."""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np
import onnxruntime as ort
from onnxruntime.capi.onnxruntime_pybind11_state import InvalidArgument

from .errors import FewShotInputError

DEFAULT_PROVIDERS = ("CPUExecutionProvider",)


class Engine:
    """An ONNX encoder: float32 images (N, C, H, W) in, float32 embeddings (N, D) out.

    ``providers`` are tried in order (default CPU only); asking for one this onnxruntime build
    lacks is an error rather than a silent CPU fallback. ``threads`` sets intra-op threads
    (None = onnxruntime's default). Batches above ``max_batch`` (or a fixed batch size in the
    graph) are run in chunks.
    """

    def __init__(
        self,
        onnx_path: Union[str, Path],
        providers: Optional[Sequence[str]] = None,
        threads: Optional[int] = None,
        max_batch: int = 64,
    ) -> None:
        self.providers = list(providers or DEFAULT_PROVIDERS)
        self.threads = threads
        missing = [p for p in self.providers if p not in ort.get_available_providers()]
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
            self._session = ort.InferenceSession(str(onnx_path), sess_options=options, providers=self.providers)
        except Exception as exc:  # onnxruntime raises its own exception types for unreadable models
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else exc.__class__.__name__
            raise FewShotInputError(f"cannot load encoder {onnx_path}: {reason}") from None
        inputs, outputs = self._session.get_inputs(), self._session.get_outputs()
        if len(inputs) != 1:
            raise FewShotInputError(f"encoder {onnx_path} must take one input, it takes {len(inputs)}")
        self._input_name = inputs[0].name
        self._output_names = [outputs[0].name]
        self.input_shape = tuple(d if isinstance(d, int) else None for d in inputs[0].shape)
        self._fixed_batch = self.input_shape[0] if self.input_shape else None
        self.max_batch = self._fixed_batch or max_batch

    def embed(self, batch: np.ndarray) -> np.ndarray:
        """Embeddings (N, D) for a float32 batch (N, C, H, W)."""
        if self._fixed_batch is None and len(batch) <= self.max_batch:
            return self._run(batch)
        return np.concatenate([self._run_padded(batch[i:i + self.max_batch]) for i in range(0, len(batch), self.max_batch)])

    def _run_padded(self, chunk: np.ndarray) -> np.ndarray:
        """Run a chunk, zero-padding it to the graph's fixed batch size when it has one."""
        n = len(chunk)
        if self._fixed_batch is None or n == self._fixed_batch:
            return self._run(chunk)
        padded = np.zeros((self._fixed_batch, *chunk.shape[1:]), dtype=chunk.dtype)
        padded[:n] = chunk
        return self._run(padded)[:n]

    def _run(self, batch: np.ndarray) -> np.ndarray:
        try:
            return self._session.run(self._output_names, {self._input_name: batch})[0]
        except InvalidArgument as exc:
            raise FewShotInputError(f"encoder input rejected: {str(exc).splitlines()[0]}") from None
