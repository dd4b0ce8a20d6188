"""Export (desktop, needs torch and onnx): a checkpoint's encoder, or a frozen pretrained backbone's, to ONNX,
checked and calibrated, as a bundle.

The bundle schema and preprocessing are the runtime's; the runtime never imports this package.
"""

from .bundle import ExportSource, FrozenBackbone, checkpoint_source, export_bundle, export_draft
from .calibration import (
    MIN_QUERIES_PER_SHOT,
    calibrate,
    episode_sizes,
    fit_open_set,
    fit_temperature,
    fit_temperatures,
    nll,
)
from .onnx import export_context_onnx, export_onnx
from .parity import ParityError, ParityReport, check_parity
from .variants import VariantRefused, attention_softmaxes, build_variants, check_precisions

__all__ = [
    "MIN_QUERIES_PER_SHOT",
    "ExportSource",
    "FrozenBackbone",
    "ParityError",
    "ParityReport",
    "attention_softmaxes",
    "calibrate",
    "check_parity",
    "check_precisions",
    "checkpoint_source",
    "episode_sizes",
    "export_bundle",
    "export_context_onnx",
    "export_draft",
    "export_onnx",
    "fit_open_set",
    "fit_temperature",
    "fit_temperatures",
    "nll",
    "VariantRefused",
    "build_variants",
]
