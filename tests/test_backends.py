"""Backend selection (order, fallbacks, overrides, the log line), TensorRT engine cache keys and the
cache's rebuild rules (with a fake builder), and the ``info`` / ``build-engine`` commands. Building and
running a real engine needs tensorrt and skips without it."""

from __future__ import annotations

import importlib.util
import json
import logging

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image
from runtime_support import images, make_bundle, weight

from fewshot_edge.cli import main
from fewshot_edge.runtime import Engine, FewShotInputError, FewShotModel
from fewshot_edge.runtime.backends import provider_options, select
from fewshot_edge.runtime.tensorrt import EngineKey, Profile, cached_engine

ALL = ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]
HAS_TENSORRT = importlib.util.find_spec("tensorrt") is not None


@pytest.mark.parametrize(
    "providers, tensorrt, chosen, skipped",
    [
        (ALL, None, "tensorrt", []),
        (ALL, "tensorrt is not installed", "tensorrt-ep", ["tensorrt"]),
        (ALL[1:], "tensorrt is not installed", "cuda", ["tensorrt", "tensorrt-ep"]),
        (ALL[2:], "tensorrt is not installed", "cpu", ["tensorrt", "tensorrt-ep", "cuda"]),
        (["AzureExecutionProvider", "CPUExecutionProvider"], "no CUDA", "cpu", ["tensorrt", "tensorrt-ep", "cuda"]),
    ],
)
def test_auto_takes_the_first_backend_that_can_run(providers, tensorrt, chosen, skipped):
    selection = select(providers=providers, tensorrt_reason=tensorrt)
    assert selection.backend == chosen and list(selection.skipped) == skipped
    line = selection.describe()
    assert line.startswith(f"backend {chosen}") and "\n" not in line
    if "tensorrt-ep" in skipped:
        assert "TensorrtExecutionProvider is not in this onnxruntime build" in line


def test_backend_provider_lists_keep_only_available_fallbacks():
    assert select(providers=ALL, tensorrt_reason="x").providers == tuple(ALL)
    assert select(providers=["TensorrtExecutionProvider", "CPUExecutionProvider"], tensorrt_reason="x").providers == (
        "TensorrtExecutionProvider",
        "CPUExecutionProvider",
    )
    assert select(providers=ALL[1:], tensorrt_reason=None).providers == tuple(ALL[1:])  # the engine's other graphs
    assert select(providers=ALL[2:], tensorrt_reason=None).providers == ("CPUExecutionProvider",)


def test_an_explicit_backend_is_used_or_refused_never_replaced():
    assert select("cpu", providers=ALL, tensorrt_reason=None).backend == "cpu"
    with pytest.raises(FewShotInputError, match="backend cuda cannot run here: CUDAExecutionProvider is not in"):
        select("cuda", providers=ALL[2:], tensorrt_reason=None)
    with pytest.raises(FewShotInputError, match="backend tensorrt cannot run here: tensorrt is not installed"):
        select("tensorrt", providers=ALL, tensorrt_reason="tensorrt is not installed")
    with pytest.raises(FewShotInputError, match="backend must be one of auto, tensorrt"):
        select("gpu")


def test_tensorrt_provider_options_carry_the_cache_and_the_precision(tmp_path):
    fp16 = provider_options(ALL, "fp16", tmp_path)
    name, options = fp16[0]
    assert name == "TensorrtExecutionProvider" and fp16[1:] == ALL[1:]
    assert options["trt_engine_cache_enable"] and options["trt_engine_cache_path"] == str(tmp_path)
    assert (options["trt_fp16_enable"], options["trt_int8_enable"]) == (True, False)
    assert provider_options(ALL, "int8", tmp_path)[0][1]["trt_int8_enable"] is True
    assert provider_options(ALL, "fp32", tmp_path)[0][1]["trt_fp16_enable"] is False


def test_open_logs_one_line_naming_the_backend(tmp_path, caplog):
    make_bundle(tmp_path / "b", weight())
    with caplog.at_level(logging.INFO, logger="fewshot_edge.runtime"):
        with FewShotModel.open(tmp_path / "b") as model:
            model.enroll("a", images(0, 2))
            assert model.predict(images(1, 1))[0].label == "a"
    lines = [r.getMessage() for r in caplog.records if r.name == "fewshot_edge.runtime"]
    assert len(lines) == 1 and lines[0].startswith("fewshot-edge: backend ")
    if not HAS_TENSORRT:
        assert "skipped tensorrt: tensorrt is not installed" in lines[0]


def test_explicit_providers_bypass_selection_and_exclude_a_backend(tmp_path):
    make_bundle(tmp_path / "b", weight())
    with FewShotModel.open(tmp_path / "b", providers=["CPUExecutionProvider"]) as model:
        assert model.engine.providers == ["CPUExecutionProvider"] and isinstance(model.engine, Engine)
    with pytest.raises(FewShotInputError, match="give a backend or a provider list, not both"):
        FewShotModel.open(tmp_path / "b", providers=["CPUExecutionProvider"], backend="cpu")
    with pytest.raises(FewShotInputError, match="execution provider\\(s\\) not available: NopeExecutionProvider"):
        FewShotModel.open(tmp_path / "b", providers=["NopeExecutionProvider"])


KEY = EngineKey("m" * 64, "10.3.0", "Orin", "8.7", "fp16", Profile(1, 16, 64))


