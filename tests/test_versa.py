"""VERSA and the ``bayes`` device mode: the fixed draw, sampled logits against numbers worked out by hand,
enrollment without a refit, PyTorch against the device on held-out episodes, and the CLI loop."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import require_data
from onnx import TensorProto, helper
from runtime_support import (
    BLOCK_TORCH,
    SPEC,
    _model,
    embed_by_hand,
    enroll_after_a_fit,
    linear_encoder,
    run_python,
    weight,
)
from test_cli_adaptation import character_files, eval_and_export, run, train_args
from test_film import adam_losses, episode
from test_relation import shots

from fewshot_edge.checkpoint import load_checkpoint
from fewshot_edge.data.splits import load_splits
from fewshot_edge.episodes import EpisodeSampler
from fewshot_edge.export import export_bundle
from fewshot_edge.methods import Versa
from fewshot_edge.methods.versa import log_predictive
from fewshot_edge.models import create_backbone
from fewshot_edge.runtime import (
    ADAPTERS,
    Adaptation,
    Calibration,
    EmbeddingSpec,
    Engine,
    FewShotInputError,
    FewShotModel,
    OpenSet,
    write_bundle,
)
from fewshot_edge.runtime.bayes import noise

D = 3
RNG = np.random.default_rng(7)
A, B = RNG.normal(size=(D, D)), 0.3 * RNG.normal(size=(D, D))  # weight mean h @ A, weight log-variance h @ B - 1
U, V = RNG.normal(size=D), 0.3 * RNG.normal(size=D)  # bias mean h @ U, bias log-variance h @ V - 2


def amortise_graph() -> bytes:
    """ONNX bytes of an amortise graph linear in the class means h (K, D), as the comment above says."""
    h = helper.make_tensor_value_info("classes", TensorProto.FLOAT, ["K", D])
    outs = [
        helper.make_tensor_value_info("weight_mean", TensorProto.FLOAT, ["K", D]),
        helper.make_tensor_value_info("bias_mean", TensorProto.FLOAT, ["K"]),
        helper.make_tensor_value_info("weight_log_variance", TensorProto.FLOAT, ["K", D]),
        helper.make_tensor_value_info("bias_log_variance", TensorProto.FLOAT, ["K"]),
    ]
    nodes = [
        helper.make_node("MatMul", ["classes", "A"], ["weight_mean"]),
        helper.make_node("MatMul", ["classes", "U"], ["bias_mean"]),
        helper.make_node("MatMul", ["classes", "B"], ["wb"]),
        helper.make_node("Add", ["wb", "minus_one"], ["weight_log_variance"]),
        helper.make_node("MatMul", ["classes", "V"], ["vb"]),
        helper.make_node("Add", ["vb", "minus_two"], ["bias_log_variance"]),
    ]
    consts = {"A": A, "B": B, "U": U, "V": V, "minus_one": np.float32(-1.0), "minus_two": np.float32(-2.0)}
    return _model(nodes, "amortise", [h], outs, {k: np.asarray(v, np.float32) for k, v in consts.items()})


def bayes_bundle(path, w=None, temperature=1.0, samples=4, seed=3):
    w = weight(0) if w is None else w
    return write_bundle(
        path,
        {"encoder.onnx": linear_encoder(w), "amortise.onnx": amortise_graph()},
        input_spec=SPEC,
        embedding=EmbeddingSpec(w.shape[1]),
        adaptation=Adaptation("bayes", {"bayes": {"samples": samples, "seed": seed}}),
        calibration=Calibration(temperature, OpenSet()),
        provenance={"method": "test"},
    )


def by_hand(classes: np.ndarray, queries: np.ndarray, samples: int = 4, seed: int = 3) -> np.ndarray:
    """(Q, L, K) sampled logits of the graph above for class means ``classes`` (K, D)."""
    h = classes.astype(np.float32).astype(np.float64)
    mean = queries @ (h @ A).T + h @ U
    var = queries**2 @ np.exp(h @ B - 1.0).T + np.exp(h @ V - 2.0)
    return mean[:, None] + np.sqrt(var)[:, None] * noise(samples, len(h), seed)[None]


SHOTS = np.array([[1, 0, 0], [0, 1, 0], [0, 0, 2]], dtype=np.float32)
QUERIES = np.array([[2, 0, 0], [0, 0, 1], [1, 1, 1]], dtype=np.float64)
MEANS = np.array([[0.5, 0.5, 0.0], [0.0, 0.0, 2.0]])  # class a: two shots, class b: one


@pytest.fixture
def adapter(tmp_path):
    bundle = bayes_bundle(tmp_path / "b")
    return ADAPTERS["bayes"](bundle, Engine(bundle.encoder_file()))


def test_the_fixed_draw_is_antithetic_seeded_and_per_class():
    draw = noise(6, 3, seed=5)
    assert draw.shape == (6, 3)
    np.testing.assert_array_equal(draw[3:], -draw[:3])
    np.testing.assert_array_equal(noise(6, 5, seed=5)[:, :3], draw)  # more classes leave the first ones' draws
    np.testing.assert_array_equal(draw[:3, 1], np.random.default_rng((5, 1)).standard_normal(3))
    assert not np.allclose(noise(6, 3, seed=6), draw)
    with pytest.raises(FewShotInputError, match="bayes samples must be an even whole number, 2 or more, got 3"):
        noise(3, 2, seed=0)


def test_bayes_mode_scores_by_hand(adapter):
    adapter.fit(shots(SHOTS, [0, 0, 1]))
    z, distance, n_shots = adapter.score(QUERIES)
    assert z.shape == (3, 4, 2)
    np.testing.assert_allclose(z, by_hand(MEANS, QUERIES), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(z.mean(axis=1), QUERIES @ (MEANS @ A).T + MEANS @ U, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(distance, [2.5, 1.0, 1.5], rtol=1e-6)  # to the nearest class mean, squared
    assert n_shots.tolist() == [2, 1, 2]


def test_added_shots_and_classes_equal_a_full_refit(adapter):
    adapter.fit(shots(SHOTS[[0, 2]], [0, 1]))
    runs = []
    run_graph = adapter.amortiser.run
    adapter.amortiser.run = lambda h: runs.append(len(h)) or run_graph(h)
    assert adapter.add("a", SHOTS[1:2], np.zeros((1, 1, 4, 4), np.uint8))
    assert adapter.add("c", np.array([[1.0, -1.0, 0.5]], np.float32), np.zeros((1, 1, 4, 4), np.uint8))
    assert runs == [1, 1]  # each add amortised only the class it changed
    incremental = adapter.score(QUERIES)
    np.testing.assert_allclose(incremental[0][..., :2], by_hand(MEANS, QUERIES)[..., :2], rtol=1e-5, atol=1e-6)
    adapter.fit(shots([*SHOTS, [1.0, -1.0, 0.5]], [0, 0, 1, 2], labels=("a", "b", "c")))
    for got, want in zip(incremental, adapter.score(QUERIES), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)


def test_model_predicts_the_tempered_mean_softmax_without_refitting(tmp_path):
    w = weight(2)
    bundle = bayes_bundle(tmp_path / "b", w=w, temperature=0.7)
    with FewShotModel.open(bundle.path) as model:
        cat, dog, more, queries, fits = enroll_after_a_fit(model)
        predictions = model.predict(queries, top_k=2)
        probabilities = model.predict_proba(queries)
        assert fits == 1
    means = np.stack([embed_by_hand(cat + more, w).mean(0), embed_by_hand(dog, w).mean(0)])
    z = by_hand(means, embed_by_hand(queries, w)) / 0.7
    each = np.exp(z) / np.exp(z).sum(-1, keepdims=True)
    expected = each.mean(1)
    np.testing.assert_allclose(probabilities, expected, rtol=1e-4)
    entropy = -(expected * np.log(expected)).sum(1)
    epistemic = entropy - (-(each * np.log(each)).sum(-1)).mean(1)
    np.testing.assert_allclose([p.entropy for p in predictions], entropy, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose([p.epistemic for p in predictions], epistemic, rtol=1e-3, atol=1e-6)


def test_a_bundle_with_bad_bayes_parameters_is_refused(tmp_path):
    bundle = bayes_bundle(tmp_path / "b", samples=5)
    with pytest.raises(FewShotInputError, match="bayes samples must be an even whole number, 2 or more, got 5"):
        FewShotModel.open(bundle.path)


def test_eval_uses_the_fixed_draw_and_training_fresh_noise():
    torch.manual_seed(0)
    method = Versa(create_backbone("conv4", 1, 28), hidden=16, samples=4, seed=2).eval()
    ep = episode(3, 2, q_query=2)
    with torch.no_grad():
        s, q = method.embed(ep.support), method.embed(ep.query)
        z = method.sampled_logits(s, ep.support_labels, q, 3)
        h = torch.stack([s[ep.support_labels == c].mean(0) for c in range(3)])
        w_mean, b_mean, w_log_var, b_log_var = (t.double() for t in method.amortiser(h))
        qd = q.double()
        mean = qd @ w_mean.T + b_mean
        std = (qd**2 @ w_log_var.exp().T + b_log_var.exp()).sqrt()
        expected = mean[:, None] + std[:, None] * torch.from_numpy(noise(4, 3, 2))[None]
        torch.testing.assert_close(z.double(), expected, rtol=1e-4, atol=1e-4)
        logits = method.logits(ep.support, ep.support_labels, ep.query, 3)
        torch.testing.assert_close(logits, torch.log(torch.softmax(z, -1).mean(1)), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(method.logits(ep.support, ep.support_labels, ep.query, 3), logits)
        method.train()
        z1, z2 = (method.sampled_logits(s, ep.support_labels, q, 3) for _ in range(2))
    assert not torch.allclose(z1, z2)
    torch.testing.assert_close(log_predictive(z[:, :1]), torch.log_softmax(z[:, 0], -1))


def test_a_few_steps_reduce_the_loss():
    torch.manual_seed(0)
    method = Versa(create_backbone("conv4", 1, 28), hidden=32)
    losses = adam_losses(method, episode(5, 2, q_query=3), 6)
    assert losses[-1] < losses[0]


def test_bad_options_are_refused():
    with pytest.raises(FewShotInputError, match="bayes samples must be an even whole number"):
        Versa(create_backbone("conv4", 1, 28), samples=7)
    with pytest.raises(FewShotInputError, match="versa needs hidden >= 1 and seed >= 0"):
        Versa(create_backbone("conv4", 1, 28), hidden=0)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("versa")
    run(*train_args(require_data("omniglot/images_background_small1.zip")[0], out / "run", "versa", "-O", "hidden=32"))
    return out


def test_train_eval_export_and_predict_from_the_cli(trained, tmp_path):
    run_dir = trained / "run"
    manifest = eval_and_export(run_dir, tmp_path / "bundle")
    assert manifest["adaptation"]["default"] == "bayes"
    assert manifest["adaptation"]["modes"]["bayes"]["samples"] == 16
    assert {f["role"] for f in manifest["files"].values()} == {"encoder", "amortise"}
    parity = manifest["provenance"]["parity"]
    assert parity["passed"] and parity["max_abs_diff"] <= 1e-4
    assert any(name.startswith("amortise on ") and "real images" in name for name in parity["checks"])
    shots_dir, queries, labels = character_files(run_dir, tmp_path / "files")
    store = tmp_path / "device.db"
    run("enroll", "--bundle", tmp_path / "bundle", "--store", store, "--adapt", "bayes", shots_dir)
    answers = json.loads(run("predict", "--bundle", tmp_path / "bundle", "--store", store, *queries, "--json").output)
    assert len(answers) == 4 and all(a["top_k"][0]["label"] in labels for a in answers)
    assert all(0.0 <= a["epistemic"] <= a["entropy"] <= np.log(4) + 1e-9 for a in answers)
    text = run("predict", "--bundle", tmp_path / "bundle", "--store", store, queries[0]).output
    assert "H=" in text and "(epistemic " in text
    bench = run("bench", tmp_path / "bundle", "--adapt", "bayes", "--quick", "--threads", "1").output
    assert "20 classes x 5 shots enrolled" in bench and any(line.startswith("bayes ") for line in bench.splitlines())


def test_runtime_predictions_equal_pytorch_on_held_out_episodes(trained, tmp_path):
    checkpoint = trained / "run" / "last.pt"
    export_bundle(checkpoint, tmp_path / "bundle", calibration_episodes=20)
    method, config, _, _ = load_checkpoint(checkpoint)
    method.eval()
    validation = load_splits(config)[1]
    raw = 255 - validation.images[:, 0]  # the data set stores them inverted
    agree = []
    for seed in range(3):
        ep = EpisodeSampler(validation, 5, 3, 3, seed=seed).sample()
        with torch.no_grad():
            emb = method.embed(torch.cat([ep.support, ep.query])).float()
            expected = method.sampled_logits(emb[:15], ep.support_labels, emb[15:], 5).double().numpy()
            torch_labels = method.logits(ep.support, ep.support_labels, ep.query, 5).argmax(1).numpy()
        index = ep.index.numpy()
        queries = list(raw[index[:, 3:].ravel()])
        with FewShotModel.open(tmp_path / "bundle", store=tmp_path / f"s{seed}.db") as model:
            model.enroll_many({f"c{c}": list(raw[index[c, :3]]) for c in range(5)})
            agree.append(model.predict_proba(queries).argmax(1) == torch_labels)  # fits the mode
            z = model.adapter.score(model.embed(queries))[0]
        np.testing.assert_allclose(z, expected, atol=1e-4)
    assert np.mean(agree) >= 0.9  # the calibrated temperature may move a rare near-tie


NO_TORCH = (
    BLOCK_TORCH
    + """
