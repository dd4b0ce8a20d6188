"""Export (desktop, needs torch and onnx): a checkpoint's encoder to ONNX, checked and calibrated, as a bundle.

The bundle schema and preprocessing are the runtime's; the runtime never imports this package.
"""

from .bundle import export_bundle, export_draft
from .calibration import calibrate, fit_open_set, fit_temperature, nll
from .onnx import export_context_onnx, export_onnx
from .parity import ParityError, ParityReport, check_parity
from .variants import VariantRefused, build_variants

__all__ = [
    "ParityError",
    "ParityReport",
    "calibrate",
    "check_parity",
    "export_bundle",
    "export_context_onnx",
    "export_draft",
    "export_onnx",
    "fit_open_set",
    "fit_temperature",
    "nll",
    "VariantRefused",
    "build_variants",
]