@pytest.mark.parametrize(
    "field, value",
    [
        ("model_id", "n" * 64),
        ("tensorrt_version", "10.4.0"),
        ("gpu_name", "Orin Nano"),
        ("compute_capability", "8.6"),
        ("precision", "int8"),
        ("profile", Profile(1, 32, 64)),
        ("profile", Profile(1, 16, 128)),
        ("profile", Profile(2, 16, 64)),
    ],
)
def test_engine_key_changes_with_each_field(field, value):
    other = EngineKey(**{**KEY.__dict__, field: value})
    assert other.digest() != KEY.digest() and other.file_name != KEY.file_name
    assert EngineKey(**KEY.__dict__).file_name == KEY.file_name  # deterministic
    assert KEY.file_name.startswith("encoder-fp16-") and KEY.file_name.endswith(".engine")


def test_profile_must_be_ordered():
    with pytest.raises(FewShotInputError, match="1 <= min <= opt <= max"):
        Profile(1, 64, 16)


def test_engine_cache_reuses_a_matching_engine_and_rebuilds_stale_foreign_or_corrupt_ones(tmp_path):
    builds = []

    def builder(source, precision, profile):
        builds.append((source.name, precision, profile))
        return f"engine {len(builds)}".encode()

    source = tmp_path / "encoder.onnx"
    path, built = cached_engine(source, KEY, tmp_path / "cache", builder)
    assert built and path.read_bytes() == b"engine 1" and builds == [("encoder.onnx", "fp16", KEY.profile)]
    assert cached_engine(source, KEY, tmp_path / "cache", builder) == (path, False) and len(builds) == 1
    sidecar = json.loads(path.with_suffix(".json").read_text())
    assert sidecar["key"]["gpu_name"] == "Orin" and len(sidecar["sha256"]) == 64

    path.write_bytes(b"tampered")  # corrupt: hash mismatch
    assert cached_engine(source, KEY, tmp_path / "cache", builder)[1] and path.read_bytes() == b"engine 2"

    stale = EngineKey(**{**KEY.__dict__, "tensorrt_version": "10.4.0"})  # a TensorRT upgrade: new file, rebuilt
    stale_path, built = cached_engine(source, stale, tmp_path / "cache", builder)
    assert built and stale_path != path and len(builds) == 3

    foreign = tmp_path / "cache" / KEY.file_name  # another device's engine copied in under this key's name
    foreign.write_bytes(stale_path.read_bytes())
    foreign.with_suffix(".json").write_text(stale_path.with_suffix(".json").read_text())
    assert cached_engine(source, KEY, tmp_path / "cache", builder)[1] and len(builds) == 4


def one_line_exit_2(result, message):
    assert result.exit_code == 2, result.output
    assert message in result.output and len(result.output.strip().splitlines()) == 1


def test_info_lists_backends_precisions_and_the_choice(tmp_path):
    make_bundle(tmp_path / "b", weight())
    result = CliRunner().invoke(main, ["info", str(tmp_path / "b"), "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert list(report["backends"]) == ["tensorrt", "tensorrt-ep", "cuda", "cpu"]
    assert report["backends"]["cpu"] == {"available": True, "reason": None}
    assert list(report["precisions"]) == ["fp32"] and report["engines"] == []
    assert report["auto"].startswith("backend ")
    text = CliRunner().invoke(main, ["info", str(tmp_path / "b")]).output
    assert "backend     cpu          yes" in text and "auto picks  backend" in text


@pytest.mark.skipif(HAS_TENSORRT, reason="checks the refusal on a machine without tensorrt")
def test_without_tensorrt_build_engine_and_backend_tensorrt_are_one_line_errors(tmp_path):
    make_bundle(tmp_path / "b", weight())
    runner = CliRunner()
    one_line_exit_2(
        runner.invoke(main, ["build-engine", str(tmp_path / "b"), "--fp16"]),
        "build-engine needs TensorRT on this machine: tensorrt is not installed",
    )
    args = ["bench", str(tmp_path / "b"), "--quick"]
    one_line_exit_2(
        runner.invoke(main, [*args, "--backend", "tensorrt"]),
        "backend tensorrt cannot run here: tensorrt is not installed",
    )
    one_line_exit_2(
        runner.invoke(main, [*args, "--backend", "cpu", "--provider", "CPUExecutionProvider"]),
        "give --backend or --provider, not both",
    )
    shot = tmp_path / "shot.png"
    Image.fromarray(np.full((4, 4), 90, np.uint8)).save(shot)
    one_line_exit_2(
        runner.invoke(
            main,
            [
                "enroll",
                "--bundle",
                str(tmp_path / "b"),
                "--store",
                str(tmp_path / "new.db"),
                "--label",
                "a",
                "--backend",
                "tensorrt",
                str(shot),
            ],
        ),
        "backend tensorrt cannot run here",
    )
    assert not (tmp_path / "new.db").exists()  # the encoder fails before the store is created


@pytest.mark.skipif(not HAS_TENSORRT, reason="tensorrt is not importable on this machine")
def test_tensorrt_engine_builds_caches_and_matches_onnxruntime(tmp_path):
    make_bundle(tmp_path / "b", weight())
    runner = CliRunner()
    first = runner.invoke(main, ["build-engine", str(tmp_path / "b"), "--max-batch", "8"])
    assert first.exit_code == 0 and "built in" in first.output, first.output
    assert "up to date" in runner.invoke(main, ["build-engine", str(tmp_path / "b"), "--max-batch", "8"]).output
    with (
        FewShotModel.open(tmp_path / "b", backend="tensorrt") as trt_model,
        FewShotModel.open(tmp_path / "b", backend="cpu") as cpu_model,
    ):
        x = np.stack(images(3, 20)).astype(np.float32)[:, None] / 255.0
        np.testing.assert_allclose(trt_model.engine.embed(x), cpu_model.engine.embed(x), atol=1e-3)
