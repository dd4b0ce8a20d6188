"""FewShotModel end to end on tiny linear encoders, checked against numpy by hand."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image
from runtime_support import (
    BLOCK_TORCH,
    DIM,
    SPEC,
    embed_by_hand,
    images,
    linear_encoder,
    make_bundle,
    run_python,
    weight,
    write_manifest,
)

from fewshot_edge.runtime import Adaptation, EmbeddingSpec, FewShotInputError, FewShotModel, InputSpec, write_bundle

CAT, DOG, BIRD = images(1, 4, center=60), images(2, 3, center=190), images(3, 2, center=120)
QUERIES = images(4, 2, center=70) + images(5, 2, center=180)


def softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def by_hand(w, classes, queries, metric="sqeuclidean", scale=1.0, temperature=1.0):
    """(probabilities, nearest distances) of the prototype mode, computed in float64 numpy."""
    prototypes = np.stack([embed_by_hand(c, w).mean(0) for c in classes])
    q = embed_by_hand(queries, w)
    if metric == "cosine":
        cos = (q / np.linalg.norm(q, axis=1, keepdims=True)) @ (
            prototypes / np.linalg.norm(prototypes, axis=1, keepdims=True)
        ).T
        d, logits = 1 - cos, scale * cos
    else:
        d = ((q[:, None, :] - prototypes[None]) ** 2).sum(-1)
        logits = -scale * d
    return softmax(logits / temperature), d.min(1)


@pytest.fixture
def w():
    return weight(0)


@pytest.fixture
def model(tmp_path, w):
    make_bundle(tmp_path / "bundle", w)
    with FewShotModel.open(tmp_path / "bundle", store=tmp_path / "device.db") as m:
        yield m


@pytest.mark.parametrize(
    "metric, scale, temperature", [("sqeuclidean", 1.0, 1.0), ("sqeuclidean", 2.0, 0.5), ("cosine", 10.0, 2.0)]
)
def test_probabilities_and_distances_match_numpy(tmp_path, w, metric, scale, temperature):
    make_bundle(tmp_path / "b", w, metric=metric, scale=scale, temperature=temperature)
    with FewShotModel.open(tmp_path / "b") as m:
        m.enroll("cat", CAT)
        m.enroll("dog", DOG)
        m.enroll("bird", BIRD)
        probabilities, nearest = by_hand(w, [CAT, DOG, BIRD], QUERIES, metric, scale, temperature)
        np.testing.assert_allclose(m.predict_proba(QUERIES), probabilities, rtol=1e-4, atol=1e-6)
        predictions = m.predict(QUERIES)
        np.testing.assert_allclose([p.distance for p in predictions], nearest, rtol=1e-4, atol=1e-6)
        labels = ["cat", "dog", "bird"]
        assert [p.label for p in predictions] == [labels[i] for i in probabilities.argmax(1)]
        np.testing.assert_allclose([p.probability for p in predictions], probabilities.max(1), rtol=1e-4)
        np.testing.assert_allclose(m.embed(CAT), embed_by_hand(CAT, w), rtol=1e-5, atol=1e-6)


def test_unknown_beyond_the_calibrated_threshold(tmp_path, w):
    _, nearest = by_hand(w, [CAT, DOG], QUERIES)
    threshold = float(np.sort(nearest)[1:3].mean())
    make_bundle(tmp_path / "b", w, threshold=threshold)
    with FewShotModel.open(tmp_path / "b") as m:
        m.enroll("cat", CAT)
        m.enroll("dog", DOG)
        predictions = m.predict(QUERIES)
    far = nearest > threshold
    assert 0 < far.sum() < len(QUERIES)
    assert [p.label == "unknown" for p in predictions] == far.tolist()
    assert all(p.top_k[0][0] in ("cat", "dog") for p in predictions)


ONE, THREE, NINE = (
    images(6, 1, center=40, spread=5),
    images(7, 3, center=130, spread=5),
    images(8, 9, center=220, spread=5),
)
NEAR = images(9, 1, center=45, spread=5) + images(10, 1, center=125, spread=5) + images(11, 1, center=215, spread=5)


def enroll_one_three_nine(m: FewShotModel) -> None:
    """Classes of 1, 3 (2 enrolled, 1 added) and 9 shots."""
    m.enroll("one", ONE)
    m.enroll("three", THREE[:2])
    m.predict(NEAR[:1])
    m.add_shots("three", THREE[2:])
    m.enroll("nine", NINE)


def test_threshold_follows_the_nearest_class_shot_count(tmp_path, w):
    probabilities, nearest = by_hand(w, [ONE, THREE, NINE], NEAR)
    assert probabilities.argmax(1).tolist() == [0, 1, 2]
    low, high = 0.99 * nearest.min(), 1.01 * nearest.max()  # below every distance, above every distance
    # 1 shot: own (high); 3 shots: own (low); 9 shots: beyond the largest fitted count, so 5's (high).
    make_bundle(tmp_path / "b", w, threshold=low, thresholds_by_shots={1: high, 2: low, 3: low, 4: low, 5: high})
    with FewShotModel.open(tmp_path / "b") as m:
        enroll_one_three_nine(m)
        assert m.classes() == [("one", 1), ("three", 3), ("nine", 9)]
        assert [p.label for p in m.predict(NEAR)] == ["one", "unknown", "nine"]


def test_temperature_follows_the_nearest_class_shot_count(tmp_path, w):
    # 1 shot: its own 2.0; 3 shots: its own 0.5; 9 shots: beyond the largest fitted count, so 5's 0.25
    make_bundle(tmp_path / "b", w, temperature=1.0, temperatures_by_shots={1: 2.0, 3: 0.5, 5: 0.25})
    with FewShotModel.open(tmp_path / "b") as m:
        enroll_one_three_nine(m)
        got = m.predict_proba(NEAR)
        np.testing.assert_array_equal(m.temperatures(np.array([9, 1, 3, 2, 1])), [0.25, 2.0, 0.5, 1.0, 2.0])
    for row, temperature in enumerate((2.0, 0.5, 0.25)):  # NEAR's rows are nearest to one, three, nine
        expected = by_hand(w, [ONE, THREE, NINE], NEAR[row : row + 1], temperature=temperature)[0]
        np.testing.assert_allclose(got[row : row + 1], expected, rtol=1e-4, atol=1e-6)


def test_an_old_manifest_single_threshold_applies_to_every_shot_count(tmp_path, w):
    _, nearest = by_hand(w, [ONE, THREE, NINE], NEAR)
    threshold = float(np.sort(nearest)[:2].mean())
    make_bundle(tmp_path / "b", w, threshold=threshold)
    manifest = json.loads((tmp_path / "b" / "manifest.json").read_text())
    manifest["calibration"]["open_set"] = {"threshold": threshold, "statistic": "nearest_distance", "fitted_on": "old"}
    write_manifest(tmp_path / "b", manifest)
    with FewShotModel.open(tmp_path / "b") as m:
        enroll_one_three_nine(m)
        predictions = m.predict(NEAR)
    far = nearest > threshold
    assert far.sum() == 2
    assert [p.label == "unknown" for p in predictions] == far.tolist()


def test_no_threshold_never_answers_unknown(model):
    model.enroll("cat", CAT)
    assert [p.label for p in model.predict([np.zeros((4, 4), np.uint8), np.full((4, 4), 255, np.uint8)])] == [
        "cat",
        "cat",
    ]


def test_top_k_is_ordered_and_clamped(model):
    model.enroll("cat", CAT)
    model.enroll("dog", DOG)
    model.enroll("bird", BIRD)
    probabilities = model.predict_proba(QUERIES)
    for p, row in zip(model.predict(QUERIES, top_k=2), probabilities, strict=True):
        assert [label for label, _ in p.top_k] == [model.labels[i] for i in np.argsort(-row)[:2]]
        assert p.top_k[0][1] >= p.top_k[1][1] and p.top_k[0] == (p.label, p.probability)
    assert len(model.predict(QUERIES[:1], top_k=10)[0].top_k) == 3
    with pytest.raises(FewShotInputError, match="top_k"):
        model.predict(QUERIES, top_k=0)


def test_paths_pil_images_and_arrays_embed_alike(tmp_path, model):
    path = tmp_path / "cat.png"
    Image.fromarray(CAT[0]).save(path)
    expected = model.embed([CAT[0]])
    for source in (path, str(path), Image.fromarray(CAT[0])):
        np.testing.assert_array_equal(model.embed(source), expected)
    model.enroll("cat", [path, Image.fromarray(CAT[1]), CAT[2]])
    assert model.classes() == [("cat", 3)]


def test_incremental_updates_match_a_fresh_fit(tmp_path, w, model):
    model.enroll("cat", CAT[:2])
    model.predict(QUERIES)
    model.add_shots("cat", CAT[2:])
    model.enroll("dog", DOG)
    np.testing.assert_allclose(
        model.adapter.prototypes, np.stack([embed_by_hand(c, w).mean(0) for c in (CAT, DOG)]), rtol=1e-5
    )
    with FewShotModel.open(tmp_path / "bundle", store=tmp_path / "device.db") as fresh:
        np.testing.assert_allclose(model.predict_proba(QUERIES), fresh.predict_proba(QUERIES), rtol=1e-5)


def test_remove_and_rename_change_predictions(model):
    model.enroll("cat", CAT)
    model.enroll("dog", DOG)
    model.rename("cat", "kitty")
    assert model.predict(CAT[:1])[0].label == "kitty"
    model.remove_class("kitty")
    assert model.classes() == [("dog", 3)] and model.labels == ["dog"]
    assert model.predict(CAT[:1])[0].label == "dog"


def test_bad_input_is_refused_and_stores_nothing(model):
    with pytest.raises(FewShotInputError, match="no classes enrolled"):
        model.predict(QUERIES)
    for images_, reason in [
        ([np.full((4, 4), np.nan)], "NaN"),
        ([np.zeros(16, np.uint8)], "shape"),
        ([np.zeros((2, 4, 4, 5), np.uint8)], "shape"),
        ([], "no images"),
        (["missing.png"], "not found"),
    ]:
        with pytest.raises(FewShotInputError, match=reason):
            model.enroll("cat", images_)
    with pytest.raises(FewShotInputError, match="reserved"):
        model.enroll("unknown", CAT)
    with pytest.raises(FewShotInputError, match="no class"):
        model.add_shots("cat", CAT)
    assert model.classes() == []
    model.enroll("cat", CAT)
    with pytest.raises(FewShotInputError, match="NaN"):
        model.predict([np.full((4, 4), np.inf)])


ENROLL_DOG = """
import sys
import numpy as np
from fewshot_edge.runtime import FewShotModel
with FewShotModel.open(sys.argv[1], store=sys.argv[2]) as m:
    m.enroll("dog", [np.full((4, 4), 190, np.uint8)])
