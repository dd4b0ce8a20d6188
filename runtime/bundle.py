"""The bundle: a folder with ``manifest.json`` and the model's ONNX files.

Export writes it with ``write_bundle``; the device opens it with ``open_bundle``, which refuses a
bundle whose format, version, hashes or model id do not check out, with a one-line reason.

``model_id`` is the sha256 of the UTF-8 text made of one ``"<name>:<sha256>\\n"`` line per listed
file, sorted by name: it names the model files (a store is bound to it), not the manifest.

The manifest's own content is verified too: ``manifest_sha256`` is the sha256 of the canonical JSON
(``canonical_json``) of every other top-level field except ``signature``, so editing any value (invert,
mean/std, thresholds, temperature, metric, a file's hash, the version...) makes open fail. This is
tamper-*evidence* against accidents (a hand edit, a bad copy, a merge tool): whoever edits on purpose
can recompute it, or delete it (a manifest without it reads as one from before it existed). Against
that, sign: ``signature`` (see ``signing.py``) covers the canonical JSON of every other field, and a
device given trusted keys (``open_bundle(..., trusted_keys=...)``) opens only bundles one of them
signed. Neither changes what a field means, so neither raises ``format_version``: a runtime from
before them opens these bundles as before (without checking them). Unknown top-level fields are
refused, so a one-byte edit of a field's name cannot turn the record into an ignored field. A file's role defaults to its name without suffix (``encoder.onnx`` ->
``encoder``); the runtime embeds with the file whose role is ``encoder``.

Precision variants of the encoder (``encoder.fp16.onnx``, ``encoder.int8.onnx``) are extra files with
roles ``encoder.fp16`` and ``encoder.int8``; the optional ``variants`` mapping records, per precision,
the file's role and what export measured (accuracy on validation episodes, its delta vs fp32, parity).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import tempfile
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from . import signing
from .errors import FewShotInputError
from .preprocess import InputSpec
from .signing import SigningKey, TrustedKeys

FORMAT = "fewshot-edge-bundle"
FORMAT_VERSION = 2  # the newest format this runtime reads; it reads every one from 1
MANIFEST = "manifest.json"
INTEGRITY = "manifest_sha256"  # sha256 of the canonical JSON of every other field but the signature
SIGNATURE = "signature"  # see signing.py
FIELDS = (
    "format",
    "format_version",
    "model_id",
    "files",
    "input",
    "embedding",
    "adaptation",
    "calibration",
    "provenance",
    "variants",
    INTEGRITY,
    SIGNATURE,
)  # every top-level field a manifest may have; any other is refused
MAX_MANIFEST_BYTES = 64 << 20
MAX_DEPTH = 32  # nesting of objects and arrays in a manifest (the writer's deepest is 5)
METRICS = ("sqeuclidean", "cosine")
OPEN_SET_STATISTICS = ("nearest_distance",)
OPEN_SET_BY_SHOTS = (
    "thresholds_by_shots",
    "false_accept_by_shots",
    "false_reject_by_shots",
)  # OpenSet's per-shot-count fields

PRECISIONS = ("fp32", "fp16", "int8")
_Pooled = TypeVar("_Pooled", float, float | None)

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
            object.__setattr__(self, name, _by_shots(getattr(self, name), f"open-set {name}"))

    def threshold_for(self, shots: int) -> float | None:
        """The threshold for a nearest class with ``shots`` shots (see ``for_shots``)."""
        return for_shots(self.thresholds_by_shots, shots, self.threshold)

    def to_dict(self) -> dict[str, Any]:
        """The JSON form: ``asdict`` with the shot counts as string keys."""
        d = asdict(self)
        for name in OPEN_SET_BY_SHOTS:
            if d[name] is not None:
                d[name] = {str(k): v for k, v in d[name].items()}
        return d


@dataclass(frozen=True)
class Calibration:
    """Softmax temperature (logits are divided by it) and the open-set test.

    ``temperature`` is the one pooled over every shot count (the only one in older bundles);
    ``temperatures_by_shots`` maps a shot count to its own (prototypes from one shot are noisier than
    from five, so the best temperature falls as shots grow). In JSON the shot counts are string keys.
    """

    temperature: float = 1.0
    open_set: OpenSet = field(default_factory=OpenSet)
    temperatures_by_shots: Mapping[int, float] | None = None

    def __post_init__(self) -> None:
        by_shots = _by_shots(self.temperatures_by_shots, "calibration temperatures_by_shots")
        for value in (self.temperature, *(by_shots or {}).values()):
            if not (value > 0 and math.isfinite(value)):
                raise FewShotInputError(f"calibration temperatures must be positive and finite, got {value}")
        object.__setattr__(self, "temperatures_by_shots", by_shots)

    def temperature_for(self, shots: int) -> float:
        """The temperature for queries whose nearest class has ``shots`` shots (see ``for_shots``)."""
        return for_shots(self.temperatures_by_shots, shots, self.temperature)

    def to_dict(self) -> dict[str, Any]:
        """The JSON form; ``temperatures_by_shots`` only when fitted (older readers ignore it)."""
        d: dict[str, Any] = {"temperature": self.temperature, "open_set": self.open_set.to_dict()}
        if self.temperatures_by_shots is not None:
            d["temperatures_by_shots"] = {str(k): v for k, v in self.temperatures_by_shots.items()}
        return d


def for_shots(by_shots: Mapping[int, float] | None, shots: int, pooled: _Pooled) -> float | _Pooled:
    """A value fitted per shot count, for ``shots``: that count's own, the largest fitted count's
    beyond it, the ``pooled`` one for a count without one (or when none was fitted per count)."""
    if not by_shots:
        return pooled
    return by_shots.get(min(shots, max(by_shots)), pooled)


def _by_shots(by_shots: Mapping[Any, Any] | None, name: str) -> dict[int, float] | None:
    """A per-shot-count mapping as ints to floats, sorted by count (JSON gives string keys)."""
    if by_shots is None:
        return None
    parsed = dict(sorted((int(k), float(v)) for k, v in by_shots.items()))
    if any(k < 1 for k in parsed):
        raise FewShotInputError(f"{name} keys must be shot counts >= 1, got {sorted(parsed)}")
    return parsed


@dataclass(frozen=True)
class Adaptation:
    """The adaptation modes the model supports, each with its parameters, and the default one."""

    default: str = "prototype"
    modes: Mapping[str, Mapping[str, Any]] = field(default_factory=lambda: {"prototype": {}})

    def __post_init__(self) -> None:
        modes: Any = self.modes  # parsed JSON may hold anything: a mode that is null, a list...
        if not isinstance(modes, Mapping) or not all(isinstance(v, Mapping) for v in modes.values()):
            raise FewShotInputError("adaptation modes must map each mode's name to an object of its parameters")
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
            "calibration": self.calibration.to_dict(),
            "provenance": dict(self.provenance),
            **variants,
        }

    @classmethod
    def from_dict(cls, d: Any) -> Manifest:
        """Parse a manifest dict; a wrong format, unknown version or missing key raises FewShotInputError."""
        if not isinstance(d, dict):
            raise FewShotInputError("manifest.json must hold a JSON object")
        unknown = [str(k) for k in d if k not in FIELDS]
        if unknown:
            raise FewShotInputError(f"manifest.json has unknown field(s) {', '.join(map(repr, unknown[:3]))}")
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
            files = _get(d, "files")
            if not isinstance(files, dict):
                raise TypeError("files must be an object")
            return cls(
                model_id=_string(_get(d, "model_id"), "model_id"),
                files={
                    name: FileEntry(
                        _string(_get(d, "files", name, "sha256"), f"files.{name}.sha256"),
                        _string(_get(d, "files", name, "role"), f"files.{name}.role"),
                    )
                    for name in files
                },
                input_spec=InputSpec.from_dict(_get(d, "input")),
                embedding=EmbeddingSpec(
                    size=int(_get(d, "embedding", "size")),
                    metric=str(_get(d, "embedding", "metric", default="sqeuclidean")),
                    scale=float(_get(d, "embedding", "scale", default=1.0)),
                ),
                adaptation=Adaptation(
                    default=_string(_get(d, "adaptation", "default"), "adaptation.default"),
                    modes=_object(_get(d, "adaptation", "modes"), "adaptation.modes"),
                ),
                calibration=Calibration(
                    temperature=float(_get(d, "calibration", "temperature", default=1.0)),
                    open_set=OpenSet(**{k: v for k, v in open_set.items() if k in OpenSet.__dataclass_fields__}),
                    temperatures_by_shots=_get(d, "calibration", "temperatures_by_shots", default=None),
                ),
                provenance=_object(_get(d, "provenance", default={}), "provenance"),
                variants={
                    k: _object(v, f"variants.{k}")
                    for k, v in _object(_get(d, "variants", default={}), "variants").items()
                },
            )
        except FewShotInputError:
            raise
        except KeyError as exc:
            raise FewShotInputError(f"manifest.json misses key {exc.args[0]!r}") from None
        except (TypeError, ValueError, AttributeError, OverflowError, RecursionError) as exc:
            reason = str(exc).splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise FewShotInputError(f"manifest.json has an invalid field ({reason})") from None


def _string(value: Any, where: str) -> str:
    if not isinstance(value, str):
        raise TypeError(f"{where} must be a string")
    return value


def _object(value: Any, where: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise TypeError(f"{where} must be an object")
    return dict(value)


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
    """An opened, verified bundle; ``signed_by`` is the id of the trusted key whose signature was
    verified (None when no trusted keys were given)."""

    path: Path
    manifest: Manifest
    signed_by: str | None = None

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


class _Number(str):
    """A JSON number as written, kept as its text by ``_parse(literal=True)`` for ``canonical_json``."""


def _pairs(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    d = dict(pairs)
    if len(d) != len(pairs):
        raise ValueError(f"duplicate key {next(k for i, (k, _) in enumerate(pairs) if k in dict(pairs[:i]))!r}")
    return d


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def _parse(text: str, literal: bool = False) -> Any:
    """JSON with duplicate keys and NaN/Infinity refused; with ``literal``, numbers stay their text."""
    numbers: dict[str, Any] = {"parse_float": _Number, "parse_int": _Number} if literal else {}
    return json.loads(text, object_pairs_hook=_pairs, parse_constant=_no_constant, **numbers)


def canonical_json(value: Any) -> str:
    """The canonical text of a parsed manifest value: objects with sorted keys, no whitespace, strings
    ASCII-escaped as ``json.dumps`` does, numbers exactly as written (parsed with ``_parse(literal=True)``),
    so changing any digit changes the text, and re-indenting or re-ordering keys does not."""
    if isinstance(value, _Number):
        return str(value)
    if isinstance(value, str) or value is None or isinstance(value, bool):
        return json.dumps(value)
    if isinstance(value, dict):
        return "{" + ",".join(f"{json.dumps(k)}:{canonical_json(value[k])}" for k in sorted(value)) + "}"
    if isinstance(value, list):
        return "[" + ",".join(canonical_json(v) for v in value) + "]"
    raise TypeError(f"not a parsed JSON value: {type(value).__name__}")


def manifest_digest(literal: Mapping[str, Any]) -> str:
    """``manifest_sha256`` of a manifest parsed with ``_parse(literal=True)``: every field but it and the signature."""
    rest = {k: v for k, v in literal.items() if k not in (INTEGRITY, SIGNATURE)}
    return hashlib.sha256(canonical_json(rest).encode("ascii")).hexdigest()


def manifest_sha256(manifest: Mapping[str, Any]) -> str:
    """The ``manifest_sha256`` a manifest dict (as ``Manifest.to_dict`` builds it, or as read and then
    edited on purpose) is written with; its own ``manifest_sha256`` and ``signature`` are left out."""
    try:
        return manifest_digest(_parse(json.dumps(manifest, allow_nan=False), literal=True))
    except ValueError as exc:
        raise FewShotInputError(f"manifest values must be finite JSON numbers ({exc})") from None


def signed_message(literal: Mapping[str, Any]) -> bytes:
    """What a manifest's signature signs: the canonical JSON of every field but the signature."""
    return canonical_json({k: v for k, v in literal.items() if k != SIGNATURE}).encode("ascii")


