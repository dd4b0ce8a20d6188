"""Data loading: Omniglot and class-per-folder loaders, cache, splits, download."""

from __future__ import annotations

import io
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fewshot_edge.data import (
    FewShotDataset,
    _sources,
    download_omniglot,
    load_dataset,
    load_image_folders,
    load_omniglot,
    split_by_group,
    split_classes,
)
from fewshot_edge.data.folders import IMAGENET_MEAN, IMAGENET_STD
from fewshot_edge.runtime import FewShotInputError, InputSpec, to_pixels


@pytest.fixture(autouse=True)
def _cache_in_tmp(tmp_path, monkeypatch):
    """Default cache location in the test's tmp folder, never the user's home."""
    monkeypatch.setenv("FEWSHOT_EDGE_CACHE", str(tmp_path / "default-cache"))


def _png_tree(root: Path, classes: dict[str, int], seed: int = 0) -> dict[str, list[Path]]:
    """Random RGB PNGs of assorted sizes, ``root/<class>/<i>.png``, plus a non-image file."""
    rng = np.random.default_rng(seed)
    files = {}
    for name, count in classes.items():
        (root / name).mkdir(parents=True)
        files[name] = []
        for i in range(count):
            h, w = rng.integers(8, 40, size=2)
            path = root / name / f"{i:02d}.png"
            Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path)
            files[name].append(path)
        (root / name / "notes.txt").write_text("not an image")
    return files


def _zip_tree(folder: Path, dest: Path, top: str | None = None) -> Path:
    with zipfile.ZipFile(dest, "w") as z:
        for path in sorted(folder.rglob("*")):
            rel = path.relative_to(folder).as_posix()
            z.write(path, f"{top}/{rel}" if top else rel)
    return dest


def _assert_same(a: FewShotDataset, b: FewShotDataset) -> None:
    assert a.classes == b.classes and a.groups == b.groups
    np.testing.assert_array_equal(a.labels, b.labels)
    np.testing.assert_array_equal(a.images, b.images)


# Omniglot


def test_omniglot_small1_shapes_and_polarity(omniglot_small1):
    ds = load_omniglot([omniglot_small1], cache=False)
    assert ds.images.shape == (136 * 20, 1, 28, 28) and ds.images.dtype == np.uint8
    assert ds.num_classes == 136 and (ds.class_counts() == 20).all()
    assert ds.classes == sorted(ds.classes) and ds.classes[0] == "Balinese/character01"
    assert ds.groups == [c.split("/")[0] for c in ds.classes] and len(set(ds.groups)) == 5
    assert (np.diff(ds.labels) >= 0).all()
    assert ds.images.mean() < 50 and ds.images.max() == 255  # bright strokes on a dark background
    assert ds.spec == InputSpec(channels=1, height=28, width=28, invert=True)


def test_omniglot_zip_equals_unpacked_tree(omniglot_small1, tmp_path):
    with zipfile.ZipFile(omniglot_small1) as z:
        z.extractall(tmp_path / "unpacked")
    from_zip = load_omniglot([omniglot_small1], size=20, cache=False)
    _assert_same(from_zip, load_omniglot([tmp_path / "unpacked"], size=20, cache=False))
    alphabets = tmp_path / "unpacked" / "images_background_small1"
    _assert_same(from_zip, load_omniglot(alphabets, size=20, cache=False))
    assert from_zip.images.shape[-2:] == (20, 20)


def test_omniglot_rotations(omniglot_small1):
    base = load_omniglot([omniglot_small1], cache=False)
    rot = load_omniglot([omniglot_small1], rotations=True, cache=False)
    assert rot.num_classes == 4 * base.num_classes and len(rot) == 4 * len(base)
    assert rot.classes[:4] == [f"Balinese/character01/rot{a}" for a in (0, 90, 180, 270)]
    assert rot.groups[:4] == ["Balinese"] * 4
    for c in (0, 77):
        original = base.images[base.labels == c]
        for k in range(4):
            rotated = rot.images[rot.labels == 4 * c + k]
            np.testing.assert_array_equal(rotated, np.rot90(original, k, axes=(2, 3)))
    assert not np.array_equal(rot.images[rot.labels == 1], rot.images[rot.labels == 0])


def test_duplicate_source_and_missing_source(omniglot_small1, tmp_path):
    with pytest.raises(FewShotInputError, match="given twice"):
        load_omniglot([omniglot_small1, omniglot_small1], cache=False)
    with pytest.raises(FileNotFoundError, match="not found"):
        load_omniglot([tmp_path / "nope.zip"], cache=False)
    (tmp_path / "junk.zip").write_text("not a zip")
    with pytest.raises(FewShotInputError, match="not a folder or zip"):
        load_omniglot([tmp_path / "junk.zip"], cache=False)