"""


def test_class_enrolled_by_another_process_is_predicted(tmp_path, model):
    model.enroll("cat", CAT)
    assert model.predict(DOG[:1])[0].label == "cat"
    run_python(ENROLL_DOG, str(tmp_path / "bundle"), str(tmp_path / "device.db"))
    assert model.predict(DOG[:1])[0].label == "dog"
    assert model.classes() == [("cat", 4), ("dog", 1)]


def test_model_update_reembeds_stored_shots(tmp_path, w, model):
    model.enroll("cat", CAT)
    model.enroll("dog", DOG)
    model.close()
    w2 = weight(1)
    make_bundle(tmp_path / "bundle2", w2)
    with pytest.raises(FewShotInputError, match="reembed=True"):
        FewShotModel.open(tmp_path / "bundle2", store=tmp_path / "device.db")
    with FewShotModel.open(tmp_path / "bundle2", store=tmp_path / "device.db", reembed=True) as updated:
        assert updated.classes() == [("cat", 4), ("dog", 3)]
        np.testing.assert_allclose(updated.store.shots().embeddings, embed_by_hand(CAT + DOG, w2), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(
            updated.predict_proba(QUERIES), by_hand(w2, [CAT, DOG], QUERIES)[0], rtol=1e-4, atol=1e-6
        )
    with pytest.raises(FewShotInputError, match="reembed=True"):
        FewShotModel.open(tmp_path / "bundle", store=tmp_path / "device.db")


def test_model_update_with_another_input_size_is_refused(tmp_path, model):
    model.enroll("cat", CAT)
    model.close()
    spec = InputSpec(1, 5, 5)
    make_bundle(tmp_path / "bundle5", weight(0, spec), spec=spec)
    with pytest.raises(FewShotInputError, match="stored shots are 1x4x4 but the new model takes 1x5x5"):
        FewShotModel.open(tmp_path / "bundle5", store=tmp_path / "device.db", reembed=True)
    with FewShotModel.open(tmp_path / "bundle", store=tmp_path / "device.db") as old:
        assert old.classes() == [("cat", 4)]


def test_adaptation_mode_must_be_in_bundle_and_runtime(tmp_path, w):
    write_bundle(
        tmp_path / "b",
        {"encoder.onnx": linear_encoder(w)},
        input_spec=SPEC,
        embedding=EmbeddingSpec(DIM),
        adaptation=Adaptation("prototype", {"prototype": {}, "lora": {"rank": 4}}),
    )
    with pytest.raises(FewShotInputError, match="bundle does not support adaptation mode 'finetune'"):
        FewShotModel.open(tmp_path / "b", adapt="finetune")
    with pytest.raises(FewShotInputError, match="this runtime has no adaptation mode 'lora'"):
        FewShotModel.open(tmp_path / "b", adapt="lora")


def test_encoder_must_match_manifest_shapes(tmp_path, w):
    write_bundle(
        tmp_path / "size", {"encoder.onnx": linear_encoder(w)}, input_spec=SPEC, embedding=EmbeddingSpec(DIM + 1)
    )
    with pytest.raises(FewShotInputError, match="embedding size 4"):
        FewShotModel.open(tmp_path / "size")
    write_bundle(
        tmp_path / "input",
        {"encoder.onnx": linear_encoder(w)},
        input_spec=InputSpec(1, 2, 8),
        embedding=EmbeddingSpec(DIM),
    )
    with pytest.raises(FewShotInputError, match="does not match the input spec 1x2x8"):
        FewShotModel.open(tmp_path / "input")


NO_TORCH = (
    BLOCK_TORCH
    + """
import numpy as np
from fewshot_edge.runtime import FewShotModel

with FewShotModel.open(sys.argv[1], store=sys.argv[2]) as m:
    m.enroll("dark", [np.full((4, 4), 20, np.uint8), np.full((4, 4), 40, np.uint8)])
    m.enroll("light", [np.full((4, 4), 230, np.uint8)])
    print(m.predict([np.full((4, 4), 210, np.uint8)])[0].label)
assert "torch" not in sys.modules
try:
    import torch
except ImportError:
    print("blocked")
"""
)


def test_runtime_works_with_torch_unimportable(tmp_path, w):
    make_bundle(tmp_path / "b", w)
    assert run_python(NO_TORCH, str(tmp_path / "b"), str(tmp_path / "device.db")) == "light\nblocked\n"