def _depth(value: Any) -> int:
    """How deep objects and arrays nest in ``value`` (0 for a scalar), without recursion."""
    deepest, stack = 0, [(value, 0)]
    while stack:
        item, depth = stack.pop()
        children = item.values() if isinstance(item, dict) else item if isinstance(item, list) else None
        if children is not None:
            deepest = max(deepest, depth + 1)
            if deepest > MAX_DEPTH:
                return deepest
            stack.extend((child, depth + 1) for child in children)
    return deepest


def read_manifest(data: bytes, trusted: Mapping[str, Any] | None = None) -> tuple[Manifest, str | None]:
    """Parse and verify the bytes of a ``manifest.json``: JSON, nesting, ``manifest_sha256``, then (with
    ``trusted``: key id -> public key, from ``signing.load_trusted_keys``) the signature, then every
    field. The manifest and the id of the key that signed it (None unless verified); anything wrong is a
    one-line FewShotInputError, never another exception."""
    if len(data) > MAX_MANIFEST_BYTES:
        raise FewShotInputError(f"{MANIFEST} is larger than {MAX_MANIFEST_BYTES >> 20} MiB")
    try:
        text = data.decode("utf-8")
        raw, literal = _parse(text), _parse(text, literal=True)
    except (ValueError, RecursionError) as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        reason = str(exc).splitlines()[0] if str(exc).strip() else "nested too deeply"
        raise FewShotInputError(f"{MANIFEST} is not valid JSON ({reason})") from None
    if _depth(raw) > MAX_DEPTH:
        raise FewShotInputError(f"{MANIFEST} nests objects or arrays deeper than {MAX_DEPTH} levels")
    if not isinstance(raw, dict):
        raise FewShotInputError(f"{MANIFEST} must hold a JSON object")
    if INTEGRITY in raw:
        if raw[INTEGRITY] != manifest_digest(literal):
            raise FewShotInputError(
                f"{MANIFEST} does not match its {INTEGRITY} (the manifest was modified or is corrupt)"
            )
    elif SIGNATURE in raw:
        raise FewShotInputError(f"{MANIFEST} is signed but has no {INTEGRITY}")
    if SIGNATURE in raw:
        signing.check_signature_shape(raw[SIGNATURE])  # a malformed signature is an error even unverified
    signed_by = None
    if trusted is not None:
        signed_by = signing.verify_signature(raw.get(SIGNATURE), signed_message(literal), trusted)
    return Manifest.from_dict(raw), signed_by