@pytest.mark.slow
def test_omniglot_background_then_from_cache(omniglot_background, tmp_path):
    ds = load_omniglot([omniglot_background], cache_dir=tmp_path)
    assert ds.images.shape == (19280, 1, 28, 28) and ds.num_classes == 964 and len(set(ds.groups)) == 30
    start = time.perf_counter()
    again = load_omniglot([omniglot_background], cache_dir=tmp_path)
    assert time.perf_counter() - start < 3.0
    _assert_same(ds, again)


# Class-per-folder sets


def test_folders_miniimagenet_val_subset(miniimagenet_val):
    ds = load_image_folders([miniimagenet_val], max_per_class=5, cache=False)
    assert ds.images.shape == (80, 3, 84, 84) and ds.num_classes == 16
    assert ds.groups == ds.classes == sorted(ds.classes)
    assert (ds.class_counts() == 5).all()
    assert ds.spec.mean == IMAGENET_MEAN and ds.spec.std == IMAGENET_STD
    with zipfile.ZipFile(miniimagenet_val) as z:
        first = sorted(n for n in z.namelist() if n.startswith(ds.classes[0] + "/"))[:5]
        expected = [to_pixels(Image.open(io.BytesIO(z.read(n))), ds.spec) for n in first]
    np.testing.assert_array_equal(ds.images[:5], np.stack(expected))


def test_folders_synthetic_matches_to_pixels(tmp_path):
    files = _png_tree(tmp_path / "set", {"b_cls": 3, "a_cls": 4})
    ds = load_image_folders([tmp_path / "set"], size=16, cache=False)
    assert ds.classes == ["a_cls", "b_cls"] and ds.images.shape == (7, 3, 16, 16)
    expected = [to_pixels(p, ds.spec) for c in ds.classes for p in files[c]]
    np.testing.assert_array_equal(ds.images, np.stack(expected))
    np.testing.assert_array_equal(ds.labels, [0, 0, 0, 0, 1, 1, 1])

    gray = load_image_folders([tmp_path / "set"], size=12, channels=1, max_per_class=2, cache=False)
    assert gray.images.shape == (4, 1, 12, 12) and gray.spec.mean == (0.0,)
    np.testing.assert_array_equal(gray.images[0], to_pixels(files["a_cls"][0], gray.spec))


def test_folders_zip_with_top_folder_and_several_sources(tmp_path):
    _png_tree(tmp_path / "one", {"a": 2, "b": 2}, seed=1)
    _png_tree(tmp_path / "two", {"c": 3}, seed=2)
    folders = load_image_folders([tmp_path / "one", tmp_path / "two"], size=10, cache=False)
    assert folders.classes == ["a", "b", "c"] and len(folders) == 7
    zips = [
        _zip_tree(tmp_path / "one", tmp_path / "one.zip", top="shard"),
        _zip_tree(tmp_path / "two", tmp_path / "two.zip"),
    ]
    _assert_same(folders, load_image_folders(zips, size=10, cache=False))

    picked = load_image_folders(zips, size=10, class_names=["c", "a"], cache=False)
    assert picked.classes == ["c", "a"] and picked.class_counts().tolist() == [3, 2]
    with pytest.raises(FewShotInputError, match="unknown"):
        load_image_folders(zips, size=10, class_names=["zebra"], cache=False)


def test_folders_unreadable_image(tmp_path):
    _png_tree(tmp_path / "set", {"a": 2})
    (tmp_path / "set" / "a" / "broken.png").write_bytes(b"not a png")
    with pytest.raises(FewShotInputError, match="not a readable image: .*broken.png"):
        load_image_folders([tmp_path / "set"], cache=False)


def test_folders_duplicate_class_across_sources(tmp_path):
    _png_tree(tmp_path / "one", {"a": 1, "dup": 1})
    _png_tree(tmp_path / "two", {"dup": 1}, seed=3)
    with pytest.raises(FewShotInputError, match="duplicate class 'dup'"):
        load_image_folders([tmp_path / "one", tmp_path / "two"], cache=False)


def test_load_dataset_dispatch(tmp_path):
    _png_tree(tmp_path / "set", {"a": 2})
    _assert_same(
        load_dataset("folders", tmp_path / "set", size=8, cache=False),
        load_image_folders(tmp_path / "set", size=8, cache=False),
    )
    with pytest.raises(ValueError, match="known: folders, omniglot"):
        load_dataset("cifar", tmp_path / "set")


# Cache


