"""Device runtime: numpy + onnxruntime + Pillow, never torch."""

from .errors import FewShotInputError
from .preprocess import InputSpec, normalize, preprocess, to_pixels

__all__ = ["FewShotInputError", "InputSpec", "normalize", "preprocess", "to_pixels"]