def open_bundle(path: str | Path, trusted_keys: TrustedKeys | None = None) -> Bundle:
    """Open a bundle folder, verifying format, version, the manifest's own digest, every file's sha256
    and the model id. With ``trusted_keys`` (public key files or bytes, or folders of ``*.pub``/``*.pem``
    files; see ``signing.load_trusted_keys``) the manifest must also carry a valid signature by one of
    them: an unsigned bundle, or one signed by another key, is refused."""
    root = Path(path)
    trusted = signing.load_trusted_keys(trusted_keys) if trusted_keys is not None else None
    manifest_path = root / MANIFEST
    if not manifest_path.is_file():
        raise FewShotInputError(f"bundle {root}: {MANIFEST} not found")
    try:
        data = manifest_path.read_bytes()
    except OSError as exc:
        raise FewShotInputError(f"bundle {root}: {MANIFEST} cannot be read ({exc.strerror or exc})") from None
    try:
        manifest, signed_by = read_manifest(data, trusted)
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
    return Bundle(root, manifest, signed_by)


def manifest_text(manifest: Manifest, signing_key: SigningKey | None = None) -> str:
    """The text of ``manifest.json``: the manifest's fields, its ``manifest_sha256`` and, with a
    ``signing_key``, its signature."""
    if not math.isfinite(manifest.embedding.scale):  # the temperatures are checked by Calibration
        raise FewShotInputError(f"manifest values must be finite, got {manifest.embedding.scale}")
    return _sealed_text(manifest.to_dict(), signing_key)


