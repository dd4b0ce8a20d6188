"""Finding image files: by suffix, skipping hidden files and macOS metadata. Standard library only."""

from __future__ import annotations

from pathlib import Path

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"})


def is_image_name(name: str) -> bool:
    """True for a posix path (relative, e.g. inside a zip) of an image file that is not hidden."""
    parts = name.split("/")
    hidden = any(p.startswith(".") or p == "__MACOSX" for p in parts)
    return not hidden and not name.endswith("/") and Path(name).suffix.lower() in IMAGE_SUFFIXES


def image_files(folder: str | Path) -> list[Path]:
    """The image files directly in ``folder``, sorted by name."""
    return sorted(p for p in Path(folder).iterdir() if p.is_file() and is_image_name(p.name))


def class_folders(root: str | Path) -> dict[str, list[Path]]:
    """A class per subfolder of ``root`` (its name -> its image files), sorted; hidden folders skipped."""
    return {d.name: image_files(d) for d in sorted(Path(root).iterdir()) if d.is_dir() and not d.name.startswith(".")}
