"""Signed bundles: a signed bundle opens with the right key, and is refused with a wrong key or none when keys
are set (API and CLI); keys, folders of keys and bad keys give one-line errors; export loads its key first."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import pytest
from click.testing import CliRunner
from runtime_support import images, linear_encoder, make_bundle, weight

from fewshot_edge.cli import main
from fewshot_edge.runtime import EmbeddingSpec, FewShotInputError, FewShotModel, open_bundle, write_bundle
from fewshot_edge.runtime.bundle import manifest_sha256, seal_bundle
from fewshot_edge.runtime.preprocess import InputSpec
from fewshot_edge.runtime.signing import generate_key_pair, load_signing_key

pytest.importorskip("cryptography")


@pytest.fixture(scope="module")
def keys(tmp_path_factory) -> dict[str, Path]:
    """Two key pairs: "good" (the release key) and "other"; and their ids."""
    folder = tmp_path_factory.mktemp("keys")
    ids = {}
    for name in ("good", "other"):
        ids[name] = generate_key_pair(folder / f"{name}.key", folder / f"{name}.pub")
    return {
        "folder": folder,
        **{n: folder / f"{n}.key" for n in ids},
        **{f"{n}.pub": folder / f"{n}.pub" for n in ids},
        "ids": ids,
    }


def signed_bundle(path: Path, key: Path):
    return write_bundle(
        path,
        {"encoder.onnx": linear_encoder(weight(0))},
        input_spec=InputSpec(1, 4, 4),
        embedding=EmbeddingSpec(3),
        provenance={"method": "test"},
        signing_key=key,
    )


def refused(path: Path, trusted, *fragments: str) -> None:
    with pytest.raises(FewShotInputError) as info:
        open_bundle(path, trusted)
    message = str(info.value)
    assert "\n" not in message, message
    for fragment in fragments:
        assert fragment in message, message


def test_keygen_writes_a_private_key_only_its_owner_reads(keys):
    assert keys["good"].stat().st_mode & 0o777 == 0o600
    assert keys["good.pub"].read_bytes().startswith(b"-----BEGIN PUBLIC KEY-----")
    assert len(keys["ids"]["good"]) == 64 and keys["ids"]["good"] != keys["ids"]["other"]
    with pytest.raises(FewShotInputError, match="already exists"):
        generate_key_pair(keys["good"], keys["folder"] / "new.pub")


def test_a_signed_bundle_opens_with_the_right_key_in_every_form(tmp_path, keys):
    written = signed_bundle(tmp_path / "b", keys["good"])
    assert written.signed_by == keys["ids"]["good"]
    raw = json.loads((tmp_path / "b" / "manifest.json").read_text())
    assert raw["signature"]["algorithm"] == "ed25519" and raw["signature"]["key_id"] == keys["ids"]["good"]
    public = keys["good.pub"]
    raw_public = load_signing_key(keys["good"]).public_bytes()
    for trusted in (public, str(public), [public], public.read_bytes(), raw_public, [keys["other.pub"], public]):
        assert open_bundle(tmp_path / "b", trusted).signed_by == keys["ids"]["good"]
    assert open_bundle(tmp_path / "b", keys["folder"]).signed_by == keys["ids"]["good"]  # a folder of *.pub
    assert open_bundle(tmp_path / "b").signed_by is None  # no keys: opens, the signature is not required


def test_a_signed_bundle_is_refused_with_a_wrong_key(tmp_path, keys):
    signed_bundle(tmp_path / "b", keys["good"])
    refused(tmp_path / "b", keys["other.pub"], "signed by key", "not among the 1 trusted key(s)")


def test_an_unsigned_bundle_is_refused_when_keys_are_set(tmp_path, keys):
    make_bundle(tmp_path / "b", weight(0))
    refused(tmp_path / "b", keys["good.pub"], "not signed")
    open_bundle(tmp_path / "b")  # without keys it opens


def test_a_manifest_edited_after_signing_does_not_verify_even_with_its_digest_recomputed(tmp_path, keys):
    """The attacker's edit: change the threshold and recompute manifest_sha256, keep the signature."""
    signed_bundle(tmp_path / "b", keys["good"])
    path = tmp_path / "b" / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest["calibration"]["open_set"]["threshold"] = 1000.0
    manifest["manifest_sha256"] = manifest_sha256(manifest)
    path.write_text(json.dumps(manifest))
    refused(tmp_path / "b", keys["good.pub"], "does not verify")
    open_bundle(tmp_path / "b")  # tamper-evidence alone is recomputable: that is what the keys are for


def test_a_signature_moved_from_another_bundle_does_not_verify(tmp_path, keys):
    signed_bundle(tmp_path / "a", keys["good"])
    make_bundle(tmp_path / "b", weight(1))
    signature = json.loads((tmp_path / "a" / "manifest.json").read_text())["signature"]
    manifest = json.loads((tmp_path / "b" / "manifest.json").read_text())
    (tmp_path / "b" / "manifest.json").write_text(json.dumps({**manifest, "signature": signature}))
    refused(tmp_path / "b", keys["good.pub"], "does not verify")


