"""Relation Networks: feature maps, the relation module over every pair, the ``relation`` device mode against
numbers worked out by hand, incremental enrollment equal to a refit, and the whole loop from the CLI."""

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
    make_bundle,
    run_python,
    weight,
)
from test_cli_adaptation import character_files, run, train_args
from test_film import adam_losses, episode

import fewshot_edge.runtime.relation as relation_mode
from fewshot_edge.checkpoint import load_checkpoint
from fewshot_edge.data.splits import load_splits
from fewshot_edge.episodes import EpisodeSampler
from fewshot_edge.export import export_bundle
from fewshot_edge.methods import RelationNet
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
from fewshot_edge.runtime.graph import GraphEngine
from fewshot_edge.runtime.store import Shots


def bilinear_relation(a: np.ndarray, b: float, channels: int = 3) -> bytes:
    """ONNX bytes of a relation graph over (N, channels, 1, 1) maps: z = flatten(q) @ a @ flatten(c).T + b."""
    q = helper.make_tensor_value_info("queries", TensorProto.FLOAT, ["Q", channels, 1, 1])
    c = helper.make_tensor_value_info("classes", TensorProto.FLOAT, ["K", channels, 1, 1])
    z = helper.make_tensor_value_info("relations", TensorProto.FLOAT, ["Q", "K"])
    nodes = [
        helper.make_node("Flatten", ["queries"], ["qf"], axis=1),
        helper.make_node("Flatten", ["classes"], ["cf"], axis=1),
        helper.make_node("MatMul", ["qf", "A"], ["qa"]),
        helper.make_node("Transpose", ["cf"], ["ct"], perm=[1, 0]),
        helper.make_node("MatMul", ["qa", "ct"], ["m"]),
        helper.make_node("Add", ["m", "b"], ["relations"]),
    ]
    return _model(nodes, "relation", [q, c], [z], {"A": a.astype(np.float32), "b": np.float32(b)})


def relation_bundle(path, a, b, w=None, temperature=1.0, channels=3):
    w = weight(0) if w is None else w
    return write_bundle(
        path,
        {"encoder.onnx": linear_encoder(w), "relation.onnx": bilinear_relation(a, b, channels)},
        input_spec=SPEC,
        embedding=EmbeddingSpec(w.shape[1]),
        adaptation=Adaptation("relation", {"relation": {}}),
        calibration=Calibration(temperature, OpenSet()),
        provenance={"method": "test"},
    )


def shots(embeddings, targets, labels=("a", "b")) -> Shots:
    return Shots(
        np.arange(len(targets)), list(labels), np.asarray(targets), np.asarray(embeddings, np.float32), None, 1
    )


# relation z = q . c - 1 (a = identity, b = -1); class a = mean([1,0,0], [0,1,0]) = [.5,.5,0], class b = [0,0,2]
SHOTS = np.array([[1, 0, 0], [0, 1, 0], [0, 0, 2]], dtype=np.float32)
QUERIES = np.array([[2, 0, 0], [0, 0, 1], [1, 1, 1]], dtype=np.float32)
EXPECTED_Z = np.array([[0.0, -1.0], [-1.0, 1.0], [0.0, 1.0]])
EXPECTED_DISTANCE = np.array([0.5, 1 - 1 / (1 + np.exp(-1.0)), 1 - 1 / (1 + np.exp(-1.0))])  # 1 - sigmoid(best z)
EXPECTED_SHOTS = [2, 1, 1]


@pytest.fixture
def adapter(tmp_path):
    bundle = relation_bundle(tmp_path / "b", np.eye(3), -1.0)
    return ADAPTERS["relation"](bundle, Engine(bundle.encoder_file()))


def test_relation_mode_scores_by_hand(adapter):
    adapter.fit(shots(SHOTS, [0, 0, 1]))
    z, distance, n_shots = adapter.score(QUERIES)
    np.testing.assert_allclose(z, EXPECTED_Z, atol=1e-7)
    np.testing.assert_allclose(distance, EXPECTED_DISTANCE, rtol=1e-7)  # 0.5, 0.26894142, 0.26894142
    assert n_shots.tolist() == EXPECTED_SHOTS and adapter.map_shape == (3, 1, 1)


def test_queries_are_batched_against_every_class_in_chunks(adapter, monkeypatch):
    adapter.fit(shots(SHOTS, [0, 0, 1]))
    runs = []
    run_graph = adapter.relation.run
    adapter.relation.run = lambda q, c: runs.append((len(q), len(c))) or run_graph(q, c)
    adapter.score(QUERIES)
    assert runs == [(3, 2)]  # every query x every class in one run
    monkeypatch.setattr(relation_mode, "MAX_PAIRS", 4)
    runs.clear()
    np.testing.assert_allclose(adapter.score(QUERIES)[0], EXPECTED_Z, atol=1e-7)
    assert runs == [(2, 2), (1, 2)]


