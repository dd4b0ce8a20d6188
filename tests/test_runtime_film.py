"""The FiLM adaptation mode on a tiny FiLM bundle, checked against numpy by hand."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
from runtime_support import (
    BLOCK_TORCH,
    DIM,
    SPEC,
    embed_by_hand,
    film_by_hand,
    film_encoder,
    images,
    make_bundle,
    make_film_bundle,
    run_python,
    weight,
    write_manifest,
)

from fewshot_edge.runtime import Engine, FewShotInputError, FewShotModel
from fewshot_edge.runtime.bench_compare import compare_modes

CAT, DOG, BIRD = images(1, 4, center=60), images(2, 3, center=190), images(3, 2, center=120)
QUERIES = images(4, 2, center=70) + images(5, 2, center=180)
P = SPEC.channels * SPEC.height * SPEC.width


def softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def by_hand(w, a, b, classes, queries, scale=1.0, temperature=1.0):
    """(probabilities, nearest distances) of the film mode in float64 numpy: context over every shot,
    support and queries embedded under it, prototypes, softmax(-scale * d / T)."""
    film = film_by_hand([im for c in classes for im in c], a, b)
    embed = lambda imgs: embed_by_hand(imgs, w) * film[:DIM] + film[DIM:]  # noqa: E731
    prototypes = np.stack([embed(c).mean(0) for c in classes])
    d = ((embed(queries)[:, None, :] - prototypes[None]) ** 2).sum(-1)
    return softmax(-scale * d / temperature), d.min(1)


@pytest.fixture
def params():
    rng = np.random.default_rng(7)
    return weight(0), rng.normal(scale=0.5, size=(P, DIM)), rng.normal(scale=0.5, size=(P, DIM))


@pytest.fixture
def bundle(tmp_path, params):
    return make_film_bundle(tmp_path / "bundle", *params, scale=0.7, temperature=1.3).path


def counting(model: FewShotModel) -> list[int]:
    """Count the context graph's runs on this model."""
    runs, run = [], model.adapter.context.run
    model.adapter.context.run = lambda images: runs.append(len(images)) or run(images)
    return runs


def test_film_predictions_match_numpy(bundle, params):
    with FewShotModel.open(bundle) as model:  # "film" is the bundle's default
        assert model.adapter.name == "film"
        model.enroll("cat", CAT)
        model.enroll("dog", DOG)
        model.add_shots("cat", BIRD)
        expected, nearest = by_hand(*params, [CAT + BIRD, DOG], QUERIES, scale=0.7, temperature=1.3)
        np.testing.assert_allclose(model.predict_proba(QUERIES), expected, rtol=1e-4, atol=1e-6)
        predictions = model.predict(QUERIES)
        assert [p.label for p in predictions] == ["cat", "cat", "dog", "dog"]
        np.testing.assert_allclose([p.distance for p in predictions], nearest, rtol=1e-4)
        np.testing.assert_allclose(model.adapter.film, film_by_hand(CAT + DOG + BIRD, *params[1:]), rtol=1e-5)


def test_context_runs_once_per_enrollment_change(bundle):
    with FewShotModel.open(bundle, adapt="film") as model:
        runs = counting(model)
        model.enroll("cat", CAT)
        model.enroll("dog", DOG)
        for _ in range(3):
            model.predict(QUERIES)
        assert runs == [len(CAT + DOG)]
        model.add_shots("dog", BIRD)
        model.predict(QUERIES[:1])
        model.predict(QUERIES[1:])
        assert runs == [7, 9]
        model.remove_class("cat")
        assert model.labels == ["dog"]
        model.predict(QUERIES)
        assert runs == [7, 9, 5]


def test_enrollment_order_does_not_change_the_context(bundle):
    with FewShotModel.open(bundle) as first, FewShotModel.open(bundle) as second:
        first.enroll("cat", CAT)
        first.enroll("dog", DOG)
        second.enroll("dog", DOG)
        second.enroll("cat", CAT)
        assert first.labels == ["cat", "dog"] and second.labels == ["dog", "cat"]  # fits both
        np.testing.assert_allclose(first.adapter.film, second.adapter.film, rtol=1e-6)
        np.testing.assert_allclose(first.predict_proba(QUERIES), second.predict_proba(QUERIES)[:, ::-1], rtol=1e-5)


def test_film_state_survives_reopening_the_store(tmp_path, bundle):
    with FewShotModel.open(bundle, store=tmp_path / "device.db") as model:
        model.enroll("cat", CAT)
        model.enroll("dog", DOG)
        before = model.predict_proba(QUERIES)
    with FewShotModel.open(bundle, store=tmp_path / "device.db") as model:
        np.testing.assert_allclose(model.predict_proba(QUERIES), before, rtol=1e-6)


