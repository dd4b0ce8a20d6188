"""Fetch the official Omniglot zips."""

from __future__ import annotations

import os
import sys
import urllib.request
import zipfile
from collections.abc import Sequence
from pathlib import Path

from tqdm import tqdm

from ._sources import PathLike

OFFICIAL = "https://github.com/brendenlake/omniglot/raw/master/python"


def download_omniglot(
    dest_dir: PathLike,
    parts: Sequence[str] = ("background", "evaluation"),
    base_url: str = OFFICIAL,
) -> list[Path]:
    """Download ``images_<part>.zip`` for each part into ``dest_dir``; a valid zip already there is kept.

    Each file is written to ``.part`` and renamed once it checks out as a zip. Returns the zip paths.
    """
    dest = Path(dest_dir).expanduser()
    dest.mkdir(parents=True, exist_ok=True)
    paths = []
    for part in parts:
        path = dest / f"images_{part}.zip"
        if not zipfile.is_zipfile(path):
            _fetch(f"{base_url.rstrip('/')}/{path.name}", path)
        paths.append(path)
    return paths


def _fetch(url: str, path: Path) -> None:
    tmp = path.with_name(path.name + ".part")
    try:
        with (
            urllib.request.urlopen(url, timeout=60) as response,
            open(tmp, "wb") as f,
            tqdm(
                total=int(response.headers.get("Content-Length") or 0) or None,
                desc=path.name,
                unit="B",
                unit_scale=True,
                disable=not sys.stderr.isatty(),
            ) as bar,
        ):
            while chunk := response.read(1 << 16):
                f.write(chunk)
                bar.update(len(chunk))
        with zipfile.ZipFile(tmp) as z:
            bad = z.testzip()
        if bad is not None:
            raise zipfile.BadZipFile(f"corrupt member {bad}")
        os.replace(tmp, path)
    except (OSError, zipfile.BadZipFile) as exc:
        tmp.unlink(missing_ok=True)
        raise OSError(f"download of {url} failed: {exc}") from exc
