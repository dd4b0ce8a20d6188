"""Matching Networks: the attention logits, the ``matching`` device mode against numbers worked out by hand,
incremental enrollment equal to a refit, FCE graphs that match PyTorch, and the whole loop from the CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import require_data
from runtime_support import embed_by_hand, enroll_after_a_fit, make_bundle, weight
from test_cli_adaptation import character_files, run, train_args
from test_film import adam_losses, episode

from fewshot_edge.checkpoint import load_checkpoint
from fewshot_edge.data.splits import load_splits
from fewshot_edge.episodes import EpisodeSampler
from fewshot_edge.export import check_parity, export_bundle, export_draft
from fewshot_edge.methods import MatchingNet, create_method
from fewshot_edge.methods.matching import attention_logits
from fewshot_edge.models import create_backbone
from fewshot_edge.runtime import ADAPTERS, Adaptation, Engine, FewShotModel, InputSpec
from fewshot_edge.runtime.graph import GraphEngine
from fewshot_edge.runtime.store import Shots

OMNIGLOT = InputSpec(1, 28, 28, mean=(0.5,), std=(0.25,))
KEYS = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]], dtype=np.float32)  # a, b, a
QUERIES = np.array([[2.0, 0.0], [0.0, 1.0], [1.0, 2.0]], dtype=np.float32)
# scale 3: cosines of the queries with (a0, b0, a1) are (1, 0, 1/sqrt2), (0, 1, 1/sqrt2), (1/sqrt5, 2/sqrt5, 3/sqrt10)
# logit_a = log(e^{3 cos a0} + e^{3 cos a1}), logit_b = 3 cos b0
EXPECTED_LOGITS = np.array(
    [
        [np.log(np.e**3 + np.exp(3 / np.sqrt(2))), 0.0],  # 3.3473633760720
        [np.log(1.0 + np.exp(3 / np.sqrt(2))), 3.0],  # 2.2345358529123
        [np.log(np.exp(3 / np.sqrt(5)) + np.exp(9 / np.sqrt(10))), 6 / np.sqrt(5)],  # 3.0466602867, 2.6832815730
    ]
)
EXPECTED_DISTANCE = np.array([0.0, 0.0, 1.0 - 3.0 / np.sqrt(10)])  # 1 - the best cosine in the predicted class
EXPECTED_SHOTS = np.array([2, 1, 2])


def shots(embeddings, targets, labels=("a", "b")) -> Shots:
    return Shots(
        np.arange(len(targets)), list(labels), np.asarray(targets), np.asarray(embeddings, np.float32), None, 1
    )


@pytest.fixture
def adapter(tmp_path):
    bundle = make_bundle(
        tmp_path / "b",
        weight(0, dim=2),
        metric="cosine",
        scale=3.0,
        adaptation=Adaptation("matching", {"matching": {}}),
    )
    return ADAPTERS["matching"](bundle, Engine(bundle.encoder_file()))


def test_attention_logits_are_the_log_of_the_summed_attention():
    logits = attention_logits(
        torch.from_numpy(QUERIES), torch.from_numpy(KEYS), torch.tensor([0, 1, 0]), 2, torch.tensor(3.0)
    )
    np.testing.assert_allclose(logits.numpy(), EXPECTED_LOGITS, rtol=1e-6)
    attention = torch.softmax(3.0 * torch.tensor([1.0, 0.0, 2**-0.5]), 0)  # the first query over the three shots
    np.testing.assert_allclose(torch.softmax(logits, 1)[0, 0].item(), (attention[0] + attention[2]).item(), rtol=1e-6)


def test_matching_mode_scores_by_hand(adapter):
    adapter.fit(shots(KEYS, [0, 1, 0]))
    logits, distance, n_shots = adapter.score(QUERIES)
    np.testing.assert_allclose(logits, EXPECTED_LOGITS, rtol=1e-6)
    np.testing.assert_allclose(distance, EXPECTED_DISTANCE, atol=1e-7)
    assert n_shots.tolist() == EXPECTED_SHOTS.tolist() and adapter.labels == ["a", "b"]


def test_added_shots_and_classes_equal_a_full_refit(adapter):
    adapter.fit(shots(KEYS[:2], [0, 1]))
    assert adapter.add("a", KEYS[2:], np.zeros((1, 1, 4, 4), np.uint8))
    assert adapter.add("c", np.array([[-1.0, 0.5]], np.float32), np.zeros((1, 1, 4, 4), np.uint8))
    incremental = adapter.score(QUERIES)
    adapter.fit(shots([*KEYS, [-1.0, 0.5]], [0, 1, 0, 2], labels=("a", "b", "c")))
    for got, want in zip(incremental, adapter.score(QUERIES), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-12)
    np.testing.assert_allclose(incremental[0][:, :2], EXPECTED_LOGITS, rtol=1e-6)  # a new class leaves a and b's logits


def test_model_predicts_by_hand_and_enrolls_without_refitting(tmp_path):
    w = weight(3)
    bundle = make_bundle(
        tmp_path / "b",
        w,
        metric="cosine",
        scale=0.7,
        temperature=1.3,
        adaptation=Adaptation("matching", {"matching": {}}),
    )
    with FewShotModel.open(bundle.path) as model:
        cat, dog, more, queries, fits = enroll_after_a_fit(model)
        probabilities = model.predict_proba(queries)
        assert fits == 1  # one fit; every enrollment after it was an add
        keys, q = embed_by_hand(cat + more + dog, w), embed_by_hand(queries, w)
        cos = (q / np.linalg.norm(q, axis=1, keepdims=True)) @ (keys / np.linalg.norm(keys, axis=1, keepdims=True)).T
        logits = np.stack([np.log(np.exp(0.7 * cos[:, :6]).sum(1)), np.log(np.exp(0.7 * cos[:, 6:]).sum(1))], 1)
        expected = np.exp(logits / 1.3) / np.exp(logits / 1.3).sum(1, keepdims=True)
        np.testing.assert_allclose(probabilities, expected, rtol=1e-5)
        model.refit()
        np.testing.assert_allclose(model.predict_proba(queries), probabilities, rtol=1e-6)


def test_a_few_steps_reduce_the_loss_with_and_without_fce():
    for fce in (False, True):
        torch.manual_seed(0)
        method = MatchingNet(create_backbone("conv4", 1, 28), fce=fce)
        losses = adam_losses(method, episode(5, 2, q_query=3), 6)
        assert losses[-1] < losses[0]


@pytest.fixture(scope="module")
def fce_method() -> MatchingNet:
    torch.manual_seed(0)
    method = create_method("matching", create_backbone("conv4", 1, 28), fce=True, fce_steps=2)
    with torch.no_grad():
        for module in method.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.uniform_(-0.5, 0.5)
                module.running_var.uniform_(0.5, 2.0)
    return method.eval()


def test_fce_graphs_pass_parity_and_the_mode_equals_pytorch(fce_method, tmp_path):
    adapter = export_draft(fce_method, OMNIGLOT, tmp_path)
    assert {e.role for e in adapter.bundle.manifest.files.values()} == {"encoder", "fce_support", "fce_query"}
    real = np.random.default_rng(1).integers(0, 256, (12, 1, 28, 28), dtype=np.uint8)
    report = check_parity(fce_method, adapter, OMNIGLOT, real, batch_sizes=(1, 5), tolerance=1e-4)
    assert report.passed and {"fce_support on 12 real images", "fce_query on random batch of 1"} <= set(report.checks)

    ep = episode(4, 3, q_query=2)
    x = torch.cat([ep.support, ep.query])
    emb = adapter.embed(x.numpy())
    adapter.fit(shots(emb[:12], ep.support_labels.numpy(), labels=("0", "1", "2", "3")))
    with torch.no_grad():
        expected = fce_method.logits(ep.support, ep.support_labels, ep.query, 4).double().numpy()
    np.testing.assert_allclose(adapter.score(emb[12:])[0], expected, atol=1e-4)
    assert not adapter.add("0", emb[:1], np.zeros((1, 1, 28, 28), np.uint8))  # FCE: a change re-encodes everything

    runs = []
    run_graph = GraphEngine.run
    adapter._graphs["fce_support"].run = lambda *a: (
        runs.append(len(a[0])) or run_graph(adapter._graphs["fce_support"], *a)
    )
    adapter.fit(shots(emb[:12], ep.support_labels.numpy(), labels=("0", "1", "2", "3")))
    assert runs == [12]  # the refit re-encodes all stored shots through the exported support graph


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("matching")
    source = require_data("omniglot/images_background_small1.zip")[0]
    run(*train_args(source, out / "run", "matching", "-O", "fce=true", "-O", "fce_steps=2"))
    return out


def test_train_eval_export_and_predict_from_the_cli(trained, tmp_path):
    run_dir = trained / "run"
    evaluated = run("eval", run_dir / "last.pt", "--episodes", "5", "--query", "5", "--device", "cpu", "--json")
    assert 0.0 <= json.loads(evaluated.output)["accuracy"] <= 1.0
    run("export", run_dir / "last.pt", "--out", tmp_path / "bundle", "--calibration-episodes", "20")
    manifest = json.loads((tmp_path / "bundle" / "manifest.json").read_text())
    assert manifest["adaptation"]["default"] == "matching" and manifest["adaptation"]["modes"]["matching"]["fce"]
    assert manifest["provenance"]["parity"]["passed"] and manifest["provenance"]["parity"]["max_abs_diff"] <= 1e-4
    assert manifest["calibration"]["open_set"]["thresholds_by_shots"]
    shots_dir, queries, labels = character_files(run_dir, tmp_path / "files")
    store = tmp_path / "device.db"
    run("enroll", "--bundle", tmp_path / "bundle", "--store", store, "--adapt", "matching", shots_dir)
    answers = json.loads(run("predict", "--bundle", tmp_path / "bundle", "--store", store, *queries, "--json").output)
    assert len(answers) == 4 and all(a["top_k"][0]["label"] in labels for a in answers)
    bench = json.loads(
        run("bench", tmp_path / "bundle", "--adapt", "matching", "--quick", "--threads", "1", "--json").output
    )
    assert set(bench["matching by classes"]["classes"]) == {"5", "20"}


def test_runtime_predictions_equal_pytorch_on_held_out_episodes(trained, tmp_path):
    checkpoint = trained / "run" / "last.pt"
    export_bundle(checkpoint, tmp_path / "bundle", calibration_episodes=20)
    method, config, spec, _ = load_checkpoint(checkpoint)
    validation = load_splits(config)[1]
    raw = 255 - validation.images[:, 0]  # the data set stores them inverted
    for seed in range(3):
        ep = EpisodeSampler(validation, 5, 2, 3, seed=seed).sample()
        with torch.no_grad():
            expected = method.logits(ep.support, ep.support_labels, ep.query, 5).argmax(1).numpy()
        index = ep.index.numpy()
        with FewShotModel.open(tmp_path / "bundle", store=tmp_path / f"s{seed}.db") as model:
            model.enroll_many({f"c{c}": list(raw[index[c, :2]]) for c in range(5)})
            got = model.predict_proba(list(raw[index[:, 2:].ravel()])).argmax(1)
        assert (got == expected).all()
