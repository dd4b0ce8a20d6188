"""The bundle schema: write atomically, open with every check, refuse with one-line reasons."""

from __future__ import annotations

import hashlib
import json
from dataclasses import replace
from pathlib import Path

import pytest
from runtime_support import SPEC, linear_encoder, make_bundle, weight, write_manifest

from fewshot_edge.runtime import (
    Adaptation,
    Calibration,
    EmbeddingSpec,
    FewShotInputError,
    InputSpec,
    Manifest,
    OpenSet,
    open_bundle,
    write_bundle,
)


def refused(path: Path, *fragments: str) -> str:
    """Open must fail with a one-line FewShotInputError holding every fragment."""
    with pytest.raises(FewShotInputError) as info:
        open_bundle(path)
    message = str(info.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message
    return message


def edit_manifest(path: Path, edit) -> None:
    manifest = json.loads((path / "manifest.json").read_text())
    edit(manifest)
    write_manifest(path, manifest)  # the edit on purpose, its digest recomputed: the field checks must catch it


def test_write_then_open_round_trips_every_field(tmp_path):
    encoder = linear_encoder(weight())
    written = write_bundle(
        tmp_path / "b",
        {"encoder.onnx": encoder, "notes.txt": b"hello"},
        input_spec=InputSpec(1, 4, 4, mean=(0.5,), std=(0.25,), invert=True),
        embedding=EmbeddingSpec(3, "cosine", 10.0),
        adaptation=Adaptation("prototype", {"prototype": {}, "finetune": {"steps": 5, "lr": 0.1}}),
        calibration=Calibration(
            2.0, OpenSet(threshold=0.7, target_false_reject=0.05, false_accept=0.1, false_reject=0.05, fitted_on="val")
        ),
        provenance={"method": "protonet", "val_accuracy": [0.98, 0.002]},
        roles={"notes.txt": "readme"},
    )
    bundle = open_bundle(tmp_path / "b")
    assert bundle.manifest == written.manifest
    m = bundle.manifest
    assert m.input_spec == InputSpec(1, 4, 4, mean=(0.5,), std=(0.25,), invert=True)
    assert m.embedding == EmbeddingSpec(3, "cosine", 10.0)
    assert m.adaptation.modes["finetune"] == {"steps": 5, "lr": 0.1}
    assert m.calibration.temperature == 2.0 and m.calibration.open_set.threshold == 0.7
    assert m.provenance["method"] == "protonet"
    assert {n: e.role for n, e in m.files.items()} == {"encoder.onnx": "encoder", "notes.txt": "readme"}
    assert bundle.file("encoder") == tmp_path / "b" / "encoder.onnx"

    hashes = {"encoder.onnx": hashlib.sha256(encoder).hexdigest(), "notes.txt": hashlib.sha256(b"hello").hexdigest()}
    assert {n: e.sha256 for n, e in m.files.items()} == hashes
    lines = "".join(f"{name}:{hashes[name]}\n" for name in sorted(hashes))
    assert bundle.model_id == hashlib.sha256(lines.encode()).hexdigest()

    raw = json.loads((tmp_path / "b" / "manifest.json").read_text())
    assert raw["format"] == "fewshot-edge-bundle" and raw["format_version"] == 1
    assert set(raw) == {
        "format",
        "format_version",
        "model_id",
        "files",
        "input",
        "embedding",
        "adaptation",
        "calibration",
        "provenance",
        "manifest_sha256",
    }


def test_thresholds_by_shots_round_trip_with_string_keys(tmp_path):
    open_set = OpenSet(
        threshold=0.7,
        thresholds_by_shots={3: 0.6, 1: 0.9, 2: 0.8},
        false_accept_by_shots={1: 0.2, 2: 0.1, 3: 0.05},
        false_reject_by_shots={1: 0.05, 2: 0.05, 3: 0.04},
    )
    written = write_bundle(
        tmp_path / "b",
        {"encoder.onnx": linear_encoder(weight())},
        input_spec=SPEC,
        embedding=EmbeddingSpec(3),
        calibration=Calibration(1.5, open_set),
    )
    raw = json.loads((tmp_path / "b" / "manifest.json").read_text())
    assert raw.pop("manifest_sha256") and raw == written.manifest.to_dict()
    assert raw["calibration"]["open_set"]["thresholds_by_shots"] == {"1": 0.9, "2": 0.8, "3": 0.6}
    assert list(raw["calibration"]["open_set"]["thresholds_by_shots"]) == ["1", "2", "3"]
    assert Manifest.from_dict(raw) == written.manifest == open_bundle(tmp_path / "b").manifest
    opened = open_bundle(tmp_path / "b").manifest.calibration.open_set
    assert opened.thresholds_by_shots == {1: 0.9, 2: 0.8, 3: 0.6} and opened.false_accept_by_shots[2] == 0.1
    assert [opened.threshold_for(k) for k in (1, 2, 3, 4, 9)] == [0.9, 0.8, 0.6, 0.6, 0.6]


def test_threshold_for_a_shot_count_without_its_own_is_the_pooled_one():
    gappy = OpenSet(threshold=0.7, thresholds_by_shots={"1": 0.9, "3": 0.6})
    assert [gappy.threshold_for(k) for k in (1, 2, 3, 5)] == [0.9, 0.7, 0.6, 0.6]
    assert [OpenSet(threshold=0.7).threshold_for(k) for k in (1, 9)] == [0.7, 0.7]
    assert OpenSet().threshold_for(1) is None
    with pytest.raises(FewShotInputError, match="shot counts >= 1"):
        OpenSet(thresholds_by_shots={0: 1.0})


def test_an_old_manifest_with_a_single_threshold_opens(tmp_path):
    make_bundle(tmp_path / "b", weight(), threshold=0.5)
    old = {
        "threshold": 0.5,
        "statistic": "nearest_distance",
        "target_false_reject": 0.05,
        "false_accept": 0.1,
        "false_reject": 0.05,
        "fitted_on": "val",
    }
    edit_manifest(tmp_path / "b", lambda m: m["calibration"].update(open_set=old))
    open_set = open_bundle(tmp_path / "b").manifest.calibration.open_set
    assert open_set == OpenSet(**old) and open_set.thresholds_by_shots is None
    assert [open_set.threshold_for(k) for k in (1, 5, 9)] == [0.5, 0.5, 0.5]


def test_source_files_are_copied_and_leave_no_temporary_folders(tmp_path):
    source = tmp_path / "exported.onnx"
    source.write_bytes(linear_encoder(weight()))
    write_bundle(tmp_path / "out" / "b", {"encoder.onnx": source}, input_spec=SPEC, embedding=EmbeddingSpec(3))
    assert (tmp_path / "out" / "b" / "encoder.onnx").read_bytes() == source.read_bytes()
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["b"]


def test_existing_folder_needs_overwrite_and_is_replaced_whole(tmp_path):
    first = make_bundle(tmp_path / "b", weight(0))
    with pytest.raises(FewShotInputError, match="already exists"):
        make_bundle(tmp_path / "b", weight(1))
    second = write_bundle(
        tmp_path / "b",
        {"encoder.onnx": linear_encoder(weight(1))},
        input_spec=SPEC,
        embedding=EmbeddingSpec(3),
        overwrite=True,
    )
    assert second.model_id != first.model_id
    assert open_bundle(tmp_path / "b").model_id == second.model_id
    assert [p.name for p in tmp_path.iterdir()] == ["b"]


def test_failed_write_leaves_no_bundle(tmp_path):
    with pytest.raises(FileNotFoundError):
        write_bundle(
            tmp_path / "b",
            {"encoder.onnx": linear_encoder(weight()), "context.onnx": tmp_path / "missing.onnx"},
            input_spec=SPEC,
            embedding=EmbeddingSpec(3),
        )
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "files, reason",
    [
        ({"weights.onnx": b"x"}, "role 'encoder'"),
        ({"encoder.onnx": b"x", "manifest.json": b"{}"}, "plain file name"),
        ({"../encoder.onnx": b"x"}, "plain file name"),
    ],
)
def test_write_refuses_bad_file_sets(tmp_path, files, reason):
    with pytest.raises(FewShotInputError, match=reason):
        write_bundle(tmp_path / "b", files, input_spec=SPEC, embedding=EmbeddingSpec(3))


