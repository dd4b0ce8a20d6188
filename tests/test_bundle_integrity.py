"""The manifest is part of what a bundle's integrity covers, and a malformed manifest is a one-line error.

Editing any byte of ``manifest.json`` or of a bundle file makes ``open_bundle`` fail with a one-line
FewShotInputError; re-indenting the manifest does not (its digest is over the canonical JSON). Old
manifests (no ``manifest_sha256``, format 1/2) and the shipped bundle still open as before. Malformed
manifests, hand-made and fuzzed (hypothesis, bounded), never raise anything but FewShotInputError.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from runtime_support import SPEC, images, linear_encoder, make_bundle, weight, write_manifest

from fewshot_edge.runtime import (
    Adaptation,
    Calibration,
    EmbeddingSpec,
    FewShotInputError,
    FewShotModel,
    OpenSet,
    open_bundle,
    write_bundle,
)
from fewshot_edge.runtime.bundle import seal_bundle
from fewshot_edge.runtime.pretrained import default_bundle

SHIPPED_MODEL_ID = "5e1025067e3a4304b2a1af57fca62d933e3e7f2d19525652380a32eb8977bbe7"


def refused(path: Path, *fragments: str) -> str:
    with pytest.raises(FewShotInputError) as info:
        open_bundle(path)
    message = str(info.value)
    assert "\n" not in message, message
    for fragment in fragments:
        assert fragment in message, message
    return message


def full_bundle(path: Path):
    """A bundle with every top-level field filled, a second file and a finetune mode."""
    return write_bundle(
        path,
        {"encoder.onnx": linear_encoder(weight(1)), "notes.txt": b"notes"},
        input_spec=SPEC,
        embedding=EmbeddingSpec(3, "sqeuclidean", 2.0),
        adaptation=Adaptation("prototype", {"prototype": {}, "finetune": {"steps": 5, "lr": 0.1}}),
        calibration=Calibration(
            1.5, OpenSet(threshold=0.7, thresholds_by_shots={1: 0.9, 2: 0.8}, fitted_on="t"), {1: 1.7, 2: 1.4}
        ),
        provenance={"method": "protonet", "validation": {"accuracy": 0.98, "ci95": 0.01}},
        variants={"fp32": {"accuracy": 0.98, "episodes": "5-way"}},
        roles={"notes.txt": "readme"},
    )


def top_level_field_at(text: str) -> list[str | None]:
    """For each character of an indent=2 manifest: the top-level field whose line it is on (None for the braces)."""
    owners: list[str | None] = []
    field = None
    for line in text.splitlines(keepends=True):
        if line.startswith('  "'):
            field = line.split('"')[1]
        owners += [None if line.strip() in ("{", "}") else field] * len(line)
    return owners


def test_a_written_manifest_carries_its_digest_and_opens(tmp_path):
    full_bundle(tmp_path / "b")
    raw = json.loads((tmp_path / "b" / "manifest.json").read_text())
    assert len(raw["manifest_sha256"]) == 64 and "signature" not in raw
    assert open_bundle(tmp_path / "b").manifest.calibration.temperature == 1.5


EDITS = {
    "input.invert": lambda m: m["input"].update(invert=True),
    "input.mean": lambda m: m["input"].update(mean=[0.5]),
    "input.std": lambda m: m["input"].update(std=[0.25]),
    "calibration.temperature": lambda m: m["calibration"].update(temperature=9.0),
    "calibration.threshold": lambda m: m["calibration"]["open_set"].update(threshold=100.0),
    "calibration.thresholds_by_shots": lambda m: m["calibration"]["open_set"]["thresholds_by_shots"].update({"1": 5}),
    "calibration.temperatures_by_shots": lambda m: m["calibration"]["temperatures_by_shots"].update({"1": 9.0}),
    "embedding.metric": lambda m: m["embedding"].update(metric="cosine"),
    "embedding.scale": lambda m: m["embedding"].update(scale=3.0),
    "adaptation": lambda m: m["adaptation"]["modes"]["finetune"].update(steps=50),
    "adaptation.default": lambda m: m["adaptation"].update(default="finetune"),
    "provenance": lambda m: m["provenance"].update(method="maml"),
    "variants": lambda m: m["variants"]["fp32"].update(accuracy=0.99),
    "files.role": lambda m: m["files"]["notes.txt"].update(role="encoder.fp16"),
    "format_version": lambda m: m.update(format_version=2),
    "a new field": lambda m: m.update(provenance={**m["provenance"], "x": 1}),
}


@pytest.mark.parametrize("edit", EDITS)
def test_editing_a_value_of_the_manifest_is_refused(tmp_path, edit):
    """Failed before the fix: every one of these edits opened (only the files' hashes were checked)."""
    full_bundle(tmp_path / "b")
    manifest = json.loads((tmp_path / "b" / "manifest.json").read_text())
    EDITS[edit](manifest)
    (tmp_path / "b" / "manifest.json").write_text(json.dumps(manifest, indent=2))
    refused(tmp_path / "b", "manifest.json does not match its manifest_sha256")


def test_flipping_any_byte_of_the_manifest_is_refused(tmp_path):
    """Every byte of manifest.json, each top-level field's included, XOR 1: refused with one line.
    Failed before the fix (e.g. a flipped digit of the temperature or the threshold opened)."""
    full_bundle(tmp_path / "b")
    path = tmp_path / "b" / "manifest.json"
    original = path.read_bytes()
    owners = top_level_field_at(original.decode("ascii"))
    flipped_fields = set()
    for i in range(len(original)):
        data = bytearray(original)
        data[i] ^= 1
        path.write_bytes(bytes(data))
        refused(tmp_path / "b")
        flipped_fields.add(owners[i])
    path.write_bytes(original)
    assert open_bundle(tmp_path / "b")
    assert flipped_fields >= set(json.loads(original)) | {None}


@pytest.mark.parametrize("name", ["encoder.onnx", "notes.txt"])
def test_flipping_any_byte_of_a_bundle_file_is_refused(tmp_path, name):
    full_bundle(tmp_path / "b")
    path = tmp_path / "b" / name
    original = path.read_bytes()
    positions = range(len(original)) if len(original) < 4096 else np.linspace(0, len(original) - 1, 512).astype(int)
    for i in positions:
        data = bytearray(original)
        data[i] ^= 0x80
        path.write_bytes(bytes(data))
        refused(tmp_path / "b", f"{name} does not match its sha256")
    path.write_bytes(original)
    open_bundle(tmp_path / "b")


def test_reindenting_or_reordering_the_manifest_keeps_it_opening(tmp_path):
    """The digest is over the canonical JSON (sorted keys, no whitespace, numbers as written)."""
    written = full_bundle(tmp_path / "b")
    path = tmp_path / "b" / "manifest.json"
    manifest = json.loads(path.read_text())
    path.write_text(json.dumps(dict(reversed(list(manifest.items()))), indent=None, separators=(", ", ": ")))
    assert open_bundle(tmp_path / "b").manifest == written.manifest


def test_a_number_written_differently_is_an_edit(tmp_path):
    """1.5 and 1.50 are the same float, but not the same bytes: canonical JSON keeps numbers as written."""
    full_bundle(tmp_path / "b")
    path = tmp_path / "b" / "manifest.json"
    path.write_text(path.read_text().replace('"temperature": 1.5', '"temperature": 1.50'))
    refused(tmp_path / "b", "manifest_sha256")


def test_an_old_manifest_without_a_digest_still_opens(tmp_path):
    """Format 1/2 manifests written before the digest open as before (the digest is tamper-evidence, not a lock)."""
    written = full_bundle(tmp_path / "b")
    path = tmp_path / "b" / "manifest.json"
    manifest = json.loads(path.read_text())
    del manifest["manifest_sha256"]
    path.write_text(json.dumps(manifest, indent=2))
    assert open_bundle(tmp_path / "b").manifest == written.manifest


def test_the_shipped_bundle_opens_with_its_model_id_and_answers(tmp_path):
    bundle = open_bundle(default_bundle())
    assert bundle.model_id == SHIPPED_MODEL_ID
    assert "manifest_sha256" in json.loads((default_bundle() / "manifest.json").read_text())
    copy = tmp_path / "shipped"
    shutil.copytree(default_bundle(), copy)
    (copy / "manifest.json").write_text(
        (copy / "manifest.json").read_text().replace('"invert": true', '"invert": false')
    )
    refused(copy, "manifest_sha256")


def test_the_shipped_manifest_is_its_0_1_0_manifest_sealed_by_the_runtime(tmp_path):
    """It was rewritten with ``seal_bundle``: every field as written in 0.1.0, plus its digest."""
    copy = tmp_path / "shipped"
    shutil.copytree(default_bundle(), copy)
    shipped = (copy / "manifest.json").read_text()
    old = json.loads(shipped)
    del old["manifest_sha256"]
    (copy / "manifest.json").write_text(json.dumps(old, indent=2) + "\n")
    assert seal_bundle(copy).model_id == SHIPPED_MODEL_ID
    assert (copy / "manifest.json").read_text() == shipped


# --- malformed manifests: one line, never another exception (issue 12, item 4) ---

MALFORMED = {
    "deep nesting": "[" * 100_000 + "]" * 100_000,
    "deep nesting in provenance": {"provenance": {"x": json.loads("[" * 40 + "]" * 40)}},
    "a mode that is null": {"adaptation": {"default": "prototype", "modes": {"prototype": None}}},
    "a mode that is a list": {"adaptation": {"default": "prototype", "modes": {"prototype": [1]}}},
    "modes as a list": {"adaptation": {"default": "prototype", "modes": ["prototype"]}},
    "files as a list": {"files": ["encoder.onnx"]},
    "files as a string": {"files": "encoder.onnx"},
    "a file entry that is null": {"files": {"encoder.onnx": None}},
    "a sha256 that is a number": {"files": {"encoder.onnx": {"sha256": 5, "role": "encoder"}}},
    "model_id a list": {"model_id": [1]},
    "height past float range": "height-1e400",
    "height a string": {"input": {"channels": 1, "height": "x", "width": 4}},
    "input null": {"input": None},
    "mean a string": {"input": {"channels": 1, "height": 4, "width": 4, "mean": "abc"}},
    "open_set a list": {"calibration": {"temperature": 1.0, "open_set": [1, 2]}},
    "thresholds_by_shots keys not counts": {"calibration": {"open_set": {"thresholds_by_shots": {"x": 1}}}},
    "temperature null": {"calibration": {"temperature": None}},
    "provenance a list": {"provenance": [1]},
    "variants of strings": {"variants": {"fp16": "fast"}},
    "NaN": "nan",
    "duplicate key": "duplicate",
    "unknown top-level field": {"extra": 1},
    "not UTF-8": b"\xff\xfe{}",
    "empty": b"",
    "a list": b"[]",
    "a string": b'"manifest"',
}


def malformed_bytes(case, good: dict) -> bytes:
    if isinstance(case, bytes):
        return case
    if case == "height-1e400":
        return (
            json.dumps({**good, "input": {**good["input"], "height": 7}})
            .replace('"height": 7', '"height": 1e400')
            .encode()
        )
    if case == "nan":
        return json.dumps({**good, "calibration": {**good["calibration"], "temperature": float("nan")}}).encode()
    if case == "duplicate":
        return json.dumps(good).replace('"model_id"', '"model_id": "x", "model_id"', 1).encode()
    if isinstance(case, str):
        return case.encode()
    return json.dumps({**good, **case}).encode()


@pytest.fixture(scope="module")
def good_bundle(tmp_path_factory) -> Path:
    return make_bundle(tmp_path_factory.mktemp("good") / "b", weight(0)).path


def good_manifest(good_bundle: Path) -> dict:
    manifest = json.loads((good_bundle / "manifest.json").read_text())
    manifest.pop(
        "manifest_sha256", None
    )  # as an old manifest, or one whose digest was recomputed: the fields are checked
    return manifest


@pytest.mark.parametrize("case", MALFORMED)
def test_a_malformed_manifest_is_one_line(tmp_path, good_bundle, case):
    """Failed before the fix: deep nesting (RecursionError), 1e400 (OverflowError); a null or list mode,
    a file entry that is null, a number as sha256 and an unknown field opened (and crashed later)."""
    shutil.copytree(good_bundle, tmp_path / "b")
    (tmp_path / "b" / "manifest.json").write_bytes(malformed_bytes(MALFORMED[case], good_manifest(good_bundle)))
    refused(tmp_path / "b")


def test_a_null_mode_is_refused_by_the_model_too(tmp_path, good_bundle):
    """Failed before the fix: FewShotModel.open raised TypeError from the adapter."""
    shutil.copytree(good_bundle, tmp_path / "b")
    manifest = good_manifest(good_bundle)
    manifest["adaptation"]["modes"]["prototype"] = None
    write_manifest(tmp_path / "b", manifest)
    with pytest.raises(FewShotInputError, match="adaptation modes must map"):
        FewShotModel.open(tmp_path / "b")


# --- fuzzing: random bytes and random JSON shapes as manifest.json (bounded, so CI stays fast) ---

JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=20,
)
FIELD_NAMES = st.sampled_from(
    ["format", "format_version", "model_id", "files", "input", "embedding", "adaptation", "calibration", "provenance"]
)