def _sealed_text(fields: Mapping[str, Any], signing_key: SigningKey | None) -> str:
    """``fields`` as indented JSON, with ``manifest_sha256`` (any old one and any signature replaced) and,
    with a ``signing_key``, a signature."""
    d = {k: v for k, v in fields.items() if k not in (INTEGRITY, SIGNATURE)}
    d[INTEGRITY] = manifest_sha256(d)
    if signing_key is not None:
        d[SIGNATURE] = signing_key.sign(signed_message(_parse(json.dumps(d), literal=True)))
    return json.dumps(d, indent=2) + "\n"


def seal_bundle(
    path: str | Path,
    signing_key: SigningKey | str | Path | bytes | None = None,
    trusted_keys: TrustedKeys | None = None,
) -> Bundle:
    """Rewrite the manifest of the bundle at ``path`` (opened and verified first, with ``trusted_keys``
    when given) with its ``manifest_sha256`` and, with a ``signing_key`` (a key or its PEM file), a
    signature (replacing any old one). Every other field stays as written (an old manifest stays in its
    format) and the files are not touched, so the model id stays. The manifest is replaced atomically."""
    key = signing.load_signing_key(signing_key) if signing_key is not None else None
    bundle = open_bundle(path, trusted_keys)
    text = _sealed_text(json.loads((bundle.path / MANIFEST).read_text(encoding="utf-8")), key)
    tmp = bundle.path / f".{MANIFEST}.tmp"
    try:
        tmp.write_text(text, encoding="utf-8")
        _fsync(tmp)
        os.replace(tmp, bundle.path / MANIFEST)
        _fsync(bundle.path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise FewShotInputError(
            f"bundle {bundle.path}: cannot rewrite {MANIFEST} ({exc.strerror or exc}); it is unchanged"
        ) from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return open_bundle(bundle.path, [key.public_bytes()] if key is not None else None)  # the signature verifies


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
    signing_key: SigningKey | str | Path | bytes | None = None,
) -> Bundle:
    """Write a bundle atomically: files (name -> source path or bytes) and manifest go to a temporary
    folder beside ``out_dir`` that is renamed into place, so no reader ever sees half a bundle.
    Hashes, model id and ``manifest_sha256`` are computed here; ``roles`` overrides the name-derived
    roles; ``signing_key`` (a ``SigningKey`` or a PEM private key file) signs the manifest."""
    key = signing.load_signing_key(signing_key) if signing_key is not None else None
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
        (tmp / MANIFEST).write_text(manifest_text(manifest, key), encoding="utf-8")
        for name in [*files, MANIFEST]:
            _fsync(tmp / name)
        _replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return Bundle(out, manifest, key.key_id if key is not None else None)


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
