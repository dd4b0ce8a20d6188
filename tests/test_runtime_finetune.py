"""The finetune adaptation mode on a tiny linear bundle: one step checked by hand, the head kept in the
store across restarts, refits on enrollment changes, more steps than trained, the store's remembered
mode, bad options, and all of it without torch."""

from __future__ import annotations

import numpy as np
import pytest
from runtime_support import BLOCK_TORCH, embed_by_hand, images, make_bundle, run_python, weight

from fewshot_edge.runtime import Adaptation, FewShotInputError, FewShotModel
from fewshot_edge.runtime import adapters as adapters_module

CAT, DOG = images(1, 3, center=60), images(2, 2, center=190)
QUERIES = images(4, 2, center=70) + images(5, 2, center=180)
FINETUNE = {
    "init": "prototype",
    "steps": 2,
    "lr_weight": [[0.3], [0.1]],
    "lr_bias": [0.2, 0.05],
    "l2": 0.5,
    "temperature": 2.0,
}


def softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


@pytest.fixture
def bundle(tmp_path):
    return make_bundle(
        tmp_path / "bundle",
        weight(0),
        temperature=1.5,
        adaptation=Adaptation("prototype", {"prototype": {}, "finetune": FINETUNE}),
    ).path


def head_by_hand(
    classes: list[list[np.ndarray]], lrs_w: list[float], lrs_b: list[float], l2: float
) -> tuple[np.ndarray, np.ndarray]:
    """The fine-tuned head written out step by step: W0 = 2c, b0 = -|c|^2, then gradient steps of the
    cross-entropy summed over the shots, times classes / shots, plus l2/2 |head - start|^2."""
    x = np.concatenate([embed_by_hand(c, weight(0)) for c in classes])
    y = np.concatenate([np.full(len(c), i) for i, c in enumerate(classes)])
    c = np.stack([embed_by_hand(k, weight(0)).mean(0) for k in classes])
    w0, b0 = 2 * c, -(c**2).sum(1)
    w, b = w0, b0
    for lr_w, lr_b in zip(lrs_w, lrs_b, strict=True):
        residual = softmax(x @ w.T + b)
        residual[np.arange(len(y)), y] -= 1.0
        per_shot = len(classes) / len(x)
        gw = per_shot * sum(np.outer(residual[i], x[i]) for i in range(len(x))) + l2 * (w - w0)
        gb = per_shot * residual.sum(0) + l2 * (b - b0)
        w, b = w - lr_w * gw, b - lr_b * gb
    return w, b


def test_finetune_predictions_match_the_head_by_hand(bundle):
    w, b = head_by_hand([CAT, DOG], [0.3, 0.1], [0.2, 0.05], 0.5)
    logits = embed_by_hand(QUERIES, weight(0)) @ w.T + b
    with FewShotModel.open(bundle, adapt="finetune") as model:
        model.enroll("cat", CAT)
        model.enroll("dog", DOG)
        np.testing.assert_allclose(model.predict_proba(QUERIES), softmax(logits / 2.0), rtol=1e-4, atol=1e-6)
        assert [p.label for p in model.predict(QUERIES)] == [["cat", "dog"][i] for i in logits.argmax(1)]
        np.testing.assert_allclose(model.adapter.weight, w, rtol=1e-4, atol=1e-5)


def test_more_steps_than_trained_repeat_the_last_step_size(bundle):
    w, b = head_by_hand([CAT, DOG], [0.3, 0.1, 0.1, 0.1, 0.1], [0.2, 0.05, 0.05, 0.05, 0.05], 0.5)
    with FewShotModel.open(bundle, adapt="finetune", adapt_options={"steps": 5}) as model:
        model.enroll("cat", CAT)
        model.enroll("dog", DOG)
        model.refit()
        np.testing.assert_allclose(model.adapter.weight, w, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(model.adapter.bias, b, rtol=1e-4, atol=1e-5)


def test_head_survives_a_restart_and_an_enrollment_refits(bundle, tmp_path, monkeypatch):
    store = tmp_path / "device.db"
    with FewShotModel.open(bundle, store=store, adapt="finetune") as model:
        model.enroll("cat", CAT)
        model.enroll("dog", DOG)
        before = model.predict_proba(QUERIES)
    fits = []
    real = adapters_module.finetune_head
    monkeypatch.setattr(adapters_module, "finetune_head", lambda *a: fits.append(1) or real(*a))
    with FewShotModel.open(bundle, store=store, adapt="finetune") as model:
        np.testing.assert_array_equal(model.predict_proba(QUERIES), before)
        assert fits == []  # the stored head was taken back
        model.enroll("bird", images(3, 2, center=120))
        assert model.predict_proba(QUERIES).shape == (4, 3) and fits == [1]  # a new class refits
    with FewShotModel.open(bundle, store=store, adapt="finetune", adapt_options={"steps": 4}) as model:
        model.predict(QUERIES)
        assert fits == [1, 1]  # other steps: the kept head does not apply


def test_store_remembers_its_mode_and_bad_options_are_errors(bundle, tmp_path):
    store = tmp_path / "device.db"
    with FewShotModel.open(bundle, store=store) as model:
        assert model.adapter.name == "prototype"  # the bundle's default
        model.store.set_adaptation("finetune")
    with FewShotModel.open(bundle, store=store) as model:
        assert model.adapter.name == "finetune"
    with FewShotModel.open(bundle, store=store, adapt="prototype") as model:
        assert model.adapter.name == "prototype"  # asking beats remembering
    for adapt, options, message in (
        ("finetune", {"steps": -1}, "fine-tune steps must be a whole number"),
        ("finetune", {"steps": 2.5}, "fine-tune steps must be a whole number"),
        ("finetune", {"lr": 1}, "adaptation mode 'finetune' has no option 'lr' (it takes: steps)"),
        ("prototype", {"steps": 3}, "adaptation mode 'prototype' has no option 'steps' (it takes none)"),
    ):
        with pytest.raises(FewShotInputError, match=message.replace("(", r"\(").replace(")", r"\)")):
            FewShotModel.open(bundle, adapt=adapt, adapt_options=options)
    zero_init = make_bundle(
        tmp_path / "zero", weight(0), adaptation=Adaptation("finetune", {"finetune": {**FINETUNE, "init": "zero"}})
    ).path
    with pytest.raises(FewShotInputError, match="fine-tune head init 'zero' is not supported"):
        FewShotModel.open(zero_init)


def test_finetune_works_without_torch(bundle, tmp_path):
    code = (
        BLOCK_TORCH
        + """
import sys
import numpy as np
from fewshot_edge.runtime import FewShotModel
rng = np.random.default_rng(0)
with FewShotModel.open(sys.argv[1], store=sys.argv[2], adapt="finetune") as model:
    model.enroll("dark", [np.full((4, 4), 40, np.uint8) + rng.integers(0, 9, (4, 4), dtype=np.uint8) for _ in range(3)])
    model.enroll("light", [np.full((4, 4), 210, np.uint8) + rng.integers(0, 9, (4, 4), dtype=np.uint8) for _ in range(3)])
    print(model.predict([np.full((4, 4), 45, np.uint8)])[0].label, "torch" in sys.modules and sys.modules["torch"] is not None)
"""
    )
    assert run_python(code, str(bundle), str(tmp_path / "s.db")).split() == ["dark", "False"]
