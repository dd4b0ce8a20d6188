"""The bundle: a folder with ``manifest.json`` and the model's ONNX files.

Export writes it with ``write_bundle``; the device opens it with ``open_bundle``, which refuses a
bundle whose format, version, hashes or model id do not check out, with a one-line reason.

``model_id`` is the sha256 of the UTF-8 text made of one ``"<name>:<sha256>\\n"`` line per listed
file, sorted by name. A file's role defaults to its name without suffix (``encoder.onnx`` ->
``encoder``); the runtime embeds with the file whose role is ``encoder``.

Precision variants of the encoder (``encoder.fp16.onnx``, ``encoder.int8.onnx``) are extra files with
roles ``encoder.fp16`` and ``encoder.int8``; the optional ``variants`` mapping records, per precision,
the file's role and what export measured (accuracy on validation episodes, its delta vs fp32, parity).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .errors import FewShotInputError
from .preprocess import InputSpec

FORMAT = "fewshot-edge-bundle"
FORMAT_VERSION = 2  # the newest format this runtime reads; it reads every one from 1
MANIFEST = "manifest.json"
METRICS = ("sqeuclidean", "cosine")
OPEN_SET_STATISTICS = ("nearest_distance",)
OPEN_SET_BY_SHOTS = (
    "thresholds_by_shots",
    "false_accept_by_shots",
    "false_reject_by_shots",
)  # OpenSet's per-shot-count fields

PRECISIONS = ("fp32", "fp16", "int8")

FileSource = str | Path | bytes


def encoder_role(precision: str) -> str:
    """The role of the encoder file of a precision: "encoder" for fp32, else "encoder.<precision>"."""
    if precision not in PRECISIONS:
        raise FewShotInputError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    return "encoder" if precision == "fp32" else f"encoder.{precision}"


def format_version(spec: InputSpec) -> int:
    """The oldest format that says everything about a bundle with this input spec: 2 when it crops
    (``crop_mode`` "center" or ``crop_pct`` below 1), since a format-1 runtime would ignore those keys
    and squash every image; else 1, so runtimes from before 2 still open the bundle."""
    return 2 if spec.crop_mode != "squash" or spec.crop_pct != 1.0 else 1


@dataclass(frozen=True)
class EmbeddingSpec:
    """Embedding size and the metric prototypes are compared with; ``scale`` multiplies the logits."""

    size: int
    metric: str = "sqeuclidean"
    scale: float = 1.0

    def __post_init__(self) -> None:
        if self.size < 1:
            raise FewShotInputError(f"embedding size must be positive, got {self.size}")
        if self.metric not in METRICS:
            raise FewShotInputError(f"embedding metric must be one of {', '.join(METRICS)}, got {self.metric!r}")
        if not self.scale > 0:
            raise FewShotInputError(f"embedding scale must be positive, got {self.scale}")


@dataclass(frozen=True)
class OpenSet:
    """The open-set test: a query whose nearest-prototype distance (squared Euclidean, or 1 - cosine
    for the cosine metric; unscaled) exceeds ``threshold_for(shots of the nearest class)`` is "unknown".

    ``threshold`` is the one pooled over every shot count (the only one in older bundles);
    ``thresholds_by_shots`` maps a shot count to its own threshold. ``None`` = never unknown.
    The other fields record how the thresholds were fitted (``false_*`` for the pooled one,
    ``false_*_by_shots`` per shot count). In JSON the shot counts are string keys.
    """

    threshold: float | None = None
    statistic: str = "nearest_distance"
    target_false_reject: float | None = None
    false_accept: float | None = None
    false_reject: float | None = None
    fitted_on: str | None = None
    thresholds_by_shots: Mapping[int, float] | None = None
    false_accept_by_shots: Mapping[int, float] | None = None
    false_reject_by_shots: Mapping[int, float] | None = None

    def __post_init__(self) -> None:
        if self.threshold is not None:
            object.__setattr__(self, "threshold", float(self.threshold))
        if self.statistic not in OPEN_SET_STATISTICS:
            raise FewShotInputError(
                f"open-set statistic {self.statistic!r} is not supported (supported: {', '.join(OPEN_SET_STATISTICS)})"
            )
        for name in OPEN_SET_BY_SHOTS:
            by_shots = getattr(self, name)
            if by_shots is not None:
                by_shots = dict(sorted((int(k), float(v)) for k, v in by_shots.items()))
                if any(k < 1 for k in by_shots):
                    raise FewShotInputError(f"open-set {name} keys must be shot counts >= 1, got {sorted(by_shots)}")
                object.__setattr__(self, name, by_shots)

    def threshold_for(self, shots: int) -> float | None:
        """The threshold for a nearest class with ``shots`` shots: that count's own, the largest
        fitted count's beyond it, the pooled ``threshold`` for a count without one."""
        if not self.thresholds_by_shots:
            return self.threshold
        return self.thresholds_by_shots.get(min(shots, max(self.thresholds_by_shots)), self.threshold)

    def to_dict(self) -> dict[str, Any]:
        """The JSON form: ``asdict`` with the shot counts as string keys."""
        d = asdict(self)
        for name in OPEN_SET_BY_SHOTS:
            if d[name] is not None:
                d[name] = {str(k): v for k, v in d[name].items()}
        return d


