"""Export: a checked ONNX encoder with a dynamic batch, parity with PyTorch, calibration maths, bundles that
predict like PyTorch, refusal to write a bundle that fails parity, and the ``export`` command."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch
from click.testing import CliRunner
from onnx import numpy_helper

import fewshot_edge.export.bundle as export_module
from fewshot_edge.checkpoint import build_method, load_checkpoint
from fewshot_edge.cli import main
from fewshot_edge.config import TrainConfig
from fewshot_edge.data.splits import load_splits
from fewshot_edge.episodes import EpisodeSampler
from fewshot_edge.export import (
    MIN_QUERIES_PER_SHOT,
    ParityError,
    check_parity,
    export_bundle,
    export_draft,
    fit_open_set,
    fit_temperature,
    fit_temperatures,
    nll,
)
from fewshot_edge.runtime import Engine, FewShotInputError, FewShotModel, InputSpec


@pytest.fixture(scope="module")
def bundle(checkpoint, tmp_path_factory):
    return export_bundle(checkpoint, tmp_path_factory.mktemp("export") / "bundle", calibration_episodes=100)


def random_method(backbone: str, spec: InputSpec):
    """An untrained method with random BatchNorm statistics and affine parameters, so folding them matters."""
    torch.manual_seed(0)
    method = build_method(TrainConfig(backbone=backbone), spec)
    for module in method.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 2.0)
            module.weight.data.uniform_(0.5, 1.5)
            module.bias.data.uniform_(-0.2, 0.2)
    return method


def test_encoder_is_checked_opset_17_batchnorm_folded_and_takes_any_batch(bundle):
    path = bundle.file("encoder")
    model = onnx.load(str(path))
    onnx.checker.check_model(model, full_check=True)
    assert max(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")) >= 17
    assert [i.name for i in model.graph.input] == ["images"] and [o.name for o in model.graph.output] == ["embeddings"]
    assert model.graph.input[0].type.tensor_type.shape.dim[0].dim_param
    assert "BatchNormalization" not in {node.op_type for node in model.graph.node}
    engine = Engine(path)
    for n in (1, 7):
        assert engine.embed(np.zeros((n, 1, 28, 28), np.float32)).shape == (n, 64)


@pytest.mark.parametrize("backbone, size", [("conv4", 28), ("resnet12", 16)])
def test_onnx_embeddings_match_pytorch(tmp_path, backbone, size):
    spec = InputSpec(1, size, size, mean=(0.5,), std=(0.25,))
    method = random_method(backbone, spec)
    method.train()
    report = check_parity(method, export_draft(method, spec, tmp_path), spec, tolerance=1e-4)
    assert method.training  # the export works on a copy; parity restores the mode
    assert report.passed and report.max_abs_diff <= 1e-4
    assert {"random batch of 1", "random batch of 7"} <= set(report.checks)


def test_bundle_predicts_like_pytorch(checkpoint, bundle):
    method, config, spec, _ = load_checkpoint(checkpoint)
    validation = load_splits(config)[1]
    episode = EpisodeSampler(validation, 5, 2, 4, seed=7).sample()
    with torch.no_grad():
        logits = method.logits(episode.support, episode.support_labels, episode.query, episode.n_way).double().numpy()

    def raw(ids):  # the data set keeps inverted pixels; give the device the images as drawn
        return [255 - validation.images[i][0] for i in ids]

    with FewShotModel.open(bundle.path) as model:
        for c, ids in enumerate(episode.index.numpy()):
            model.enroll(f"class {c}", raw(ids[:2]))
        probabilities = model.predict_proba(raw(episode.index[:, 2:].flatten().numpy()))
        assert model.labels == [f"class {c}" for c in range(5)]
    np.testing.assert_array_equal(probabilities.argmax(1), logits.argmax(1))
    z = logits / bundle.manifest.calibration.temperature_for(2)  # the one fitted for 2-shot classes
    expected = np.exp(z - z.max(1, keepdims=True))
    np.testing.assert_allclose(probabilities, expected / expected.sum(1, keepdims=True), atol=1e-4)


def test_manifest_records_calibration_and_provenance(bundle):
    manifest = bundle.manifest
    assert manifest.embedding.size == 64 and manifest.embedding.metric == "sqeuclidean"
    assert "prototype" in manifest.adaptation.modes
    calibration = manifest.calibration
    assert calibration.temperature > 0
    open_set = calibration.open_set
    assert open_set.threshold > 0 and open_set.statistic == "nearest_distance" and open_set.target_false_reject == 0.05
    assert abs(open_set.false_reject - 0.05) < 0.01 and 0.0 <= open_set.false_accept < 1.0
    assert list(open_set.thresholds_by_shots) == [1, 2, 3, 4, 5]  # 20 episode pairs each
    assert list(calibration.temperatures_by_shots) == [1, 2, 3, 4, 5]  # 1,000 queries each
    assert all(abs(open_set.false_reject_by_shots[k] - 0.05) < 0.01 for k in range(1, 6))
    assert all(0.0 <= open_set.false_accept_by_shots[k] < 1.0 for k in range(1, 6))
    assert open_set.thresholds_by_shots[1] > open_set.thresholds_by_shots[5]  # 1-shot prototypes are farther
    assert open_set.fitted_on.startswith("100 pairs of disjoint 5-way 1..5-shot episodes")
    assert "held-out classes" in open_set.fitted_on
    p = manifest.provenance
    assert (p["method"], p["backbone"], p["episodes_trained"]) == ("protonet", "conv4", 4)
    assert p["data"]["sources"] == ["images_background_small1.zip"]
    assert p["validation"]["n_way"] == 5 and 0.0 <= p["validation"]["accuracy"] <= 1.0 and p["validation"]["ci95"] >= 0
    assert p["parity"]["max_abs_diff"] <= p["parity"]["tolerance"] == 1e-4
    assert p["opset"] >= 17 and p["package_version"] and p["torch_version"] and p["exported_at"]


def test_failed_parity_writes_nothing(checkpoint, tmp_path, monkeypatch):
    exported = export_module.export_onnx

    def perturbed(method, spec, path, **options):
        model = exported(method, spec, path, **options)
        weight = next(t for t in model.graph.initializer if len(t.dims) == 4)  # a convolution's kernel
        weight.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(weight) + 0.01, weight.name))
        onnx.save(model, str(path))
        return model

    monkeypatch.setattr(export_module, "export_onnx", perturbed)
    with pytest.raises(ParityError, match="exceeds the tolerance 0.0001; no bundle written") as failure:
        export_bundle(checkpoint, tmp_path / "bundle")
    assert not failure.value.report.passed
    result = CliRunner().invoke(main, ["export", str(checkpoint), "--out", str(tmp_path / "bundle")])
    assert result.exit_code == 1 and "parity check failed" in result.output
    assert len(result.output.strip().splitlines()) == 1
    assert list(tmp_path.iterdir()) == []


def test_refuses_to_overwrite_before_any_work(checkpoint, bundle):
    with pytest.raises(FewShotInputError, match="already exists"):
        export_bundle(checkpoint, bundle.path)


def test_fit_temperature_recovers_a_known_temperature():
    rng = np.random.default_rng(0)
    logits = rng.normal(0.0, 4.0, size=(20000, 5))
    z = logits / 2.5
    p = np.exp(z - z.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    labels = (rng.random((len(p), 1)) > p.cumsum(1)).sum(1)
    fitted = fit_temperature(logits, labels)
    assert fitted == pytest.approx(2.5, rel=0.05)
    assert nll(logits, labels, fitted) <= min(nll(logits, labels, t) for t in (2.5, 0.99 * fitted, 1.01 * fitted))


def test_a_temperature_per_shot_count_recovers_each_count_s_own():
    rng = np.random.default_rng(1)
    logits = rng.normal(0.0, 4.0, size=(40000, 5))
    shots = np.repeat([1, 5], 20000)
    z = logits / np.where(shots == 1, 2.5, 0.6)[:, None]
    p = np.exp(z - z.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    labels = (rng.random((len(p), 1)) > p.cumsum(1)).sum(1)
    pooled, by_shots = fit_temperatures(logits, labels, shots)
    assert by_shots == {1: pytest.approx(2.5, rel=0.05), 5: pytest.approx(0.6, rel=0.05)}
    assert pooled == pytest.approx(fit_temperature(logits, labels)) and 0.6 < pooled < 2.5
    few = np.where(np.arange(len(shots)) < MIN_QUERIES_PER_SHOT - 1, 3, shots)  # one count too rare to fit alone
    assert fit_temperatures(logits, labels, few)[1] is None


def test_open_set_threshold_is_the_known_quantile():
    open_set = fit_open_set(np.arange(1.0, 101.0), np.array([50.0, 96.0, 100.0, 200.0]), 0.05, fitted_on="hand")
    assert open_set.threshold == pytest.approx(95.05)  # 1 + 0.95 * 99, linear interpolation
    assert (open_set.false_reject, open_set.false_accept) == (pytest.approx(0.05), 0.25)
    small = fit_open_set(np.array([4.0, 1.0, 3.0, 2.0]), np.array([3.0, 3.25, 3.5]), 0.25)
    assert (
        small.threshold == pytest.approx(3.25)
        and small.false_reject == 0.25
        and small.false_accept == pytest.approx(2 / 3)
    )
    assert (
        small.thresholds_by_shots is None
        and small.false_accept_by_shots is None
        and small.false_reject_by_shots is None
    )
    with pytest.raises(ValueError, match="false-reject rate"):
        fit_open_set(np.ones(3), np.ones(3), 0.0)


def test_open_set_thresholds_by_shots_are_each_counts_known_quantile():
    # query i: known[i], unknown[i], shots[i]; 1 shot: known 4, 1, 3, 2; 2 shots: known 10, 20, 30, 40, 50
    shots = np.array([1, 2, 1, 2, 1, 2, 1, 2, 2])
    known = np.array([4.0, 10.0, 1.0, 20.0, 3.0, 30.0, 2.0, 40.0, 50.0])
    unknown = np.array([3.0, 5.0, 3.25, 40.0, 3.5, 41.0, 9.0, 100.0, 39.0])
    open_set = fit_open_set(known, unknown, 0.25, shots=shots)
    assert open_set.thresholds_by_shots == {
        1: pytest.approx(3.25),
        2: pytest.approx(40.0),
    }  # 1 + 0.75 * 3; 10 + 0.75 * 40
    assert open_set.false_reject_by_shots == {1: 0.25, 2: 0.2} and open_set.false_accept_by_shots == {1: 0.5, 2: 0.6}
    assert open_set.threshold == pytest.approx(30.0)  # pooled: sorted 1 2 3 4 10 20 30 40 50, position 0.75 * 8
    assert (open_set.false_reject, open_set.false_accept) == (pytest.approx(2 / 9), pytest.approx(5 / 9))
    assert open_set.threshold_for(1) == pytest.approx(3.25) and open_set.threshold_for(7) == pytest.approx(40.0)
    with pytest.raises(ValueError, match="one entry per query"):
        fit_open_set(known, unknown[:-1], 0.25, shots=shots)


def test_cli_export_json_text_and_overwrite(checkpoint, tmp_path):
    runner = CliRunner()
    args = ["export", str(checkpoint), "--out", str(tmp_path / "b"), "--calibration-episodes", "20"]
    result = runner.invoke(main, [*args, "--json"])
    assert result.exit_code == 0, result.output
    manifest = json.loads(result.output)
    assert manifest["bundle"] == str(tmp_path / "b") and len(manifest["model_id"]) == 64
    assert manifest["calibration"]["open_set"]["fitted_on"].startswith("20 pairs")
    result = runner.invoke(main, args)
    assert result.exit_code == 2 and "already exists" in result.output and len(result.output.strip().splitlines()) == 1
    result = runner.invoke(main, [*args, "--overwrite"])
    assert result.exit_code == 0, result.output
    assert "parity: max |onnx - torch|" in result.output and "open-set threshold" in result.output
    assert "thresholds by shots (used on the device): 1: " in result.output and ", 5: " in result.output
    assert f"model id: {manifest['model_id']}" in result.output  # the same weights give the same files


@pytest.mark.parametrize("content, message", [(None, "checkpoint not found"), ("nope", "not a readable checkpoint")])
def test_cli_bad_checkpoint_is_one_line_exit_2(tmp_path, content, message):
    path = tmp_path / "model.pt"
    if content is not None:
        path.write_text(content)
    result = CliRunner().invoke(main, ["export", str(path), "--out", str(tmp_path / "b")])
    assert result.exit_code == 2 and message in result.output
    assert len(result.output.strip().splitlines()) == 1
    assert not (tmp_path / "b").exists()
