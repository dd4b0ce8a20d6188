"""``GraphEngine``: any extra graph of a bundle (a relation module, an FCE encoder, a sequence model).

Export writes one ``<role>.onnx`` per graph a method declares; a device mode opens the one it runs
by role (``GraphEngine(bundle.file(role), ...)``) and feeds it float32 arrays in the graph's input order.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from onnxruntime.capi.onnxruntime_pybind11_state import InvalidArgument

from .engine import DEFAULT_PROVIDERS, Provider, _open_session, _static
from .errors import FewShotInputError


class GraphEngine:
    """One onnxruntime session over an ONNX graph: ``run(*inputs)`` feeds the inputs in the graph's
    order (``input_names``) and returns every output (``output_names``) as a tuple of arrays. The graph
    must take exactly ``input_names`` when they are given."""

    def __init__(
        self,
        onnx_path: str | Path,
        providers: Sequence[Provider] | None = None,
        threads: int | None = None,
        input_names: Sequence[str] | None = None,
    ) -> None:
        self.path = Path(onnx_path)
        self._session = _open_session(onnx_path, list(providers or DEFAULT_PROVIDERS), threads, "graph")
        inputs = self._session.get_inputs()
        self.input_names = [i.name for i in inputs]
        self.input_shapes = [_static(i.shape) for i in inputs]  # None for a dynamic axis
        self.output_names = [o.name for o in self._session.get_outputs()]
        if input_names is not None and list(input_names) != self.input_names:
            raise FewShotInputError(
                f"graph {self.path.name} must take {', '.join(input_names)}, it takes {', '.join(self.input_names)}"
            )

    def run(self, *inputs: np.ndarray) -> tuple[np.ndarray, ...]:
        """Every output for float32 ``inputs``, one per input name, in order."""
        if len(inputs) != len(self.input_names):
            raise FewShotInputError(f"graph {self.path.name} takes {len(self.input_names)} inputs, got {len(inputs)}")
        feed = {
            name: np.ascontiguousarray(x, dtype=np.float32) for name, x in zip(self.input_names, inputs, strict=True)
        }
        try:
            return tuple(self._session.run(self.output_names, feed))
        except InvalidArgument as exc:
            raise FewShotInputError(f"graph {self.path.name} input rejected: {str(exc).splitlines()[0]}") from None
