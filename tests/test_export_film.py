"""FiLM export: a context graph and a two-input encoder graph, both checked and matching PyTorch; identity
FiLM reproduces the plain encoder; and a FiLM bundle with both files, their roles and the film mode."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from conftest import require_data

from fewshot_edge.checkpoint import build_method, load_checkpoint, save_checkpoint
from fewshot_edge.config import TrainConfig
from fewshot_edge.data.splits import load_splits
from fewshot_edge.episodes import EpisodeSampler
from fewshot_edge.export import ParityError, check_parity, export_bundle, export_context_onnx, export_draft, export_onnx
from fewshot_edge.export.parity import BATCH_SIZES
from fewshot_edge.methods import FiLMProtoNet
from fewshot_edge.runtime import ContextEngine, Engine, FewShotModel, InputSpec, open_bundle
from fewshot_edge.runtime.preprocess import normalize
from fewshot_edge.train import train

SPEC = InputSpec(1, 28, 28, mean=(0.5,), std=(0.25,))


@pytest.fixture(scope="module")
def method() -> FiLMProtoNet:
    """Conv-4 FiLM with random BatchNorm statistics and generators nudged off identity."""
    torch.manual_seed(0)
    method = build_method(TrainConfig(method="film", method_options={"task_dim": 32}), SPEC)
    with torch.no_grad():
        for module in method.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.uniform_(-0.5, 0.5)
                module.running_var.uniform_(0.5, 2.0)
        for generator in method.context.generators:
            generator[-1].weight.normal_(0, 0.1)
            generator[-1].bias.normal_(0, 0.1)
    return method.eval()


@pytest.fixture(scope="module")
def graphs(method, tmp_path_factory):
    out = tmp_path_factory.mktemp("film")
    paths = {"context": out / "context.onnx", "encoder": out / "encoder.onnx", "plain": out / "plain.onnx"}
    export_context_onnx(method, SPEC, paths["context"])
    export_onnx(method, SPEC, paths["encoder"], film=True)
    export_onnx(method, SPEC, paths["plain"])
    return paths


def images(n: int, seed: int = 0) -> np.ndarray:
    pixels = np.random.default_rng(seed).integers(0, 256, size=(n, 1, 28, 28), dtype=np.uint8)
    return normalize(pixels, SPEC)


def test_graphs_are_checked_with_the_film_interface(method, graphs):
    film_size = method.context.identity.numel()
    for role, inputs, output in (("context", ["images"], "film"), ("encoder", ["images", "film"], "embeddings")):
        model = onnx.load(str(graphs[role]))
        onnx.checker.check_model(model, full_check=True)
        assert max(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")) >= 17
        assert [i.name for i in model.graph.input] == inputs and [o.name for o in model.graph.output] == [output]
        assert model.graph.input[0].type.tensor_type.shape.dim[0].dim_param  # any number of images
    context, encoder = ContextEngine(graphs["context"]), Engine(graphs["encoder"])
    for n in (1, 9):
        film = context.run(images(n))
        assert film.shape == (film_size,) and film.dtype == np.float32
        assert encoder.embed(images(n), film).shape == (n, 64)


def test_both_graphs_match_pytorch_under_identity_and_random_film(method, graphs, tmp_path):
    report = check_parity(
        method,
        export_draft(method, SPEC, tmp_path),
        SPEC,
        real_pixels=np.random.default_rng(1).integers(0, 256, (20, 1, 28, 28), dtype=np.uint8),
        batch_sizes=(1, 7),
        tolerance=1e-4,
    )
    assert report.passed and report.max_abs_diff <= 1e-4
    prefixes = ("context on ", "encoder under identity FiLM on ", "encoder under random FiLM on ")
    assert set(report.checks) == {
        p + b for p in prefixes for b in ("random batch of 1", "random batch of 7", "20 real images")
    }
    identity = method.context.identity.numpy()
    assert not np.allclose(ContextEngine(graphs["context"]).run(images(5)), identity, atol=1e-2)


def test_identity_film_encoder_reproduces_the_plain_encoder(method, graphs):
    x = images(7)
    film = Engine(graphs["encoder"]).embed(x, method.context.identity.numpy())
    np.testing.assert_allclose(film, Engine(graphs["plain"]).embed(x), rtol=0, atol=1e-5)


def test_context_graph_is_invariant_to_support_order(graphs):
    context = ContextEngine(graphs["context"])
    x = images(12)
    np.testing.assert_allclose(
        context.run(x[np.random.default_rng(2).permutation(12)]), context.run(x), rtol=0, atol=1e-5
    )


@pytest.fixture(scope="module")
def film_checkpoint(tmp_path_factory):
    out = tmp_path_factory.mktemp("film-run")
    config = TrainConfig(
        sources=[str(require_data("omniglot/images_background_small1.zip")[0])],
        data_options={"rotations": True},
        holdout=1,
        method="film",
        method_options={"task_dim": 32},
        n_way=5,
        k_shot=1,
        q_query=2,
        episodes=3,
        val_every=3,
        val_episodes=3,
        seed=0,
        device="cpu",
        out=str(out),
    )
    train(config, progress_bar=False)
    return out / "best.pt"


def test_film_bundle_has_both_graphs_roles_and_the_film_mode(film_checkpoint, tmp_path):
    export_bundle(film_checkpoint, tmp_path / "bundle", calibration_episodes=20)
    bundle = open_bundle(tmp_path / "bundle")
    manifest = bundle.manifest
    assert {name: entry.role for name, entry in manifest.files.items()} == {
        "context.onnx": "context",
        "encoder.onnx": "encoder",
    }
    assert bundle.file("context").is_file() and bundle.file("encoder").is_file()
    assert manifest.adaptation.default == "film"
    film = manifest.adaptation.modes["film"]
    assert film["film_size"] == 2 * sum(film["blocks"]) == 2 * 4 * 64 and film["task_dim"] == 32
    assert (film["context_input"], film["film_input"]) == ("images", "film")
    assert manifest.calibration.temperature > 0 and manifest.calibration.open_set.thresholds_by_shots
    assert manifest.provenance["method"] == "film" and manifest.provenance["parity"]["passed"]
    encoder = onnx.load(str(bundle.file("encoder")))
    assert [i.name for i in encoder.graph.input] == ["images", "film"]


def test_runtime_film_predictions_equal_the_pytorch_method(film_checkpoint, tmp_path):
    method, config, spec, payload = load_checkpoint(film_checkpoint.with_name("last.pt"))
    with torch.no_grad():  # a few episodes leave the FiLM near identity: move it, so the context matters
        for generator in method.context.generators:
            generator[-1].weight.normal_(0, 0.05)
            generator[-1].bias.normal_(0, 0.05)
    save_checkpoint(tmp_path / "film.pt", method, config, spec)
    export_bundle(tmp_path / "film.pt", tmp_path / "bundle", calibration_episodes=20)

    validation = load_splits(config)[1]
    raw = 255 - validation.images[:, 0] if spec.invert else validation.images[:, 0]  # the data set stores them inverted
    agree = []
    for seed in range(3):
        ep = EpisodeSampler(validation, 5, 2, 3, seed=seed).sample()
        with torch.no_grad():
            expected = method.logits(ep.support, ep.support_labels, ep.query, 5).argmax(1).numpy()
        index = ep.index.numpy()
        with FewShotModel.open(tmp_path / "bundle", adapt="film") as model:
            for c in range(5):
                model.enroll(f"c{c}", list(raw[index[c, :2]]))
            agree.append(model.predict_proba(list(raw[index[:, 2:].ravel()])).argmax(1) == expected)
            assert not np.allclose(model.adapter.film, method.context.identity.numpy(), atol=1e-2)
    assert np.concatenate(agree).all()


def test_film_export_checks_and_calibrates_with_the_runtime_engines(film_checkpoint, tmp_path, monkeypatch):
    runs = []
    run = ContextEngine.run
    monkeypatch.setattr(ContextEngine, "run", lambda self, images: runs.append(len(images)) or run(self, images))
    bundle = export_bundle(film_checkpoint, tmp_path / "bundle", calibration_episodes=20)
    parity = bundle.manifest.provenance["parity"]["checks"]
    context_checks = [name for name in parity if name.startswith("context on ")]
    assert len(context_checks) == len(BATCH_SIZES) + 1  # each random batch and the real images
    # one context run per parity batch, then one per calibration episode pair (its 10 classes' shots)
    assert len(runs) == len(context_checks) + 20
    assert all(n % 10 == 0 and 10 <= n <= 50 for n in runs[len(context_checks) :])

    monkeypatch.setattr(ContextEngine, "run", lambda self, images: run(self, images) + np.float32(1e-3))
    with pytest.raises(ParityError, match=r"max \|onnx - torch\| = .* on context on "):
        export_bundle(film_checkpoint, tmp_path / "drifted", calibration_episodes=20)
    assert not (tmp_path / "drifted").exists()