@dataclass(frozen=True)
class Calibration:
    """Softmax temperature (logits are divided by it) and the open-set test."""

    temperature: float = 1.0
    open_set: OpenSet = field(default_factory=OpenSet)

    def __post_init__(self) -> None:
        if not self.temperature > 0:
            raise FewShotInputError(f"calibration temperature must be positive, got {self.temperature}")


@dataclass(frozen=True)
class Adaptation:
    """The adaptation modes the model supports, each with its parameters, and the default one."""

    default: str = "prototype"
    modes: Mapping[str, Mapping[str, Any]] = field(default_factory=lambda: {"prototype": {}})

    def __post_init__(self) -> None:
        if self.default not in self.modes:
            raise FewShotInputError(
                f"default adaptation mode {self.default!r} is not among the modes ({', '.join(self.modes)})"
            )


@dataclass(frozen=True)
class FileEntry:
    sha256: str
    role: str


@dataclass(frozen=True)
class Manifest:
    """Everything ``manifest.json`` says, typed."""

    model_id: str
    files: Mapping[str, FileEntry]
    input_spec: InputSpec
    embedding: EmbeddingSpec
    adaptation: Adaptation = field(default_factory=Adaptation)
    calibration: Calibration = field(default_factory=Calibration)
    provenance: Mapping[str, Any] = field(default_factory=dict)
    variants: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        variants = {"variants": {k: dict(v) for k, v in self.variants.items()}} if self.variants else {}
        return {
            "format": FORMAT,
            "format_version": format_version(self.input_spec),
            "model_id": self.model_id,
            "files": {name: asdict(entry) for name, entry in sorted(self.files.items())},
            "input": self.input_spec.to_dict(),
            "embedding": asdict(self.embedding),
            "adaptation": {
                "default": self.adaptation.default,
                "modes": {k: dict(v) for k, v in self.adaptation.modes.items()},
            },
            "calibration": {
                "temperature": self.calibration.temperature,
                "open_set": self.calibration.open_set.to_dict(),
            },
            "provenance": dict(self.provenance),
            **variants,
        }

    @classmethod
    def from_dict(cls, d: Any) -> Manifest:
        """Parse a manifest dict; a wrong format, unknown version or missing key raises FewShotInputError."""
        if not isinstance(d, dict):
            raise FewShotInputError("manifest.json must hold a JSON object")
        if d.get("format") != FORMAT:
            raise FewShotInputError(f"not a {FORMAT} manifest (format={d.get('format')!r})")
        version = d.get("format_version")
        if isinstance(version, bool) or not isinstance(version, int) or not 1 <= version <= FORMAT_VERSION:
            raise FewShotInputError(
                f"bundle format_version {version!r} is not supported (this runtime reads 1 to {FORMAT_VERSION})"
            )
        try:
            for key in ("channels", "height", "width"):
                _get(d, "input", key)
            open_set = _get(d, "calibration", "open_set", default={})
            return cls(
                model_id=str(_get(d, "model_id")),
                files={
                    str(name): FileEntry(str(_get(d, "files", name, "sha256")), str(_get(d, "files", name, "role")))
                    for name in _get(d, "files")
                },
                input_spec=InputSpec.from_dict(_get(d, "input")),
                embedding=EmbeddingSpec(
                    size=int(_get(d, "embedding", "size")),
                    metric=str(_get(d, "embedding", "metric", default="sqeuclidean")),
                    scale=float(_get(d, "embedding", "scale", default=1.0)),
                ),
                adaptation=Adaptation(
                    default=str(_get(d, "adaptation", "default")), modes=dict(_get(d, "adaptation", "modes"))
                ),
                calibration=Calibration(
                    temperature=float(_get(d, "calibration", "temperature", default=1.0)),
                    open_set=OpenSet(**{k: v for k, v in open_set.items() if k in OpenSet.__dataclass_fields__}),
                ),
                provenance=dict(_get(d, "provenance", default={})),
                variants={str(k): dict(v) for k, v in _get(d, "variants", default={}).items()},
            )
        except FewShotInputError:
            raise
        except KeyError as exc:
            raise FewShotInputError(f"manifest.json misses key {exc.args[0]!r}") from None
        except (TypeError, ValueError, AttributeError) as exc:
            raise FewShotInputError(f"manifest.json has an invalid field ({exc})") from None


_REQUIRED = object()


def _get(d: Any, *path: str, default: Any = _REQUIRED) -> Any:
    """``d[path[0]][path[1]]...``; a missing required key raises KeyError naming the dotted path."""
    value = d
    for key in path:
        if not isinstance(value, dict):
            raise TypeError(f"{'.'.join(path[:-1])} must be an object")
        if key not in value:
            if default is _REQUIRED:
                raise KeyError(".".join(path))
            return default
        value = value[key]
    return value