def test_added_shots_and_classes_equal_a_full_refit(adapter):
    adapter.fit(shots(SHOTS[[0, 2]], [0, 1]))
    assert adapter.add("a", SHOTS[1:2], np.zeros((1, 1, 4, 4), np.uint8))
    assert adapter.add("c", np.array([[1.0, -1.0, 0.5]], np.float32), np.zeros((1, 1, 4, 4), np.uint8))
    incremental = adapter.score(QUERIES)
    np.testing.assert_allclose(incremental[0][:, :2], EXPECTED_Z, atol=1e-7)
    adapter.fit(shots([*SHOTS, [1.0, -1.0, 0.5]], [0, 0, 1, 2], labels=("a", "b", "c")))
    for got, want in zip(incremental, adapter.score(QUERIES), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)


def test_model_predicts_by_hand_without_refitting_on_enrollment(tmp_path):
    rng = np.random.default_rng(4)
    a, w = rng.normal(size=(3, 3)), weight(2)
    bundle = relation_bundle(tmp_path / "b", a, 0.3, w=w, temperature=0.8)
    with FewShotModel.open(bundle.path) as model:
        cat, dog, more, queries, fits = enroll_after_a_fit(model)
        predictions = model.predict(queries)
        probabilities = model.predict_proba(queries)
        assert fits == 1  # one fit; the enrollments after it updated the class features in place
    classes = np.stack([embed_by_hand(cat + more, w).mean(0), embed_by_hand(dog, w).mean(0)])
    z = embed_by_hand(queries, w) @ a @ classes.T + 0.3
    expected = np.exp(z / 0.8) / np.exp(z / 0.8).sum(1, keepdims=True)
    np.testing.assert_allclose(probabilities, expected, rtol=1e-5)
    np.testing.assert_allclose([p.distance for p in predictions], 1 - 1 / (1 + np.exp(-z.max(1))), rtol=1e-5)


def test_a_relation_graph_that_does_not_hold_the_embeddings_is_refused(tmp_path):
    bundle = relation_bundle(tmp_path / "b", np.eye(2), 0.0, channels=2)  # 2-channel maps, 3-value embeddings
    with pytest.raises(FewShotInputError, match=r"relation graph takes feature maps \(2, 1, 1\)"):
        ADAPTERS["relation"](bundle, Engine(bundle.encoder_file()))


