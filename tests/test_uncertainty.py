"""Predictive entropy and its epistemic part (mutual information) against values worked out by hand, the
calibration NLL of sampled logits, and the entropy of the prototype mode's predictions."""

from __future__ import annotations

import numpy as np
import pytest
from runtime_support import embed_by_hand, images, make_bundle, weight

from fewshot_edge.export.calibration import fit_temperature, nll
from fewshot_edge.runtime import FewShotModel
from fewshot_edge.runtime.uncertainty import predictive


def h(*p: float) -> float:
    """Entropy in nats of the distribution p, by hand."""
    return -sum(x * np.log(x) for x in p if x > 0)


def test_one_model_has_entropy_and_no_epistemic_part():
    logits = np.log(np.array([[0.5, 0.25, 0.25], [1.0, 1.0, 1.0]]))
    probabilities, entropy, epistemic = predictive(logits, 1.0)
    np.testing.assert_allclose(probabilities, [[0.5, 0.25, 0.25], [1 / 3, 1 / 3, 1 / 3]])
    np.testing.assert_allclose(entropy, [1.5 * np.log(2.0), np.log(3.0)])  # 0.5 ln 2 + 2 * 0.25 ln 4; ln 3
    assert epistemic is None


def test_disagreeing_samples_are_epistemic_and_agreeing_ones_are_not():
    # query 0: two models sure of opposite classes (0.9/0.1 and 0.1/0.9) -> mean 0.5/0.5
    # query 1: two models that agree on 0.9/0.1 -> nothing epistemic
    z = np.log(np.array([[[0.9, 0.1], [0.1, 0.9]], [[0.9, 0.1], [0.9, 0.1]]]))
    probabilities, entropy, epistemic = predictive(z, 1.0)
    np.testing.assert_allclose(probabilities, [[0.5, 0.5], [0.9, 0.1]])
    np.testing.assert_allclose(entropy, [np.log(2.0), h(0.9, 0.1)])
    np.testing.assert_allclose(epistemic, [np.log(2.0) - h(0.9, 0.1), 0.0], atol=1e-12)  # 0.3681, 0


def test_temperature_divides_each_sample_before_the_average():
    z = np.array([[[2.0, 0.0], [0.0, 1.0]]])
    probabilities, entropy, epistemic = predictive(z, 2.0)
    each = np.exp(z / 2.0) / np.exp(z / 2.0).sum(-1, keepdims=True)  # [e/(e+1), 1/(e+1)], [1/(1+e^.5), ...]
    mean = each.mean(1)[0]
    np.testing.assert_allclose(probabilities[0], mean)
    np.testing.assert_allclose(entropy, [h(*mean)])
    np.testing.assert_allclose(epistemic, [h(*mean) - (h(*each[0, 0]) + h(*each[0, 1])) / 2])


def test_extreme_logits_stay_finite():
    probabilities, entropy, epistemic = predictive(np.array([[[1e4, -1e4], [-1e4, 1e4]]]), 1.0)
    np.testing.assert_allclose(probabilities, [[0.5, 0.5]])
    np.testing.assert_allclose(entropy, [np.log(2.0)])
    np.testing.assert_allclose(epistemic, [np.log(2.0)])


def test_calibration_nll_of_sampled_logits_is_that_of_their_mean_softmax():
    z = np.log(np.array([[[0.9, 0.1], [0.1, 0.9]], [[0.8, 0.2], [0.6, 0.4]]]))
    labels = np.array([1, 0])
    assert nll(z, labels) == pytest.approx(-(np.log(0.5) + np.log(0.7)) / 2)
    assert nll(z[:, :1], labels) == pytest.approx(nll(z[:, 0], labels))  # one sample is one model
    # samples that all agree: the fitted temperature is the plain one
    flat = np.random.default_rng(0).normal(size=(40, 3)) * 3
    y = flat.argmax(1)
    y[:8] = (y[:8] + 1) % 3
    assert fit_temperature(np.repeat(flat[:, None], 4, axis=1), y) == pytest.approx(fit_temperature(flat, y), rel=1e-6)


def test_prototype_predictions_carry_their_entropy(tmp_path):
    w = weight(3)
    bundle = make_bundle(tmp_path / "b", w, temperature=2.0)
    cat, dog, queries = images(1, 3, center=60), images(2, 2, center=190), images(4, 3, center=120)
    with FewShotModel.open(bundle.path) as model:
        model.enroll("cat", cat)
        model.enroll("dog", dog)
        predictions = model.predict(queries, top_k=2)
    protos = np.stack([embed_by_hand(cat, w).mean(0), embed_by_hand(dog, w).mean(0)])
    d = ((embed_by_hand(queries, w)[:, None] - protos[None]) ** 2).sum(-1)
    p = np.exp(-d / 2.0) / np.exp(-d / 2.0).sum(1, keepdims=True)
    np.testing.assert_allclose([x.entropy for x in predictions], [h(*row) for row in p], rtol=1e-4, atol=1e-7)
    assert all(x.epistemic is None for x in predictions)
