"""Precision variants: fp16 and int8 encoders within their parity tolerances, bundles that carry them
(manifest, roles, precision choice, stores bound to a precision), export measuring and refusing them,
and ``bench --all-variants`` / ``--adapt``."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from conftest import require_data
from onnx import numpy_helper
from runtime_support import SPEC, images, linear_encoder, weight

import fewshot_edge.export.variants as variants_module
from fewshot_edge.cli import main
from fewshot_edge.config import TrainConfig
from fewshot_edge.export import VariantRefused, export_bundle
from fewshot_edge.export.variants import PARITY_TOLERANCE, to_fp16, to_int8
from fewshot_edge.runtime import EmbeddingSpec, Engine, FewShotInputError, FewShotModel, open_bundle, write_bundle
from fewshot_edge.train import train


def tiny_variants(tmp_path):
    """A 16 -> 8 linear encoder and its fp16 and int8 variants (int8 calibrated on random images)."""
    w = weight(dim=8)
    source = tmp_path / "encoder.onnx"
    source.write_bytes(linear_encoder(w))
    rng = np.random.default_rng(0)
    feeds = [{"images": rng.random((16, 1, 4, 4), dtype=np.float32)} for _ in range(4)]
    to_fp16(source, tmp_path / "encoder.fp16.onnx")
    details = to_int8(source, tmp_path / "encoder.int8.onnx", feeds)
    return w, details


def test_fp16_and_int8_encoders_match_fp32_within_tolerance(tmp_path):
    _, details = tiny_variants(tmp_path)
    assert details["format"] == "QDQ" and details["calibration_images"] == 64 and details["per_channel"] is True
    x = np.random.default_rng(1).random((32, 1, 4, 4), dtype=np.float32)
    reference = Engine(tmp_path / "encoder.onnx").embed(x)
    for precision in ("fp16", "int8"):
        out = Engine(tmp_path / f"encoder.{precision}.onnx").embed(x)
        assert out.dtype == np.float32 and out.shape == reference.shape  # float32 in and out
        relative = np.linalg.norm(out - reference, axis=1) / np.linalg.norm(reference, axis=1)
        assert 0 < relative.max() <= PARITY_TOLERANCE[precision]
    fp16 = onnx.load(str(tmp_path / "encoder.fp16.onnx"))
    assert {t.data_type for t in fp16.graph.initializer} == {onnx.TensorProto.FLOAT16}
    int8 = onnx.load(str(tmp_path / "encoder.int8.onnx"))
    assert {"QuantizeLinear", "DequantizeLinear"} <= {n.op_type for n in int8.graph.node}


def variant_bundle(tmp_path):
    tiny_variants(tmp_path)
    files = {name: tmp_path / name for name in ("encoder.onnx", "encoder.int8.onnx")}
    variants = {
        "fp32": {"role": "encoder", "accuracy": 0.9},
        "int8": {"role": "encoder.int8", "accuracy": 0.89, "delta": -0.01},
    }
    return write_bundle(tmp_path / "bundle", files, input_spec=SPEC, embedding=EmbeddingSpec(8), variants=variants)


def test_a_bundle_opens_each_precision_it_has_and_names_what_it_lacks(tmp_path):
    bundle = open_bundle(variant_bundle(tmp_path).path)
    assert bundle.precisions == ["fp32", "int8"] and bundle.manifest.variants["int8"]["delta"] == -0.01
    assert bundle.encoder_file("int8").name == "encoder.int8.onnx"
    labels = {}
    for precision in ("fp32", "int8"):
        with FewShotModel.open(bundle.path, precision=precision) as model:
            assert model.engine.path.name == ("encoder.onnx" if precision == "fp32" else "encoder.int8.onnx")
            model.enroll("dark", images(0, 3, center=60))
            model.enroll("light", images(1, 3, center=200))
            labels[precision] = [p.label for p in model.predict(images(2, 4, center=60) + images(3, 4, center=200))]
    assert labels["fp32"] == labels["int8"] == ["dark"] * 4 + ["light"] * 4
    with pytest.raises(FewShotInputError, match=r"has no fp16 encoder \(it has: fp32, int8\); export it with --fp16"):
        FewShotModel.open(bundle.path, store=tmp_path / "never.db", precision="fp16")
    assert not (tmp_path / "never.db").exists()
    with pytest.raises(FewShotInputError, match="precision must be one of fp32, fp16, int8"):
        FewShotModel.open(bundle.path, precision="int4")


def test_a_store_is_bound_to_its_precision(tmp_path):
    bundle = variant_bundle(tmp_path)
    store = tmp_path / "s.db"
    with FewShotModel.open(bundle.path, store=store) as model:
        model.enroll("dark", images(0, 3, center=60))
    with pytest.raises(FewShotInputError, match="bound to model"):
        FewShotModel.open(bundle.path, store=store, precision="int8")
    with FewShotModel.open(bundle.path, store=store, precision="int8", reembed=True) as model:
        assert model.classes() == [("dark", 3)]


def test_manifest_without_variants_stays_as_before(tmp_path):
    from runtime_support import make_bundle

    bundle = make_bundle(tmp_path / "b", weight())
    assert "variants" not in bundle.manifest.to_dict() and open_bundle(bundle.path).precisions == ["fp32"]


@pytest.fixture(scope="module")
def bundle(checkpoint, tmp_path_factory):
    return export_bundle(
        checkpoint,
        tmp_path_factory.mktemp("export") / "bundle",
        calibration_episodes=20,
        precisions=("fp16", "int8"),
        variant_episodes=100,
    )


def test_export_measures_and_records_each_variant(bundle):
    manifest = bundle.manifest
    assert {n: e.role for n, e in manifest.files.items()} == {
        "encoder.onnx": "encoder",
        "encoder.fp16.onnx": "encoder.fp16",
        "encoder.int8.onnx": "encoder.int8",
    }
    v = manifest.variants
    assert list(v) == ["fp32", "fp16", "int8"] and v["fp32"]["episodes"].startswith(
        "100 5-way 1-shot validation episodes"
    )
    for precision in ("fp16", "int8"):
        entry = v[precision]
        assert entry["role"] == f"encoder.{precision}" and entry["episodes"] == v["fp32"]["episodes"]
        assert entry["delta"] == pytest.approx(entry["accuracy"] - v["fp32"]["accuracy"]) and entry["delta"] >= -0.01
        assert 0 < entry["parity"]["max_rel_diff"] <= entry["parity"]["tolerance"] == PARITY_TOLERANCE[precision]
    assert abs(v["fp16"]["delta"]) <= 0.002 and v["int8"]["method"]["calibration_images"] == 512
    stem = ["/backbone/blocks.0/conv/Conv", "/backbone/blocks.0/Relu", "/backbone/blocks.0/pool/MaxPool"]
    assert v["int8"]["method"]["float_nodes"] == stem and v["int8"]["disabled_optimizers"] == [
        "QDQPropagationTransformer"
    ]
    int8 = onnx.load(str(bundle.file("encoder.int8")))
    first = next(n for n in int8.graph.node if n.name == stem[0])
    assert first.op_type == "Conv" and first.input[0] == "images"  # the stem reads the float image, unquantized
    assert sum(n.op_type == "Conv" for n in int8.graph.node) == 4 and "disabled_optimizers" not in v["fp16"]
    with FewShotModel.open(bundle.path, precision="int8") as model:
        assert model.engine.path.name == "encoder.int8.onnx"


def test_a_variant_losing_accuracy_is_refused_unless_forced(checkpoint, tmp_path, monkeypatch):
    def broken_fp16(source, dest):  # the last convolution's kernel zeroed: every image embeds alike, chance accuracy
        model = onnx.load(str(source))
        last = [t for t in model.graph.initializer if len(t.dims) == 4][-1]
        last.CopyFrom(numpy_helper.from_array(np.zeros_like(numpy_helper.to_array(last)), last.name))
        onnx.save(model, str(dest))
        return {"converter": "test"}

    monkeypatch.setattr(variants_module, "to_fp16", broken_fp16)
    with pytest.raises(VariantRefused, match="fp16 encoder loses .* points of 5-way 1-shot accuracy"):
        export_bundle(checkpoint, tmp_path / "b", calibration_episodes=20, precisions=("fp16",), variant_episodes=50)
    args = [
        "export",
        str(checkpoint),
        "--out",
        str(tmp_path / "b"),
        "--calibration-episodes",
        "20",
        "--fp16",
        "--variant-episodes",
        "50",
    ]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 2 and "no bundle written (force it with --force-variant)" in result.output
    assert len(result.output.strip().splitlines()) == 1 and list(tmp_path.iterdir()) == []
    result = CliRunner().invoke(main, [*args, "--force-variant"])
    assert result.exit_code == 0, result.output
    assert (
        "variant fp16: accuracy" in result.output
        and open_bundle(tmp_path / "b").manifest.variants["fp16"]["delta"] < -0.01
    )


def test_bench_all_variants_and_adapt(bundle):
    runner = CliRunner()
    result = runner.invoke(
        main,
        ["bench", str(bundle.path), "--all-variants", "--adapt", "prototype", "--quick", "--json", "--threads", "1"],
    )
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    rows = report["precisions"]["precisions"]
    assert list(rows) == ["fp32", "fp16", "int8"] and rows["fp32"]["throughput_vs_fp32"] == 1.0
    assert all(r["encoder_images_per_s"] > 0 and r["predict"]["p50_ms"] > 0 for r in rows.values())
    assert rows["int8"]["accuracy"] == bundle.manifest.variants["int8"]["accuracy"]
    assert (
        list(report["adaptation"]["modes"]) == ["prototype"]
        and report["adaptation"]["enrolled"] == "20 classes x 5 shots"
    )
    text = runner.invoke(main, ["bench", str(bundle.path), "--all-variants", "--quick", "--threads", "1"]).output
    assert "accuracy: measured at export on 100 5-way 1-shot validation episodes" in text and "\nint8 " in text
    bad = runner.invoke(main, ["bench", str(bundle.path), "--adapt", "nope", "--quick"])
    assert bad.exit_code == 2 and "does not support adaptation mode 'nope'" in bad.output
    assert len(bad.output.strip().splitlines()) == 1


def test_film_bundle_variants_predict_in_film_mode(tmp_path):
    source = require_data("omniglot/images_background_small1.zip")[0]
    config = TrainConfig(
        sources=[str(source)],
        data_options={"rotations": True},
        holdout=1,
        method="film",
        method_options={"task_dim": 16},
        n_way=5,
        k_shot=1,
        q_query=2,
        episodes=2,
        val_every=2,
        val_episodes=3,
        seed=0,
        device="cpu",
        out=str(tmp_path / "run"),
    )
    train(config, progress_bar=False)
    bundle = export_bundle(
        tmp_path / "run" / "last.pt",
        tmp_path / "bundle",
        calibration_episodes=10,
        precisions=("fp16", "int8"),
        variant_episodes=30,
    )
    assert set(bundle.manifest.variants) == {"fp32", "fp16", "int8"} and bundle.file("context").is_file()
    shots = {c: [np.full((28, 28), 255, np.uint8) for _ in range(2)] for c in ("a", "b")}
    shots["a"][0][4:24, 12:16] = 0  # a vertical bar
    shots["a"][1][5:25, 13:17] = 0
    shots["b"][0][12:16, 4:24] = 0  # a horizontal bar
    shots["b"][1][13:17, 5:25] = 0
    query = shots["a"][0].copy()
    query[4:24, 11:15] = 0
    labels = {}
    for precision in ("fp32", "fp16", "int8"):
        with FewShotModel.open(bundle.path, precision=precision, adapt="film") as model:
            for label, images in shots.items():
                model.enroll(label, images)
            labels[precision] = model.predict([query])[0].top_k[0][0]
            assert model.adapter.name == "film"
            assert model.engine.path.name == ("encoder.onnx" if precision == "fp32" else f"encoder.{precision}.onnx")
    assert labels == {"fp32": "a", "fp16": "a", "int8": "a"}