def test_prototype_mode_runs_the_film_encoder_under_identity(bundle, params):
    with FewShotModel.open(bundle, adapt="prototype") as model:
        model.enroll("cat", CAT)
        model.enroll("dog", DOG)
        prototypes = np.stack([embed_by_hand(c, params[0]).mean(0) for c in (CAT, DOG)])
        d = ((embed_by_hand(QUERIES, params[0])[:, None] - prototypes[None]) ** 2).sum(-1)
        np.testing.assert_allclose(model.predict_proba(QUERIES), softmax(-0.7 * d / 1.3), rtol=1e-4, atol=1e-6)


def test_film_encoder_without_film_is_a_clear_error(tmp_path, bundle, params):
    (tmp_path / "encoder.onnx").write_bytes(film_encoder(params[0]))
    engine = Engine(tmp_path / "encoder.onnx")
    assert engine.takes_film and engine.film_size == 2 * DIM
    with pytest.raises(FewShotInputError, match="takes a FiLM input"):
        engine.embed(np.zeros((1, 1, 4, 4), np.float32))
    out = engine.embed(np.ones((2, 1, 4, 4), np.float32), np.r_[np.full(DIM, 2.0), np.zeros(DIM)].astype(np.float32))
    np.testing.assert_allclose(out, 2 * np.ones((2, P)) @ params[0], rtol=1e-5)
    with pytest.raises(FewShotInputError, match="must take one input .* or two"):
        Engine(tmp_path / "encoder.onnx", film_input="gamma")


@pytest.mark.parametrize(
    "film_size,identity,message",
    [
        (2 * DIM + 1, None, f"records film_size {2 * DIM + 1}, but its identity FiLM has {2 * DIM} values"),
        (2 * DIM + 2, [1.0] * (DIM + 1) + [0.0] * (DIM + 1), f"but its encoder's film input has {2 * DIM} values"),
        (None, None, "records film_size None"),
    ],
)
def test_a_film_size_the_graphs_do_not_have_is_refused(tmp_path, params, film_size, identity, message):
    bundle = make_film_bundle(tmp_path / "bundle", *params)
    manifest = json.loads((bundle.path / "manifest.json").read_text())
    film = manifest["adaptation"]["modes"]["film"]
    film["film_size"] = film_size
    film["identity"] = identity or film["identity"]
    write_manifest(bundle.path, manifest)
    with pytest.raises(FewShotInputError, match=re.escape(message)):
        FewShotModel.open(bundle.path)


def test_film_mode_on_a_plain_encoder_is_refused(tmp_path, params):
    plain = make_bundle(tmp_path / "plain", params[0]).path
    manifest = json.loads((plain / "manifest.json").read_text())
    manifest["adaptation"]["modes"]["film"] = {"film_size": 2 * DIM, "identity": [1.0] * DIM + [0.0] * DIM}
    write_manifest(plain, manifest)
    with pytest.raises(
        FewShotInputError, match="adaptation mode 'film' needs a FiLM encoder; encoder.onnx takes no film input"
    ):
        FewShotModel.open(plain, adapt="film")


def test_predicting_with_no_classes_is_an_error(bundle):
    with FewShotModel.open(bundle) as model:
        runs = counting(model)
        with pytest.raises(FewShotInputError, match="no classes enrolled"):
            model.predict(QUERIES)
        assert runs == []


NO_TORCH = (
    BLOCK_TORCH
    + """
import numpy as np
from fewshot_edge.runtime import FewShotModel

with FewShotModel.open(sys.argv[1], store=sys.argv[2], adapt="film") as m:
    m.enroll("dark", [np.full((4, 4), 20, np.uint8), np.full((4, 4), 40, np.uint8)])
    m.enroll("light", [np.full((4, 4), 230, np.uint8)])
    print(m.predict([np.full((4, 4), 210, np.uint8)])[0].label)
assert "torch" not in sys.modules
"""
)


def test_film_runs_without_torch(tmp_path, bundle):
    assert run_python(NO_TORCH, str(bundle), str(tmp_path / "device.db")).split() == ["light"]


def test_bench_adapt_film_times_the_context_refit_beside_prototype(bundle):
    report = compare_modes(bundle, ["film"], runs=20, refits=3)
    assert list(report["modes"]) == ["prototype", "film"] and report["enrolled"] == "20 classes x 5 shots"
    assert all(row["refit"]["p50_ms"] > 0 and row["predict"]["p50_ms"] > 0 for row in report["modes"].values())