def test_a_changed_model_file_of_a_signed_bundle_is_refused(tmp_path, keys):
    signed_bundle(tmp_path / "b", keys["good"])
    data = bytearray((tmp_path / "b" / "encoder.onnx").read_bytes())
    data[len(data) // 2] ^= 1
    (tmp_path / "b" / "encoder.onnx").write_bytes(bytes(data))
    refused(tmp_path / "b", keys["good.pub"], "encoder.onnx does not match its sha256")


@pytest.mark.parametrize(
    "signature, message",
    [
        ({"algorithm": "rsa", "key_id": "0" * 64, "value": ""}, "algorithm must be 'ed25519'"),
        ({"algorithm": "ed25519", "key_id": "xyz", "value": ""}, "key_id must be 64"),
        ({"algorithm": "ed25519", "key_id": "0" * 64, "value": "not base64!"}, "64 bytes in base64"),
        ({"algorithm": "ed25519", "key_id": "0" * 64, "value": base64.b64encode(b"x" * 10).decode()}, "64 bytes"),
        (None, "must be an object"),
        ("sig", "must be an object"),
    ],
)
def test_a_malformed_signature_is_refused_even_without_keys(tmp_path, keys, signature, message):
    """My call, documented in docs/deploy.md: an unverifiable signature is never silently ignored."""
    signed_bundle(tmp_path / "b", keys["good"])
    path = tmp_path / "b" / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest["signature"] = signature
    path.write_text(json.dumps(manifest))
    refused(tmp_path / "b", None, message)
    refused(tmp_path / "b", keys["good.pub"], message)


def test_bad_trusted_keys_are_one_line_errors(tmp_path, keys):
    signed_bundle(tmp_path / "b", keys["good"])
    (tmp_path / "empty").mkdir()
    (tmp_path / "junk.pub").write_text("not a key")
    cases = {
        "empty folder": (tmp_path / "empty", "holds no public key"),
        "no keys": ([], "no trusted keys given"),
        "junk": (tmp_path / "junk.pub", "is not a PEM public key"),
        "private key as trusted": (keys["good"], "is not a PEM public key"),
        "missing file": (tmp_path / "nope.pub", "trusted key"),
        "short bytes": (b"abc", "is not a PEM public key"),
    }
    for trusted, message in cases.values():
        refused(tmp_path / "b", trusted, message)


def test_bad_signing_keys_are_one_line_errors(tmp_path, keys):
    for source, message in ((keys["good.pub"], "not a PEM private key"), (tmp_path / "nope.key", "signing key")):
        with pytest.raises(FewShotInputError, match=message):
            signed_bundle(tmp_path / "b", source)
    assert not (tmp_path / "b").exists()


def test_seal_signs_an_existing_bundle_keeping_its_model_id(tmp_path, keys):
    plain = make_bundle(tmp_path / "b", weight(0))
    signed = seal_bundle(tmp_path / "b", keys["good"])
    assert signed.model_id == plain.model_id and signed.signed_by == keys["ids"]["good"]
    assert open_bundle(tmp_path / "b", keys["good.pub"]).manifest == plain.manifest
    resigned = seal_bundle(tmp_path / "b", keys["other"])  # key rotation: the old signature is replaced
    assert resigned.signed_by == keys["ids"]["other"]
    refused(tmp_path / "b", keys["good.pub"], "not among")


def test_the_model_opens_only_a_bundle_signed_by_a_trusted_key(tmp_path, keys):
    signed_bundle(tmp_path / "b", keys["good"])
    with FewShotModel.open(tmp_path / "b", trusted_keys=[keys["good.pub"]]) as model:
        model.enroll("a", images(0, 2))
        assert model.bundle.signed_by == keys["ids"]["good"]
    with pytest.raises(FewShotInputError, match="not among"):
        FewShotModel.open(tmp_path / "b", trusted_keys=keys["other.pub"])


def run(*args, ok=True, env=None):
    result = CliRunner().invoke(main, [str(a) for a in args], env=env)
    if ok:
        assert result.exit_code == 0, result.output
    else:
        assert result.exit_code == 2, result.output
        assert len(result.output.strip().splitlines()) == 1, result.output
    return result


def test_cli_keygen_sign_and_trusted_key(tmp_path):
    out = run("keygen", tmp_path / "release").output
    assert "key id:" in out and (tmp_path / "release.key").is_file() and (tmp_path / "release.pub").is_file()
    run("keygen", tmp_path / "release", ok=False)  # never overwrites a key
    run("keygen", tmp_path / "other")
    make_bundle(tmp_path / "b", weight(0))
    image = tmp_path / "a.png"
    from PIL import Image

    Image.fromarray(images(0, 1)[0]).save(image)
    store = tmp_path / "s.db"
    trusted = ["--trusted-key", tmp_path / "release.pub"]
    refused = run("enroll", "--bundle", tmp_path / "b", "--store", store, "--label", "a", image, *trusted, ok=False)
    assert "not signed" in refused.output and not store.exists()
    assert "signed" in run("sign", tmp_path / "b", "--key", tmp_path / "release.key").output
    run("enroll", "--bundle", tmp_path / "b", "--store", store, "--label", "a", image, *trusted)
    run("predict", "--bundle", tmp_path / "b", "--store", store, image, *trusted)
    wrong = run(
        "predict",
        "--bundle",
        tmp_path / "b",
        "--store",
        store,
        image,
        "--trusted-key",
        tmp_path / "other.pub",
        ok=False,
    )
    assert "not among" in wrong.output
    by_env = {"FEWSHOT_EDGE_TRUSTED_KEYS": str(tmp_path / "other.pub")}
    assert (
        "not among" in run("predict", "--bundle", tmp_path / "b", "--store", store, image, ok=False, env=by_env).output
    )
    run("predict", "--bundle", tmp_path / "b", "--store", store, image)  # no keys: signatures not required


def test_cli_export_refuses_a_bad_signing_key_before_any_work(tmp_path, keys):
    pytest.importorskip("torch")
    pytest.importorskip("onnx")
    result = run("export", tmp_path / "missing.pt", "--out", tmp_path / "out", "--sign", keys["good.pub"], ok=False)
    assert "not a PEM private key" in result.output and not (tmp_path / "out").exists()


def test_keygen_into_a_missing_folder_is_one_line(tmp_path):
    assert "cannot write the key pair" in run("keygen", tmp_path / "no" / "folder" / "k", ok=False).output
