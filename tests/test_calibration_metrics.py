"""ECE and AUROC (runtime/stats.py) against hand-computed values, and the calibration benchmark's
episode function end to end on the shipped bundle against ``FewShotModel.predict``."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

from fewshot_edge import glyphs
from fewshot_edge.runtime import FewShotModel, to_pixels
from fewshot_edge.runtime.stats import auroc, expected_calibration_error, reliability

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import calibration  # the benchmark script, on the path just added


def test_ece_hand_computed() -> None:
    # confidences 0.9 (right), 0.6 (wrong), 0.7 (right), 0.95 (right): bins 13, 8, 10, 14 of 15, one each
    p = np.array([[0.9, 0.1], [0.6, 0.4], [0.3, 0.7], [0.05, 0.95]])
    labels = np.array([0, 1, 1, 1])
    assert expected_calibration_error(p, labels) == pytest.approx((0.1 + 0.6 + 0.3 + 0.05) / 4)
    # two bins of width 1/2: 0.9 (right) and 0.7 (wrong) share bin 1 (acc 0.5, conf 0.8); 0.4 (right) is bin 0
    p = np.array([[0.9, 0.05, 0.05], [0.7, 0.2, 0.1], [0.4, 0.3, 0.3]])
    labels = np.array([0, 2, 0])
    assert expected_calibration_error(p, labels, bins=2) == pytest.approx((2 * 0.3 + 1 * 0.6) / 3)
    counts, accuracy, confidence = reliability(p, labels, bins=2)
    np.testing.assert_array_equal(counts, [1, 2])
    np.testing.assert_allclose(accuracy, [1.0, 0.5])
    np.testing.assert_allclose(confidence, [0.4, 0.8])


def test_ece_perfectly_calibrated_and_overconfident() -> None:
    # 10 queries at confidence 0.8, 8 right: calibrated; the same queries at 1.0: ECE 0.2
    labels = np.array([0] * 8 + [1] * 2)
    assert expected_calibration_error(np.tile([0.8, 0.2], (10, 1)), labels) == pytest.approx(0.0)
    assert expected_calibration_error(np.tile([1.0, 0.0], (10, 1)), labels) == pytest.approx(0.2)


def test_auroc_hand_computed() -> None:
    assert auroc(np.array([1.0, 2.0]), np.array([3.0, 4.0])) == 1.0  # perfect separation
    assert auroc(np.array([3.0, 4.0]), np.array([1.0, 2.0])) == 0.0  # inverted
    assert auroc(np.array([1.0, 1.0]), np.array([1.0])) == 0.5  # all tied
    # pairs (known, unknown): (0,1) 1, (0,3) 1, (1,1) 0.5, (1,3) 1, (2,1) 0, (2,3) 1 -> 4.5 / 6
    assert auroc(np.array([0.0, 1.0, 2.0]), np.array([1.0, 3.0])) == pytest.approx(0.75)
    # brute force over every pair, with many ties
    rng = np.random.default_rng(0)
    known, unknown = rng.integers(0, 5, 40).astype(float), rng.integers(2, 7, 30).astype(float)
    diff = unknown[None, :] - known[:, None]
    assert auroc(known, unknown) == pytest.approx(((diff > 0) + 0.5 * (diff == 0)).mean())


def test_auroc_needs_both_sides() -> None:
    with pytest.raises(ValueError, match="at least one known and one unknown"):
        auroc(np.array([]), np.array([1.0]))


def test_episode_scores_match_predict() -> None:
    """The benchmark's episode on the shipped bundle with drawn glyphs: its calibrated probabilities,
    distances and entropies are what ``predict`` reports for the same enrollment, its temperature-1
    probabilities are the softmax of the calibrated logits times T, and the store is left empty."""
    way, unknown, shot, query = 3, 2, 1, 2
    with FewShotModel.open("omniglot-conv4") as model:
        images = np.stack(
            [
                to_pixels(glyphs.perturb(glyphs.draw(c), seed=10 * c + i, strength=0.5), model.spec)
                for c in range(way + unknown)
                for i in range(shot + query)
            ]
        )
        index = np.arange(len(images)).reshape(way + unknown, shot + query)
        scores = calibration.episode_scores(model, images, index, way, shot)
        assert model.classes() == []
        np.testing.assert_array_equal(scores.truth, np.repeat(np.arange(way + unknown), query))
        labels = [f"class {c}" for c in range(way)]
        for label, ids in zip(labels, index[:way], strict=True):
            model.enroll(label, [calibration.as_drawn(images[j], model.spec) for j in ids[:shot]])
        queries = [calibration.as_drawn(images[j], model.spec) for j in index[:, shot:].ravel()]
        predictions = model.predict(queries, top_k=way)
        temperature = model.temperatures(np.full(len(queries), shot))
    expected = np.array([[dict(p.top_k)[label] for label in labels] for p in predictions])
    np.testing.assert_allclose(scores.calibrated, expected, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(scores.statistics["distance"], [p.distance for p in predictions], rtol=1e-5)
    np.testing.assert_allclose(scores.statistics["entropy"], [p.entropy for p in predictions], rtol=1e-5, atol=1e-7)
    assert "epistemic" not in scores.statistics  # one model: no epistemic part
    logits = np.log(scores.calibrated) * temperature[:, None]
    softmax = np.exp(logits - logits.max(1, keepdims=True))
    np.testing.assert_allclose(scores.raw, softmax / softmax.sum(1, keepdims=True), rtol=1e-5, atol=1e-7)
    known = scores.truth < way
    np.testing.assert_allclose(
        scores.log_likelihood, np.log(scores.calibrated[known, scores.truth[known]]), rtol=1e-5, atol=1e-7
    )