def open_outcome(folder: Path, data: bytes) -> None:
    """Write ``data`` as the manifest and open: success or a one-line FewShotInputError, nothing else."""
    (folder / "manifest.json").write_bytes(data)
    try:
        open_bundle(folder)
    except FewShotInputError as exc:
        assert "\n" not in str(exc)


@pytest.fixture(scope="module")
def fuzz_folder(good_bundle) -> Path:
    folder = Path(tempfile.mkdtemp(prefix="fuzz-bundle-"))
    shutil.copytree(good_bundle, folder / "b")
    yield folder / "b"
    shutil.rmtree(folder, ignore_errors=True)


FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@FUZZ
@given(data=st.binary(max_size=300))
def test_fuzz_random_bytes_as_manifest(fuzz_folder, data):
    open_outcome(fuzz_folder, data)


@FUZZ
@given(value=JSON)
def test_fuzz_random_json_as_manifest(fuzz_folder, value):
    open_outcome(fuzz_folder, json.dumps(value).encode())


@FUZZ
@given(changes=st.dictionaries(FIELD_NAMES, JSON, min_size=1, max_size=3), reseal=st.booleans())
def test_fuzz_random_values_in_a_good_manifest(fuzz_folder, good_bundle, changes, reseal):
    """A valid manifest with top-level fields replaced by random JSON, its digest recomputed or not."""
    manifest = {**good_manifest(good_bundle), **changes}
    if reseal:
        try:
            write_manifest(fuzz_folder, manifest)
        except FewShotInputError:
            return  # a value json cannot write finitely (e.g. a huge float): nothing to open
        open_outcome(fuzz_folder, (fuzz_folder / "manifest.json").read_bytes())
    else:
        open_outcome(fuzz_folder, json.dumps(manifest).encode())


