"""Issue 12, items 2 and 4 to 7: stores that keep nothing, one-line errors for bombs, read-only and
full stores and damaged meta, nothing created before the bundle checks out, labels, the API's inputs."""

from __future__ import annotations

import sqlite3
import unicodedata
import warnings

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image
from runtime_support import SPEC, images, linear_encoder, make_bundle, weight

from fewshot_edge.cli import main
from fewshot_edge.runtime import (
    Adaptation,
    Calibration,
    EmbeddingSpec,
    EnrollmentStore,
    FewShotInputError,
    FewShotModel,
    OpenSet,
    validate_label,
    write_bundle,
)
from fewshot_edge.runtime.preprocess import load_image, to_pixels
from fewshot_edge.runtime.store import NewShots

MODEL = "a" * 64


def shots(n: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    return (
        rng.normal(size=(n, 4)).astype(np.float32),
        rng.integers(0, 256, size=(n, 1, 4, 4), dtype=np.uint8),
        [f"h{seed}-{i}" for i in range(n)],
    )


def run(*args, ok: bool = True):
    result = CliRunner().invoke(main, [str(a) for a in args])
    if ok:
        assert result.exit_code == 0, result.output
    return result


def one_line_exit_2(result, message: str) -> None:
    assert result.exit_code == 2, result.output
    assert message in result.stderr, result.stderr
    assert len(result.output.strip().splitlines()) == 1 and result.stdout == ""


@pytest.fixture
def env(tmp_path):
    make_bundle(tmp_path / "bundle", weight(0))
    files = []
    for i, image in enumerate(images(1, 3, center=40)):
        Image.fromarray(image).save(tmp_path / f"{i}.png")
        files.append(tmp_path / f"{i}.png")
    return {"tmp": tmp_path, "bundle": tmp_path / "bundle", "store": tmp_path / "device.db", "files": files}


# item 2: a store path that keeps nothing


@pytest.mark.parametrize("store", ["", ":memory:", " "])
def test_enroll_refuses_a_store_that_keeps_nothing(env, store):
    result = run("enroll", "--bundle", env["bundle"], "--store", store, "--label", "x", env["files"][0], ok=False)
    one_line_exit_2(result, "keeps nothing")


def test_the_api_refuses_an_empty_store_path(env):
    with pytest.raises(FewShotInputError, match="store path is empty"):
        FewShotModel.open(env["bundle"], store="")


# item 5: nothing created or bound until everything checked out


def bad_bundle(path):
    """A bundle whose manifest (embedding size 5) does not match its encoder (3): refused after its hashes pass."""
    return write_bundle(
        path,
        {"encoder.onnx": linear_encoder(weight(0))},
        input_spec=SPEC,
        embedding=EmbeddingSpec(5, "sqeuclidean", 1.0),
        adaptation=Adaptation(),
        calibration=Calibration(1.0, OpenSet()),
        provenance={"method": "test"},
    )


def test_a_refused_bundle_creates_and_binds_no_store(env):
    bad_bundle(env["tmp"] / "bad")
    with pytest.raises(FewShotInputError, match="embedding size"):
        FewShotModel.open(env["tmp"] / "bad", store=env["store"])
    assert not env["store"].exists()
    result = run(
        "enroll", "--bundle", env["tmp"] / "bad", "--store", env["store"], "--label", "x", env["files"][0], ok=False
    )
    one_line_exit_2(result, "embedding size")
    assert not env["store"].exists()
    run("enroll", "--bundle", env["bundle"], "--store", env["store"], "--label", "x", env["files"][0])  # no --reembed


@pytest.mark.parametrize("command", [["predict"], ["classes", "list"]])
def test_read_only_commands_do_not_turn_an_empty_file_into_a_store(env, command):
    env["store"].write_bytes(b"")
    args = [env["files"][0]] if command == ["predict"] else []
    result = run(*command, "--bundle", env["bundle"], "--store", env["store"], *args, ok=False)
    one_line_exit_2(result, "no enrollment store at")
    assert env["store"].read_bytes() == b""
    with pytest.raises(FewShotInputError, match="no enrollment store"):
        FewShotModel.open(env["bundle"], store=env["store"], create=False)
    with pytest.raises(FewShotInputError, match="no enrollment store"):
        FewShotModel.open(env["bundle"], store=env["tmp"] / "missing.db", create=False)
    with pytest.raises(FewShotInputError, match="no enrollment store"):
        EnrollmentStore.open(env["store"], MODEL, create=False)
    assert env["store"].read_bytes() == b"" and not (env["tmp"] / "missing.db").exists()


# item 4: one-line errors for bombs, read-only and full stores, damaged meta


def test_a_decompression_bomb_is_one_line(env, monkeypatch):
    Image.fromarray(np.zeros((40, 40), np.uint8)).save(env["tmp"] / "bomb.png")  # 1600 px
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 500)  # Pillow refuses above twice the limit
    with pytest.raises(FewShotInputError, match="too large to decode safely") as info:
        load_image(env["tmp"] / "bomb.png")
    assert "\n" not in str(info.value) and "bomb.png" in str(info.value)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # between the limit and twice it: a warning
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        with pytest.raises(FewShotInputError, match="too large"):
            load_image(env["tmp"] / "bomb.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 500)
    result = run(
        "enroll", "--bundle", env["bundle"], "--store", env["store"], "--label", "x", env["tmp"] / "bomb.png", ok=False
    )
    one_line_exit_2(result, "too large to decode safely")


def test_a_read_only_store_refuses_writes_in_one_line_and_stays_intact(tmp_path):
    with EnrollmentStore.open(tmp_path / "s.db", MODEL) as store:
        store.add_class("cat", *shots(2))
        store._conn.execute("PRAGMA query_only = ON")  # what a read-only file or mount gives sqlite
        with pytest.raises(FewShotInputError, match="readonly") as info:
            store.add_class("dog", *shots(2, 1))
        assert "nothing was written, the store is as it was" in str(info.value) and "\n" not in str(info.value)
        assert store.list_classes() == [("cat", 2)] and store.data_version() == 1


def test_a_full_disk_refuses_the_write_in_one_line_and_keeps_the_store(tmp_path):
    with EnrollmentStore.open(tmp_path / "s.db", MODEL) as store:
        store.add_class("cat", *shots(2))
        pages = store._conn.execute("PRAGMA page_count").fetchone()[0]
        store._conn.execute(f"PRAGMA max_page_count = {pages}")  # no page more: the disk is full
        rng = np.random.default_rng(0)
        big = (
            rng.normal(size=(3000, 4)).astype(np.float32),
            rng.integers(0, 256, (3000, 1, 4, 4), np.uint8),
            [str(i) for i in range(3000)],
        )
        with pytest.raises(FewShotInputError, match="full") as info:
            store.add_many([NewShots("dog", *big)], new_classes=True)
        assert "the store is as it was" in str(info.value) and "\n" not in str(info.value)
        assert store.list_classes() == [("cat", 2)] and store.data_version() == 1
    conn = sqlite3.connect(tmp_path / "s.db")
    assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    conn.close()


def test_a_store_whose_meta_rows_were_deleted_is_one_line(env, tmp_path):
    run("enroll", "--bundle", env["bundle"], "--store", env["store"], "--label", "x", env["files"][0])
    conn = sqlite3.connect(env["store"])
    conn.execute("DELETE FROM meta")
    conn.commit()
    conn.close()
    with pytest.raises(FewShotInputError, match="damaged: its meta row 'model_id' is missing"):
        FewShotModel.open(env["bundle"], store=env["store"])
    opts = ["--bundle", env["bundle"], "--store", env["store"]]
    for args in (["predict", *opts, env["files"][0]], ["classes", "list", *opts]):
        one_line_exit_2(run(*args, ok=False), "damaged")
    with EnrollmentStore.open(tmp_path / "t.db", MODEL) as store:  # deleted while it was open
        store.add_class("cat", *shots(1))
        other = sqlite3.connect(tmp_path / "t.db")
        other.execute("DELETE FROM meta WHERE key = 'data_version'")
        other.commit()
        other.close()
        with pytest.raises(FewShotInputError, match="damaged"):
            store.data_version()
        with pytest.raises(FewShotInputError, match="damaged"):
            store.add_class("dog", *shots(1, 1))


# item 6: labels


@pytest.mark.parametrize(
    "label, kind",
    [
        ("cat\u200b", "format"),  # zero-width space
        ("\u202egod", "format"),  # right-to-left override
        ("a\u2066b\u2069", "format"),  # left-to-right isolate
        ("zw\u200dj", "format"),  # zero-width joiner
        ("bell\x07", "control"),
        ("line\u2028sep", "line separator"),
        ("priv\ue000", "private-use"),
    ],
)
def test_invisible_and_direction_characters_are_refused_in_one_line(label, kind):
    with pytest.raises(FewShotInputError, match=kind) as info:
        validate_label(label)
    assert "\n" not in str(info.value) and str(info.value).isascii()


def test_labels_that_render_the_same_are_one_class(tmp_path):
    composed, decomposed = "caf\u00e9", "cafe\u0301"
    assert composed != decomposed and validate_label(decomposed) == composed
    assert validate_label("red\u00a0fox") == "red fox"  # a no-break space is a space
    with EnrollmentStore.open(tmp_path / "s.db", MODEL) as store:
        store.add_class(composed, *shots(1))
        with pytest.raises(FewShotInputError, match="already exists"):
            store.add_class(decomposed, *shots(1, 1))
        store.add_shots(decomposed, *shots(1, 2))
        store.add_class("red fox", *shots(1, 3))
        with pytest.raises(FewShotInputError, match="already exists"):
            store.add_class("red\u2009fox", *shots(1, 4))  # thin space
        assert store.list_classes() == [(composed, 2), ("red fox", 1)]
        assert all(unicodedata.is_normalized("NFC", label) for label, _ in store.list_classes())


def test_class_folders_whose_names_render_the_same_are_refused_as_one_class(env):
    for name in ("caf\u00e9", "cafe\u0301"):
        (env["tmp"] / "shots" / name).mkdir(parents=True)
        Image.fromarray(images(2, 1)[0]).save(env["tmp"] / "shots" / name / "0.png")
    result = run("enroll", "--bundle", env["bundle"], "--store", env["store"], env["tmp"] / "shots", ok=False)
    one_line_exit_2(result, "is given twice")
    assert not env["store"].exists()


# item 7: the API's inputs


def test_a_store_that_is_not_a_path_is_refused_and_creates_nothing(env, monkeypatch):
    monkeypatch.chdir(env["tmp"])
    for store in (123, 1.5, b"bytes.db", ["x.db"]):
        with pytest.raises(FewShotInputError, match="store must be a file path") as info:
            FewShotModel.open(env["bundle"], store=store)
        assert "\n" not in str(info.value)
    assert not (env["tmp"] / "123").exists() and not (env["tmp"] / "1.5").exists()


def closed_image() -> Image.Image:
    image = Image.new("L", (8, 8))
    image.close()
    return image


def lab_image() -> Image.Image:
    return Image.new("LAB", (8, 8))


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: Image.new("L", (0, 0)), "image is empty"),
        (lambda: Image.new("RGB", (0, 7)), "image is empty"),
        (closed_image, "closed image"),
        (lab_image, "cannot convert a LAB image"),
        (lambda: Image.new("La", (4, 4)), "cannot convert a La image"),
    ],
)
def test_unusable_pil_images_are_one_line_input_errors(env, make, message):
    with pytest.raises(FewShotInputError, match=message):
        to_pixels(make(), SPEC)
    with FewShotModel.open(env["bundle"], store=None) as model:
        with pytest.raises(FewShotInputError, match=message) as info:
            model.enroll("x", [make()])
        assert "\n" not in str(info.value)
        assert model.classes() == []
        model.enroll("y", env["files"][:1])
        with pytest.raises(FewShotInputError, match=message):
            model.predict(make())