def test_tampered_file_is_refused(tmp_path):
    make_bundle(tmp_path / "b", weight())
    encoder = tmp_path / "b" / "encoder.onnx"
    encoder.write_bytes(encoder.read_bytes()[:-1] + b"\x00")
    refused(tmp_path / "b", "encoder.onnx", "sha256")


def test_tampered_model_id_is_refused(tmp_path):
    make_bundle(tmp_path / "b", weight())
    edit_manifest(tmp_path / "b", lambda m: m.update(model_id="0" * 64))
    refused(tmp_path / "b", "model_id")


@pytest.mark.parametrize("version", [3, 0, "2", True])
def test_unknown_format_version_is_refused_naming_it(tmp_path, version):
    make_bundle(tmp_path / "b", weight())
    edit_manifest(tmp_path / "b", lambda m: m.update(format_version=version))
    refused(tmp_path / "b", f"format_version {version!r}", "reads 1 to 2")


def test_a_cropping_input_spec_needs_format_2_and_a_squashing_one_stays_1(tmp_path):
    for name, spec, version in (
        ("squash", SPEC, 1),
        ("center", replace(SPEC, crop_mode="center"), 2),
        ("pct", replace(SPEC, crop_pct=0.875), 2),
    ):
        make_bundle(tmp_path / name, weight(), spec=spec)
        assert json.loads((tmp_path / name / "manifest.json").read_text())["format_version"] == version
        assert open_bundle(tmp_path / name).manifest.input_spec == spec