@FUZZ
@given(
    path=st.lists(
        st.sampled_from(
            [
                "input",
                "embedding",
                "adaptation",
                "modes",
                "prototype",
                "calibration",
                "open_set",
                "files",
                "encoder.onnx",
                "sha256",
                "role",
                "channels",
                "size",
                "temperature",
                "threshold",
                "thresholds_by_shots",
                "default",
                "metric",
            ]
        ),
        min_size=1,
        max_size=4,
    ),
    value=JSON,
)
def test_fuzz_random_values_deep_in_a_good_manifest(fuzz_folder, good_bundle, path, value):
    """A valid manifest with one nested value (at a path of real field names) replaced by random JSON."""
    manifest = good_manifest(good_bundle)
    node = manifest
    for key in path[:-1]:
        nxt = node.get(key) if isinstance(node, dict) else None
        if not isinstance(nxt, dict):
            nxt = {}
            node[key] = nxt
        node = nxt
    node[path[-1]] = value
    try:
        write_manifest(fuzz_folder, manifest)
    except FewShotInputError:
        return
    open_outcome(fuzz_folder, (fuzz_folder / "manifest.json").read_bytes())


@pytest.fixture(scope="module")
def finetune_folder() -> Path:
    folder = Path(tempfile.mkdtemp(prefix="fuzz-model-"))
    adaptation = Adaptation("finetune", {"prototype": {}, "finetune": {"steps": 3, "lr": 0.1}})
    make_bundle(folder / "b", weight(0), adaptation=adaptation)
    yield folder / "b"
    shutil.rmtree(folder, ignore_errors=True)


MODEL_PATHS = ["input", "embedding", "adaptation", "modes", "prototype", "finetune", "steps", "lr", "calibration"]
MODEL_PATHS += ["open_set", "temperature", "threshold", "thresholds_by_shots", "default", "metric", "scale", "1"]


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(path=st.lists(st.sampled_from(MODEL_PATHS), min_size=1, max_size=4), value=JSON)
def test_fuzz_a_model_on_a_fuzzed_manifest_enrolls_and_predicts_or_errors_in_one_line(finetune_folder, path, value):
    """Past open_bundle: FewShotModel.open, enroll and predict on a manifest with one value replaced."""
    manifest = json.loads((finetune_folder / "manifest.json").read_text())
    node = manifest
    for key in path[:-1]:
        nxt = node.get(key) if isinstance(node, dict) else None
        if not isinstance(nxt, dict):
            nxt = node[key] = {}
        node = nxt
    node[path[-1]] = value
    try:
        write_manifest(finetune_folder, manifest)
        with FewShotModel.open(finetune_folder) as model:
            model.enroll("a", images(0, 2))
            model.enroll("b", images(1, 2, center=50.0))
            model.predict(images(2, 2))
    except FewShotInputError as exc:
        assert "\n" not in str(exc)
