"""Device runtime: numpy + onnxruntime + Pillow, never torch."""

from .adapters import ADAPTERS, Adapter, register
from .bayes import BayesAdapter
from .bundle import Adaptation, Bundle, Calibration, EmbeddingSpec, Manifest, OpenSet, open_bundle, write_bundle
from .engine import ContextEngine, Engine
from .errors import FewShotInputError
from .learned_update import LearnedUpdateAdapter
from .matching import MatchingAdapter
from .model import FewShotModel, Prediction
from .preprocess import Frame, InputSpec, normalize, preprocess, to_pixels
from .relation import RelationAdapter
from .sequence import SequenceAdapter
from .store import EnrollmentStore, validate_label

__all__ = [
    "ADAPTERS",
    "Adaptation",
    "Adapter",
    "BayesAdapter",
    "Bundle",
    "Calibration",
    "ContextEngine",
    "EmbeddingSpec",
    "Engine",
    "EnrollmentStore",
    "FewShotInputError",
    "FewShotModel",
    "Frame",
    "InputSpec",
    "LearnedUpdateAdapter",
    "Manifest",
    "MatchingAdapter",
    "OpenSet",
    "Prediction",
    "RelationAdapter",
    "SequenceAdapter",
    "normalize",
    "open_bundle",
    "preprocess",
    "register",
    "to_pixels",
    "validate_label",
    "write_bundle",
]