def test_the_encoder_keeps_feature_maps_and_the_module_scores_every_pair():
    torch.manual_seed(0)
    method = RelationNet(create_backbone("conv4", 1, 28)).eval()
    ep = episode(3, 2, q_query=2)
    assert method.features(ep.query).shape == (6, 64, 7, 7) and method.embed(ep.query).shape == (6, 64 * 7 * 7)
    with torch.no_grad():
        logits = method.logits(ep.support, ep.support_labels, ep.query, 3)
        maps = method.features(ep.support)
        classes = torch.stack([maps[ep.support_labels == c].mean(0) for c in range(3)])
        query_maps = method.features(ep.query)
        one_by_one = torch.tensor(
            [[method.relation(query_maps[i : i + 1], classes[c : c + 1]).item() for c in range(3)] for i in range(6)]
        )
    torch.testing.assert_close(logits, one_by_one, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("loss", ["mse", "ce"])
def test_a_few_steps_reduce_the_loss(loss):
    torch.manual_seed(0)
    method = RelationNet(create_backbone("conv4", 1, 28), loss=loss)
    ep = episode(5, 2, q_query=3)
    losses = adam_losses(method, ep, 6)
    assert losses[-1] < losses[0]
    if loss == "mse":
        with torch.no_grad():
            z = method.logits(ep.support, ep.support_labels, ep.query, 5)
            onehot = torch.nn.functional.one_hot(ep.query_labels, 5).float()
            torch.testing.assert_close(method.loss(ep)[0], ((torch.sigmoid(z) - onehot) ** 2).mean())


def test_bad_options_are_refused():
    with pytest.raises(FewShotInputError, match="relation loss must be one of mse, ce"):
        RelationNet(create_backbone("conv4", 1, 28), loss="bce")
    with pytest.raises(FewShotInputError, match="pooled_blocks must be in 0..4"):
        RelationNet(create_backbone("conv4", 1, 28), pooled_blocks=5)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("relation")
    run(*train_args(require_data("omniglot/images_background_small1.zip")[0], out / "run", "relation"))
    return out


def test_train_eval_export_and_predict_from_the_cli(trained, tmp_path):
    run_dir = trained / "run"
    evaluated = run("eval", run_dir / "last.pt", "--episodes", "5", "--query", "5", "--device", "cpu", "--json")
    assert 0.0 <= json.loads(evaluated.output)["accuracy"] <= 1.0
    run("export", run_dir / "last.pt", "--out", tmp_path / "bundle", "--calibration-episodes", "20")
    manifest = json.loads((tmp_path / "bundle" / "manifest.json").read_text())
    assert manifest["adaptation"]["default"] == "relation" and manifest["embedding"]["size"] == 64 * 7 * 7
    assert {f["role"] for f in manifest["files"].values()} == {"encoder", "relation"}
    parity = manifest["provenance"]["parity"]
    assert parity["passed"] and parity["max_abs_diff"] <= 1e-4
    assert any(name.startswith("relation on ") and "real images" in name for name in parity["checks"])
    assert manifest["calibration"]["open_set"]["thresholds_by_shots"]
    shots_dir, queries, labels = character_files(run_dir, tmp_path / "files")
    store = tmp_path / "device.db"
    run("enroll", "--bundle", tmp_path / "bundle", "--store", store, "--adapt", "relation", shots_dir)
    answers = json.loads(run("predict", "--bundle", tmp_path / "bundle", "--store", store, *queries, "--json").output)
    assert len(answers) == 4 and all(a["top_k"][0]["label"] in labels for a in answers)
    assert all(0.0 <= a["distance"] <= 1.0 for a in answers)
    bench = run("bench", tmp_path / "bundle", "--adapt", "relation", "--quick", "--threads", "1").output
    assert "classes  predict p50/p99 ms" in bench and "mode relation, 5 shots per class" in bench


def test_runtime_predictions_equal_pytorch_on_held_out_episodes(trained, tmp_path):
    checkpoint = trained / "run" / "last.pt"
    export_bundle(checkpoint, tmp_path / "bundle", calibration_episodes=20)
    method, config, _, _ = load_checkpoint(checkpoint)
    validation = load_splits(config)[1]
    raw = 255 - validation.images[:, 0]  # the data set stores them inverted
    runs = []
    run_graph = GraphEngine.run
    for seed in range(3):
        ep = EpisodeSampler(validation, 5, 3, 3, seed=seed).sample()
        with torch.no_grad():
            expected = method.logits(ep.support, ep.support_labels, ep.query, 5).double().numpy()
        index = ep.index.numpy()
        with FewShotModel.open(tmp_path / "bundle", store=tmp_path / f"s{seed}.db") as model:
            model.enroll_many({f"c{c}": list(raw[index[c, :3]]) for c in range(5)})
            graph = model.adapter.relation
            graph.run = lambda *x, g=graph: runs.append(1) or run_graph(g, *x)
            model.predict_proba(list(raw[index[:, 3:].ravel()]))
            z = model.adapter.score(model.embed(list(raw[index[:, 3:].ravel()])))[0]
        np.testing.assert_allclose(z, expected, atol=1e-4)
    assert runs  # through the exported relation graph


NO_TORCH = (
    BLOCK_TORCH
    + """
import numpy as np
from fewshot_edge.runtime import FewShotModel

with FewShotModel.open(sys.argv[1], store=sys.argv[2]) as m:
    m.enroll("a", [np.full((4, 4), 20, np.uint8), np.full((4, 4), 90, np.uint8)])
    m.enroll("b", [np.full((4, 4), 230, np.uint8)])
    print(m.adapter.name, *np.round(m.predict_proba([np.full((4, 4), 200, np.uint8)])[0], 6))
assert "torch" not in sys.modules
"""
)


@pytest.mark.parametrize("mode", ["relation", "matching"])
def test_the_modes_run_without_torch(tmp_path, mode):
    if mode == "relation":
        bundle = relation_bundle(tmp_path / "b", np.eye(3), -1.0)
    else:
        bundle = make_bundle(
            tmp_path / "b", weight(0), metric="cosine", scale=3.0, adaptation=Adaptation("matching", {"matching": {}})
        )
    out = run_python(NO_TORCH, str(bundle.path), str(tmp_path / "device.db")).split()
    with FewShotModel.open(bundle.path, store=tmp_path / "here.db") as model:
        model.enroll("a", [np.full((4, 4), 20, np.uint8), np.full((4, 4), 90, np.uint8)])
        model.enroll("b", [np.full((4, 4), 230, np.uint8)])
        expected = np.round(model.predict_proba([np.full((4, 4), 200, np.uint8)])[0], 6)
    assert out[0] == mode and [float(p) for p in out[1:]] == pytest.approx(expected.tolist(), abs=2e-6)
