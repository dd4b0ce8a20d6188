"""Packaging: one version source (pyproject -> package metadata -> ``__version__`` and ``--version``), and a
real, non-editable install that ships the PEP 561 ``py.typed`` markers and the licence.

The install test builds a wheel from a copy of the sources with the setuptools of this environment
(``--no-build-isolation --no-index``: nothing is downloaded), installs it with ``--no-deps`` into a fresh
virtual environment, and imports ``fewshot_edge.runtime`` there from the installed files. numpy,
onnxruntime and Pillow are borrowed from this environment by a ``.pth`` line placed after the fresh
environment's own site-packages, so the installed copy, not the checkout or its editable install, is the
one found (the test checks where it came from).
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import re
import shutil
import subprocess
import sys
import tarfile
import venv
import zipfile
from pathlib import Path

import pytest
from click.testing import CliRunner

import fewshot_edge

ROOT = Path(__file__).resolve().parents[1]
# What a build reads: pyproject, its readme and licence files, and the three package directories.
BUILD_INPUTS = ["pyproject.toml", "README.md", "LICENSE", "fewshot_edge", "export", "runtime"]
TYPED_PACKAGES = ["fewshot_edge", "fewshot_edge.runtime", "fewshot_edge.export"]


def pyproject_version() -> str:
    text = (ROOT / "pyproject.toml").read_text(encoding="utf-8")
    project = text.split("[project]", 1)[1].split("\n[", 1)[0]
    match = re.search(r'(?m)^version\s*=\s*"([^"]+)"', project)
    assert match, "pyproject.toml has no static [project] version"
    return match.group(1)


def test_version_comes_from_package_metadata() -> None:
    assert fewshot_edge.__version__ == importlib.metadata.version("fewshot-edge") == pyproject_version()


def test_version_without_metadata_is_unknown_not_a_guess(monkeypatch: pytest.MonkeyPatch) -> None:
    _ = fewshot_edge.__version__  # cache the real value, so that monkeypatch puts it back afterwards

    def no_metadata(name: str) -> str:
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "version", no_metadata)
    monkeypatch.delattr(fewshot_edge, "__version__")
    assert fewshot_edge.__version__ == "0+unknown"


def test_cli_prints_the_version() -> None:
    from fewshot_edge.cli import main

    result = CliRunner().invoke(main, ["--version"])
    assert result.exit_code == 0, result.output
    assert result.output.strip() == f"fewshot-edge, version {pyproject_version()}"


def test_import_stays_light() -> None:
    """``import fewshot_edge`` (which every runtime import pays) loads neither metadata nor numpy nor torch."""
    code = (
        "import sys; before = set(sys.modules); import fewshot_edge; "
        "import json; print(json.dumps(sorted(set(sys.modules) - before - {'json'})))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    loaded = json.loads(out)
    heavy = [m for m in loaded if m.split(".")[0] in {"numpy", "torch", "onnxruntime", "PIL", "click"}]
    assert not heavy and "importlib.metadata" not in loaded, loaded


PIP = [sys.executable, "-m", "pip"]
OFFLINE = ["--no-deps", "--no-index", "-q"]


def _run(args: list[str | Path], cwd: Path) -> str:
    proc = subprocess.run([str(a) for a in args], cwd=cwd, capture_output=True, text=True)
    assert proc.returncode == 0, f"{' '.join(map(str, args))}\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


# What the fresh environment runs: import the installed runtime for real and report where things are.
_PROBE = r"""
import importlib.util, json, sys
from pathlib import Path
import fewshot_edge, fewshot_edge.runtime
found = {}
for name in sys.argv[1:]:
    package = Path(importlib.util.find_spec(name).origin).parent  # the export half needs torch: not imported
    found[name] = {"dir": str(package), "py_typed": (package / "py.typed").is_file()}
print(json.dumps({"prefix": sys.prefix, "version": fewshot_edge.__version__, "packages": found}))
"""


@pytest.mark.slow
def test_installed_package_ships_py_typed_and_licence(tmp_path: Path) -> None:
    setuptools_version = importlib.metadata.version("setuptools")  # the [dev] extra pins setuptools>=77
    assert int(setuptools_version.split(".")[0]) >= 77, f"setuptools {setuptools_version} cannot build this project"

    # Build from a copy: an in-tree build writes build/ and *.egg-info into the checkout.
    src = tmp_path / "src"
    src.mkdir()
    for name in BUILD_INPUTS:
        path = ROOT / name
        if path.is_dir():
            shutil.copytree(path, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
        else:
            shutil.copy2(path, src / name)
    _run([*PIP, "wheel", *OFFLINE, "--no-build-isolation", "-w", tmp_path / "dist", src], cwd=tmp_path)
    (wheel,) = (tmp_path / "dist").glob("fewshot_edge-*.whl")
    version = pyproject_version()
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
    assert f"fewshot_edge-{version}.dist-info/licenses/LICENSE" in names, sorted(n for n in names if "dist-info" in n)
    for package in TYPED_PACKAGES:
        assert package.replace(".", "/") + "/py.typed" in names, package

    # The sdist carries them too (whoever rebuilds from it, e.g. a distribution, gets the same files).
    build_sdist = "import sys; from setuptools.build_meta import build_sdist; print(build_sdist(sys.argv[1]))"
    sdist_name = _run([sys.executable, "-c", build_sdist, tmp_path / "sdist"], cwd=src).split()[-1]
    with tarfile.open(tmp_path / "sdist" / sdist_name) as tf:
        members = {name.split("/", 1)[1] for name in tf.getnames() if "/" in name}
    assert {"LICENSE", "runtime/py.typed", "export/py.typed", "fewshot_edge/py.typed"} <= members

    # A fresh environment without pip (fast); this environment's pip installs into it.
    env = tmp_path / "venv"
    venv.create(env, with_pip=False, symlinks=sys.platform != "win32")
    python = env / ("Scripts/python.exe" if sys.platform == "win32" else "bin/python")
    _run([*PIP, "--python", python, "install", *OFFLINE, wheel], cwd=tmp_path)

    # Borrow the runtime's dependencies, after the fresh site-packages so the installed package wins.
    purelib = Path(
        _run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], cwd=tmp_path).strip()
    )
    deps = {str(Path(importlib.util.find_spec(m).origin).parent.parent) for m in ("numpy", "onnxruntime", "PIL")}
    (purelib / "borrowed_dependencies.pth").write_text("\n".join(sorted(deps)) + "\n", encoding="utf-8")

    # -I: neither the working directory nor PYTHONPATH can put the checkout on the path.
    report = json.loads(_run([python, "-I", "-c", _PROBE, *TYPED_PACKAGES], cwd=tmp_path))
    prefix = Path(report["prefix"]).resolve()
    assert report["version"] == version
    for package, where in report["packages"].items():
        assert Path(where["dir"]).resolve().is_relative_to(prefix), f"{package} imported from {where['dir']}"
        assert where["py_typed"], f"no py.typed in the installed {package} ({where['dir']})"