def test_other_format_is_refused(tmp_path):
    make_bundle(tmp_path / "b", weight())
    edit_manifest(tmp_path / "b", lambda m: m.update(format="something-else"))
    refused(tmp_path / "b", "something-else")


def test_missing_file_is_refused(tmp_path):
    make_bundle(tmp_path / "b", weight())
    (tmp_path / "b" / "encoder.onnx").unlink()
    refused(tmp_path / "b", "encoder.onnx", "missing")


def test_missing_or_invalid_manifest_is_refused(tmp_path):
    refused(tmp_path, "manifest.json not found")
    (tmp_path / "manifest.json").write_text("{not json")
    refused(tmp_path, "not valid JSON")
    (tmp_path / "manifest.json").write_text("[1, 2]")
    refused(tmp_path, "JSON object")


@pytest.mark.parametrize(
    "path, key",
    [
        (("embedding",), "embedding.size"),
        (("embedding", "size"), "embedding.size"),
        (("input", "height"), "input.height"),
        (("files", "encoder.onnx", "sha256"), "files.encoder.onnx.sha256"),
        (("adaptation", "modes"), "adaptation.modes"),
        (("model_id",), "model_id"),
    ],
)
def test_missing_keys_are_named(tmp_path, path, key):
    make_bundle(tmp_path / "b", weight())

    def drop(manifest):
        for part in path[:-1]:
            manifest = manifest[part]
        del manifest[path[-1]]

    edit_manifest(tmp_path / "b", drop)
    refused(tmp_path / "b", f"misses key '{key}'")


@pytest.mark.parametrize(
    "edit, fragment",
    [
        (lambda m: m["embedding"].update(metric="manhattan"), "metric"),
        (lambda m: m["calibration"].update(temperature=0), "temperature"),
        (lambda m: m["calibration"]["open_set"].update(statistic="mahalanobis"), "mahalanobis"),
        (lambda m: m["adaptation"].update(default="film"), "film"),
        (lambda m: m.update(input="RGB"), "input"),
        (
            lambda m: m["input"].update(layout="NHWC"),
            "input layout must be NCHW (the only one the runtime feeds), got 'NHWC'",
        ),
        (lambda m: m["embedding"].update(size="big"), "invalid field"),
        (lambda m: m["calibration"]["open_set"].update(thresholds_by_shots={"one": 1.0}), "invalid field"),
        (lambda m: m["calibration"]["open_set"].update(thresholds_by_shots={"0": 1.0}), "shot counts >= 1"),
        (lambda m: m["calibration"].update(temperatures_by_shots={"1": 0.0}), "positive and finite, got 0.0"),
        (lambda m: m["calibration"].update(temperatures_by_shots={"0": 1.0}), "temperatures_by_shots keys"),
        (lambda m: m["calibration"].update(temperatures_by_shots=[1.0]), "invalid field"),
    ],
)
def test_invalid_fields_are_refused(tmp_path, edit, fragment):
    make_bundle(tmp_path / "b", weight())
    edit_manifest(tmp_path / "b", edit)
    refused(tmp_path / "b", fragment)


def test_temperatures_by_shots_round_trip_and_fall_back_to_the_pooled_one(tmp_path):
    calibration = Calibration(0.9, temperatures_by_shots={"3": 0.7, "1": 1.2})  # JSON's string keys, unsorted
    assert calibration.temperatures_by_shots == {1: 1.2, 3: 0.7}
    # its own count; a count between fitted ones without its own: pooled; beyond the largest: the largest's
    assert [calibration.temperature_for(k) for k in (1, 2, 3, 9)] == [1.2, 0.9, 0.7, 0.7]
    assert Calibration(0.9).temperature_for(1) == 0.9  # older bundles: one temperature for every count
    for bad in (float("inf"), float("nan"), -1.0):
        with pytest.raises(FewShotInputError, match="positive and finite"):
            Calibration(0.9, temperatures_by_shots={1: bad})
    make_bundle(tmp_path / "b", weight(), temperature=0.9, temperatures_by_shots={1: 1.2, 3: 0.7})
    raw = json.loads((tmp_path / "b" / "manifest.json").read_text())["calibration"]
    assert raw["temperatures_by_shots"] == {"1": 1.2, "3": 0.7}
    assert open_bundle(tmp_path / "b").manifest.calibration.temperatures_by_shots == {1: 1.2, 3: 0.7}
    make_bundle(tmp_path / "old", weight(), temperature=0.9)
    assert "temperatures_by_shots" not in json.loads((tmp_path / "old" / "manifest.json").read_text())["calibration"]
