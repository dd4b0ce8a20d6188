"""Shared by the loaders: walk zips or folders of images, decode them in parallel, cache the result.

A source is a zip or a folder. Its image files are grouped into classes by the ``depth`` folder
names directly above each file (Omniglot: alphabet/character, depth 2; class-per-folder sets:
depth 1), so a zip with extra top folders reads the same as the tree unpacked at any level.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import tempfile
import threading
import zipfile
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import numpy as np
from tqdm import tqdm

from fewshot_edge.imagefiles import is_image_name
from fewshot_edge.runtime.errors import FewShotInputError
from fewshot_edge.runtime.preprocess import InputSpec, decode_image, to_pixels

PathLike = str | Path
_CACHE_FORMAT = 1
_CHUNK = 256


class _Tree:
    """One source: its image files as sorted posix paths relative to its root, and their bytes."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._zip: zipfile.ZipFile | None = None
        self._lock = threading.Lock()
        if path.is_dir():
            names = [p.relative_to(path).as_posix() for p in path.rglob("*") if p.is_file()]
            self.names = sorted(n for n in names if is_image_name(n))
            stats = [(n, (path / n).stat()) for n in self.names]
            self.fingerprint = [str(path), [(n, s.st_size, s.st_mtime_ns) for n, s in stats]]
        elif zipfile.is_zipfile(path):
            self._zip = zipfile.ZipFile(path)
            self.names = sorted(n for n in self._zip.namelist() if is_image_name(n))
            stat = path.stat()
            self.fingerprint = [str(path), stat.st_size, stat.st_mtime_ns]
        else:
            raise FewShotInputError(f"not a folder or zip file: {path}")

    def read(self, name: str) -> bytes:
        if self._zip is None:
            return (self.path / name).read_bytes()
        with self._lock:
            return self._zip.read(name)

    def close(self) -> None:
        if self._zip is not None:
            self._zip.close()


File = tuple[_Tree, str]
Classes = dict[tuple[str, ...], list[File]]


@contextmanager
def open_sources(sources: PathLike | Sequence[PathLike]) -> Iterator[list[_Tree]]:
    """Open each zip or folder for reading; closed on exit."""
    if isinstance(sources, (str, Path)):
        sources = [sources]
    if not sources:
        raise FewShotInputError("no data sources given")
    trees: list[_Tree] = []
    try:
        for source in sources:
            path = Path(source).expanduser().resolve()
            if not path.exists():
                raise FileNotFoundError(f"data source not found: {path}")
            if any(t.path == path for t in trees):
                raise FewShotInputError(f"data source given twice: {path}")
            trees.append(_Tree(path))
        yield trees
    finally:
        for tree in trees:
            tree.close()


def collect(trees: Sequence[_Tree], depth: int) -> Classes:
    """Image files by class key (the ``depth`` folders above each file), keys and files sorted.

    A class found under two different folders (in one source or across sources) is an error.
    """
    classes: Classes = {}
    origin: dict[tuple[str, ...], str] = {}
    for tree in trees:
        if not tree.names:
            raise FewShotInputError(f"no images found in {tree.path}")
        for name in tree.names:
            parts = name.split("/")
            if len(parts) < depth + 1:
                layout = "/".join(["<class>"] * depth + ["<file>"])
                raise FewShotInputError(f"{tree.path}: {name} is not in the layout {layout}")
            key = tuple(parts[-depth - 1 : -1])
            where = f"{tree.path}/{'/'.join(parts[:-1])}"
            if origin.setdefault(key, where) != where:
                raise FewShotInputError(f"duplicate class {'/'.join(key)!r}: in {origin[key]} and {where}")
            classes.setdefault(key, []).append((tree, name))
    return {key: sorted(classes[key], key=lambda f: f[1]) for key in sorted(classes)}


def decode(
    classes: Classes, spec: InputSpec, *, cache: bool, cache_dir: PathLike | None, desc: str, workers: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """All files through ``to_pixels``, class after class: images (N, C, H, W) uint8, labels (N,).

    ``workers`` decoding threads (default: one per CPU); cached unless ``cache`` is False.
    """
    files = [f for group in classes.values() for f in group]
    labels = np.repeat(np.arange(len(classes), dtype=np.int64), [len(g) for g in classes.values()])
    path = _cache_path(classes, spec, cache_dir) if cache else None
    if path is not None and path.is_file():
        images = _read_cache(path, len(files))
        if images is not None:
            return images, labels
    images = _decode_files(files, spec, desc, workers or os.cpu_count() or 1)
    if path is not None:
        _write_cache(path, images)
    return images, labels


def _decode_files(files: list[File], spec: InputSpec, desc: str, workers: int) -> np.ndarray:
    out = np.empty((len(files), spec.channels, spec.height, spec.width), dtype=np.uint8)

    def work(start: int) -> int:
        chunk = files[start : start + _CHUNK]
        for i, (tree, name) in enumerate(chunk, start):
            out[i] = to_pixels(decode_image(tree.read(name), f"{tree.path}/{name}"), spec)
        return len(chunk)

    with (
        ThreadPoolExecutor(max_workers=workers) as pool,
        tqdm(total=len(files), desc=desc, unit="img", disable=not sys.stderr.isatty()) as bar,
    ):
        for n in pool.map(work, range(0, len(files), _CHUNK)):
            bar.update(n)
    return out


def default_cache_dir() -> Path:
    return Path(os.environ.get("FEWSHOT_EDGE_CACHE") or Path.home() / ".cache" / "fewshot-edge")


def _cache_path(classes: Classes, spec: InputSpec, cache_dir: PathLike | None) -> Path:
    trees = {id(t): t for files in classes.values() for t, _ in files}.values()
    digest = hashlib.sha256(
        json.dumps(
            {
                "format": _CACHE_FORMAT,
                "spec": spec.to_dict(),
                "sources": [t.fingerprint for t in trees],
                "files": [[t.path.as_posix(), n] for files in classes.values() for t, n in files],
            }
        ).encode()
    ).hexdigest()
    return Path(cache_dir or default_cache_dir()) / f"images-{digest[:24]}.npz"


def _read_cache(path: Path, count: int) -> np.ndarray | None:
    """The cached images, or None when the file is unreadable or does not match."""
    try:
        with np.load(path) as data:
            images = data["images"]
    except (OSError, ValueError, KeyError, zipfile.BadZipFile):
        return None
    return images if len(images) == count and images.dtype == np.uint8 else None


def _write_cache(path: Path, images: np.ndarray) -> None:
    """Write atomically (temp file, then rename); a cache that cannot be written is skipped."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.stem, suffix=".tmp")
    except OSError:
        return
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, images=images)
        os.replace(tmp, path)
    except OSError:
        Path(tmp).unlink(missing_ok=True)