def test_cache_hit_and_invalidation(tmp_path, monkeypatch):
    files = _png_tree(tmp_path / "set", {"a": 3, "b": 2})
    first = load_image_folders([tmp_path / "set"], size=8, cache_dir=tmp_path / "cache")
    assert len(list((tmp_path / "cache").glob("*.npz"))) == 1
    assert not list((tmp_path / "cache").glob("*.tmp"))

    def no_decoding(*args, **kwargs):
        raise AssertionError("decoded despite a cache hit")

    with monkeypatch.context() as m:
        m.setattr(_sources, "_decode_files", no_decoding)
        _assert_same(first, load_image_folders([tmp_path / "set"], size=8, cache_dir=tmp_path / "cache"))
        with pytest.raises(AssertionError, match="despite"):
            load_image_folders([tmp_path / "set"], size=9, cache_dir=tmp_path / "cache")

    Image.new("RGB", (20, 20), (255, 0, 0)).save(files["b"][0])
    changed = load_image_folders([tmp_path / "set"], size=8, cache_dir=tmp_path / "cache")
    assert not np.array_equal(changed.images[3], first.images[3])
    np.testing.assert_array_equal(changed.images[:3], first.images[:3])


def test_cache_default_location_and_opt_out(tmp_path):
    _png_tree(tmp_path / "set", {"a": 1})
    load_image_folders([tmp_path / "set"], size=8, cache=False)
    assert not (tmp_path / "default-cache").exists()
    load_image_folders([tmp_path / "set"], size=8)
    assert len(list((tmp_path / "default-cache").glob("*.npz"))) == 1


# Splits


def _toy(groups: list[str], per_class: int = 3) -> FewShotDataset:
    n = len(groups) * per_class
    return FewShotDataset(
        images=np.arange(n, dtype=np.uint8).reshape(n, 1, 1, 1),
        labels=np.repeat(np.arange(len(groups)), per_class),
        classes=[f"{g}/c{i}" for i, g in enumerate(groups)],
        groups=groups,
        spec=InputSpec(channels=1, height=1, width=1),
    )


def test_split_by_group_disjoint_and_reproducible():
    ds = _toy([g for g in "ABCDEF" for _ in range(3)])
    train, held = split_by_group(ds, 2, seed=0)
    assert len(set(held.groups)) == 2 and not set(train.groups) & set(held.groups)
    assert sorted(train.classes + held.classes) == sorted(ds.classes)
    assert len(train) + len(held) == len(ds)
    assert set(train.images.ravel()).isdisjoint(held.images.ravel())
    assert held.classes == split_by_group(ds, 2, seed=0)[1].classes
    assert len({tuple(split_by_group(ds, 2, seed=s)[1].classes) for s in range(10)}) > 1

    assert split_by_group(ds, "C")[1].groups == ["C"] * 3
    train, held = split_by_group(ds, ["B", "E"], seed=0)
    assert held.classes == ["B/c3", "B/c4", "B/c5", "E/c12", "E/c13", "E/c14"]
    np.testing.assert_array_equal(held.labels, np.repeat(np.arange(6), 3))


@pytest.mark.parametrize(
    "holdout, match", [(6, "1 to 5"), (0, "1 to 5"), (["Z"], "unknown groups: Z"), (list("ABCDEF"), "fewer than all")]
)
def test_split_by_group_errors(holdout, match):
    with pytest.raises(ValueError, match=match):
        split_by_group(_toy(list("ABCDEF")), holdout, seed=0)


def test_split_classes():
    ds = _toy(["A"] * 10)
    train, held = split_classes(ds, 0.3, seed=1)
    assert held.num_classes == 3 and train.num_classes == 7
    assert not set(train.classes) & set(held.classes)
    assert split_classes(ds, 3, seed=1)[1].classes == held.classes


# Download


def test_download_omniglot_from_file_url(tmp_path):
    mirror = tmp_path / "mirror"
    _png_tree(tmp_path / "tree" / "Alpha", {"character01": 2})
    _zip_tree(tmp_path / "tree", tmp_path / "small.zip", top="images_background")
    mirror.mkdir()
    (mirror / "images_background.zip").write_bytes((tmp_path / "small.zip").read_bytes())

    [path] = download_omniglot(tmp_path / "dest", parts=("background",), base_url=mirror.as_uri())
    assert path == tmp_path / "dest" / "images_background.zip"
    assert path.read_bytes() == (tmp_path / "small.zip").read_bytes()
    assert load_omniglot([path], cache=False).classes == ["Alpha/character01"]

    (mirror / "images_background.zip").unlink()  # present already: not fetched again
    assert download_omniglot(tmp_path / "dest", parts=("background",), base_url=mirror.as_uri()) == [path]

    (mirror / "images_evaluation.zip").write_text("an error page, not a zip")
    with pytest.raises(OSError, match="images_evaluation.zip"):
        download_omniglot(tmp_path / "dest", parts=("evaluation",), base_url=mirror.as_uri())
    assert sorted(p.name for p in (tmp_path / "dest").iterdir()) == ["images_background.zip"]