@dataclass(frozen=True)
class Bundle:
    """An opened, verified bundle."""

    path: Path
    manifest: Manifest

    @property
    def model_id(self) -> str:
        return self.manifest.model_id

    def file(self, role: str) -> Path:
        """The path of the file with this role (e.g. "encoder")."""
        for name, entry in self.manifest.files.items():
            if entry.role == role:
                return self.path / name
        raise FewShotInputError(f"bundle {self.path} has no file with role {role!r}")

    @property
    def precisions(self) -> list[str]:
        """The encoder precisions this bundle has a file for, fp32 first."""
        roles = {entry.role for entry in self.manifest.files.values()}
        return [p for p in PRECISIONS if encoder_role(p) in roles]

    def encoder_file(self, precision: str = "fp32") -> Path:
        """The encoder file of ``precision``; a precision the bundle lacks is a FewShotInputError."""
        role = encoder_role(precision)
        if precision not in self.precisions:
            raise FewShotInputError(
                f"bundle {self.path} has no {precision} encoder (it has: {', '.join(self.precisions)});"
                f" export it with --{precision}"
            )
        return self.file(role)


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def compute_model_id(file_hashes: Mapping[str, str]) -> str:
    """sha256 over the sorted ``"name:sha256\\n"`` lines of the model files."""
    text = "".join(f"{name}:{file_hashes[name]}\n" for name in sorted(file_hashes))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def open_bundle(path: str | Path) -> Bundle:
    """Open a bundle folder, verifying format, version, every file's sha256 and the model id."""
    root = Path(path)
    manifest_path = root / MANIFEST
    if not manifest_path.is_file():
        raise FewShotInputError(f"bundle {root}: {MANIFEST} not found")
    try:
        raw = json.loads(manifest_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise FewShotInputError(f"bundle {root}: {MANIFEST} is not valid JSON ({exc})") from None
    try:
        manifest = Manifest.from_dict(raw)
    except FewShotInputError as exc:
        raise FewShotInputError(f"bundle {root}: {exc}") from None
    if not any(entry.role == "encoder" for entry in manifest.files.values()):
        raise FewShotInputError(f"bundle {root}: no file with role 'encoder'")
    for name, entry in manifest.files.items():
        file_path = root / name
        if not _is_plain_name(name) or not file_path.is_file():
            raise FewShotInputError(f"bundle {root}: file {name} listed in the manifest is missing")
        if sha256_file(file_path) != entry.sha256:
            raise FewShotInputError(f"bundle {root}: {name} does not match its sha256 (modified or corrupt)")
    if compute_model_id({n: e.sha256 for n, e in manifest.files.items()}) != manifest.model_id:
        raise FewShotInputError(f"bundle {root}: model_id does not match the file hashes")
    return Bundle(root, manifest)


def write_bundle(
    out_dir: str | Path,
    files: Mapping[str, FileSource],
    *,
    input_spec: InputSpec,
    embedding: EmbeddingSpec,
    adaptation: Adaptation = Adaptation(),
    calibration: Calibration = Calibration(),
    provenance: Mapping[str, Any] | None = None,
    roles: Mapping[str, str] | None = None,
    overwrite: bool = False,
    variants: Mapping[str, Mapping[str, Any]] | None = None,
) -> Bundle:
    """Write a bundle atomically: files (name -> source path or bytes) and manifest go to a temporary
    folder beside ``out_dir`` that is renamed into place, so no reader ever sees half a bundle.
    Hashes and model id are computed here; ``roles`` overrides the name-derived roles."""
    out = Path(out_dir)
    if out.exists() and not overwrite:
        raise FewShotInputError(f"bundle folder already exists: {out} (pass overwrite=True to replace it)")
    for name in files:
        if not _is_plain_name(name) or name == MANIFEST:
            raise FewShotInputError(f"bundle file name must be a plain file name other than {MANIFEST}, got {name!r}")
    roles = {name: (roles or {}).get(name, Path(name).stem) for name in files}
    if "encoder" not in roles.values():
        raise FewShotInputError("a bundle needs a file with role 'encoder'")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        os.chmod(tmp, 0o755)
        for name, source in files.items():
            if isinstance(source, bytes):
                (tmp / name).write_bytes(source)
            else:
                shutil.copyfile(source, tmp / name)
        hashes = {name: sha256_file(tmp / name) for name in files}
        manifest = Manifest(
            model_id=compute_model_id(hashes),
            files={name: FileEntry(hashes[name], roles[name]) for name in files},
            input_spec=input_spec,
            embedding=embedding,
            adaptation=adaptation,
            calibration=calibration,
            provenance=dict(provenance or {}),
            variants=dict(variants or {}),
        )
        (tmp / MANIFEST).write_text(json.dumps(manifest.to_dict(), indent=2) + "\n", encoding="utf-8")
        for name in [*files, MANIFEST]:
            _fsync(tmp / name)
        _replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return Bundle(out, manifest)


def _is_plain_name(name: str) -> bool:
    return bool(name) and name not in (".", "..") and "/" not in name and "\\" not in name


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _replace_dir(new: Path, target: Path) -> None:
    """Move ``new`` to ``target``; an existing target is moved aside first and removed after."""
    old = None
    if target.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".old", dir=target.parent))
        os.rename(target, old / target.name)
    os.rename(new, target)
    _fsync(target.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