import numpy as np
from fewshot_edge.runtime import FewShotModel

with FewShotModel.open(sys.argv[1], store=sys.argv[2]) as m:
    m.enroll("a", [np.full((4, 4), 20, np.uint8), np.full((4, 4), 90, np.uint8)])
    m.enroll("b", [np.full((4, 4), 230, np.uint8)])
    p = m.predict([np.full((4, 4), 200, np.uint8)])[0]
    print(m.adapter.name, round(p.probability, 6), round(p.entropy, 6), round(p.epistemic, 6))
assert "torch" not in sys.modules
"""
)


def test_the_mode_runs_without_torch(tmp_path):
    bundle = bayes_bundle(tmp_path / "b")
    out = run_python(NO_TORCH, str(bundle.path), str(tmp_path / "device.db")).split()
    with FewShotModel.open(bundle.path, store=tmp_path / "here.db") as model:
        model.enroll("a", [np.full((4, 4), 20, np.uint8), np.full((4, 4), 90, np.uint8)])
        model.enroll("b", [np.full((4, 4), 230, np.uint8)])
        p = model.predict([np.full((4, 4), 200, np.uint8)])[0]
    assert out[0] == "bayes"
    assert [float(x) for x in out[1:]] == pytest.approx([p.probability, p.entropy, p.epistemic], abs=2e-6)
