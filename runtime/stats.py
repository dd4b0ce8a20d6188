"""Summary statistics of episode accuracies (numpy only, so the device and the desktop share them)."""

from __future__ import annotations

import math

import numpy as np


def confidence_interval(accuracies: np.ndarray) -> tuple[float, float]:
    """Mean and 95% CI half-width (1.96 * std / sqrt(n), normal approximation) of per-episode accuracies."""
    n = len(accuracies)
    std = float(accuracies.std(ddof=1)) if n > 1 else 0.0
    return float(accuracies.mean()), 1.96 * std / math.sqrt(n)


def reliability(
    probabilities: np.ndarray, labels: np.ndarray, bins: int = 15
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per confidence bin: the number of queries, their accuracy and their mean top-1 confidence (0 where
    a bin is empty). Bins are equal-width on [0, 1], closed on the right: bin b holds confidences in
    (b / bins, (b + 1) / bins], bin 0 also 0 itself. ``probabilities`` (N, C), ``labels`` (N,) ints."""
    probabilities = np.asarray(probabilities, dtype=np.float64)
    confidence = probabilities.max(axis=1)
    correct = probabilities.argmax(axis=1) == np.asarray(labels)
    which = np.clip(np.ceil(confidence * bins).astype(int) - 1, 0, bins - 1)
    counts = np.bincount(which, minlength=bins)
    shown = np.maximum(counts, 1)
    accuracy = np.bincount(which, weights=correct, minlength=bins) / shown
    mean_confidence = np.bincount(which, weights=confidence, minlength=bins) / shown
    return counts, accuracy, mean_confidence


def expected_calibration_error(probabilities: np.ndarray, labels: np.ndarray, bins: int = 15) -> float:
    """ECE: the count-weighted mean over ``reliability``'s bins of |accuracy - mean confidence| of the
    top-1 prediction (0 = calibrated; the fraction, not percent)."""
    counts, accuracy, confidence = reliability(probabilities, labels, bins)
    return float((counts * np.abs(accuracy - confidence)).sum() / counts.sum())


def auroc(scores_known: np.ndarray, scores_unknown: np.ndarray) -> float:
    """Area under the ROC curve of telling unknowns from knowns by a score that is higher for unknowns:
    the probability that a random unknown scores above a random known, ties counting one half (1 =
    perfect separation, 0.5 = chance, 0 = inverted). Computed from average ranks (the Mann-Whitney U
    statistic), which handles ties exactly in O(n log n), with numpy alone: the runtime does not
    depend on scikit-learn."""
    known = np.asarray(scores_known, dtype=np.float64).ravel()
    unknown = np.asarray(scores_unknown, dtype=np.float64).ravel()
    if not len(known) or not len(unknown):
        raise ValueError("auroc needs at least one known and one unknown score")
    _, inverse, counts = np.unique(np.concatenate([known, unknown]), return_inverse=True, return_counts=True)
    ends = np.cumsum(counts)
    ranks = (ends - (counts - 1) / 2.0)[inverse]  # 1-based rank, the mean over a tie group
    u = ranks[len(known) :].sum() - len(unknown) * (len(unknown) + 1) / 2.0
    return float(u / (len(known) * len(unknown)))
