"""Summary statistics of episode accuracies (numpy only, so the device and the desktop share them)."""

from __future__ import annotations

import math

import numpy as np


def confidence_interval(accuracies: np.ndarray) -> tuple[float, float]:
    """Mean and 95% CI half-width (1.96 * std / sqrt(n), normal approximation) of per-episode accuracies."""
    n = len(accuracies)
    std = float(accuracies.std(ddof=1)) if n > 1 else 0.0
    return float(accuracies.mean()), 1.96 * std / math.sqrt(n)
