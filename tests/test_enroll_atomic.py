"""Issue 12, item 3: a multi-class enroll writes every class or none, the error names the file, and a
re-run of an interrupted --add skips the shots already stored instead of duplicating them."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image
from runtime_support import images, make_bundle, weight

from fewshot_edge.cli import main
from fewshot_edge.runtime import EnrollmentStore, FewShotInputError, FewShotModel
from fewshot_edge.runtime.store import NewShots


def run(*args, ok: bool = True):
    result = CliRunner().invoke(main, [str(a) for a in args])
    if ok:
        assert result.exit_code == 0, result.output
    return result


def save(path: Path, image: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image).save(path)
    return path


@pytest.fixture
def env(tmp_path):
    make_bundle(tmp_path / "bundle", weight(0))
    shots = tmp_path / "shots"
    for label, center in (("a", 30), ("b", 128), ("c", 225)):
        for i, image in enumerate(images(int(center), 2, center=center, spread=5)):
            save(shots / label / f"{i}.png", image)
    return {"tmp": tmp_path, "shots": shots, "opts": ["--bundle", tmp_path / "bundle", "--store", tmp_path / "s.db"]}


def classes_of(env) -> list[dict]:
    if not (env["tmp"] / "s.db").exists():
        return []
    return json.loads(run("classes", "list", *env["opts"], "--json").stdout)


def test_a_class_folder_tree_with_one_unconvertible_file_enrolls_nothing_and_names_it(env):
    bad = env["shots"] / "c" / "2.tif"
    Image.new("LAB", (6, 6)).save(bad)  # decodes, but has no conversion to L
    result = run("enroll", *env["opts"], env["shots"], ok=False)
    assert result.exit_code == 2 and str(bad) in result.stderr and "cannot convert a LAB image" in result.stderr
    assert len(result.output.strip().splitlines()) == 1
    assert classes_of(env) == [] and not list(env["tmp"].glob("s.db*"))  # no empty store left behind
    bad.unlink()
    run("enroll", *env["opts"], env["shots"])  # the same command again, now that the file is fixed
    assert [c["label"] for c in classes_of(env)] == ["a", "b", "c"]


def test_the_api_writes_several_classes_in_one_transaction_or_none(tmp_path, env):
    with FewShotModel.open(env["tmp"] / "bundle", store=tmp_path / "api.db") as model:
        good = images(1, 2)
        with pytest.raises(FewShotInputError, match="image 1 of class 'y'"):
            model.enroll_many({"x": good, "y": [good[0], Image.new("LAB", (4, 4))]})
        assert model.classes() == [] and model.store.data_version() == 0
        model.enroll_many({"x": good, "y": images(2, 3)})
        assert model.classes() == [("x", 2), ("y", 3)] and model.store.data_version() == 1
        with pytest.raises(FewShotInputError, match="'x' already exists"):
            model.enroll_many({"z": images(3, 1), "x": images(4, 1)})
        assert model.classes() == [("x", 2), ("y", 3)] and model.store.data_version() == 1
        assert [p.label for p in model.predict(images(2, 2))] == ["y", "y"]


def test_store_add_many_is_one_transaction(tmp_path):
    rng = np.random.default_rng(0)

    def batch(label: str, n: int, dim: int = 4) -> NewShots:
        return NewShots(
            label, rng.normal(size=(n, dim)).astype(np.float32), np.zeros((n, 1, 2, 2), np.uint8), list("abcdefg")[:n]
        )

    with EnrollmentStore.open(tmp_path / "s.db", "m") as store:
        store.add_many([batch("p", 1)], new_classes=True)
        with pytest.raises(FewShotInputError, match="'p' already exists"):
            store.add_many([batch("q", 2), batch("p", 1)], new_classes=True)
        with pytest.raises(FewShotInputError, match="differ in shape"):
            store.add_many([batch("q", 2), batch("r", 1, dim=5)], new_classes=True)
        assert store.list_classes() == [("p", 1)] and store.data_version() == 1


def test_rerunning_an_interrupted_add_skips_the_shots_already_stored(env):
    files = sorted(env["shots"].glob("a/*.png"))
    more = [save(env["tmp"] / "more" / f"{i}.png", image) for i, image in enumerate(images(7, 2, center=35, spread=5))]
    run("enroll", *env["opts"], "--label", "a", *files)
    result = run("enroll", *env["opts"], "--label", "a", "--add", files[0], *more)  # one already there
    assert "skipped 1 image 'a' already holds" in result.stdout and str(files[0]) in result.stdout
    assert "added 2 to 'a': 4 shots" in result.stdout
    result = run("enroll", *env["opts"], "--label", "a", "--add", files[0], *more, *more)  # all there, one given twice
    assert "skipped 5 images" in result.stdout and "added 0 to 'a': 4 shots" in result.stdout
    assert classes_of(env) == [{"label": "a", "shots": 4}]
    with EnrollmentStore.open(env["tmp"] / "s.db", "ignored", reembed=True) as store:
        assert store.data_version() == 2  # the run that added nothing wrote nothing


def test_an_add_over_several_classes_is_all_or_nothing(env):
    run("enroll", *env["opts"], env["shots"])
    extra = env["tmp"] / "extra"
    save(extra / "a" / "9.png", images(9, 1, center=33, spread=5)[0])
    save(extra / "b" / "9.png", images(10, 1, center=120, spread=5)[0])
    Image.new("LAB", (6, 6)).save(extra / "b" / "bad.tif")
    result = run("enroll", *env["opts"], "--add", extra, ok=False)
    assert result.exit_code == 2 and "bad.tif" in result.stderr
    assert [c["shots"] for c in classes_of(env)] == [2, 2, 2]
    (extra / "b" / "bad.tif").unlink()
    run("enroll", *env["opts"], "--add", extra)
    assert [c["shots"] for c in classes_of(env)] == [3, 3, 2]


def test_a_failed_enroll_into_an_existing_store_keeps_the_store(env):
    run("enroll", *env["opts"], "--label", "a", env["shots"] / "a")
    bad = env["shots"] / "b" / "2.tif"
    Image.new("LAB", (6, 6)).save(bad)
    assert run("enroll", *env["opts"], "--label", "b", env["shots"] / "b", ok=False).exit_code == 2
    assert [c["label"] for c in classes_of(env)] == ["a"]
