"""Ed25519 signatures over a bundle's manifest, and the keys a device trusts.

A signed manifest carries ``"signature": {"algorithm": "ed25519", "key_id": ..., "value": ...}``: ``value``
is the base64 Ed25519 signature of ``SIGNED_PREFIX`` + the canonical JSON of every other top-level
field (``canonical_json``), which includes ``manifest_sha256``, the model id and every file's sha256, so
one signature pins the whole bundle. ``key_id`` is the sha256 (hex) of the raw 32-byte public key; it
names the key, it proves nothing (the signature does).

Keys are PEM files as ``cryptography`` writes them (``fewshot-edge keygen``): a PKCS#8 private key
(``*.key``, kept off devices) and a SubjectPublicKeyInfo public key (``*.pub``/``*.pem``, what a device
trusts). A trusted key may also be given as the raw 32 public-key bytes. ``cryptography`` is the
optional extra ``fewshot-edge[sign]``, imported only when a key is loaded, so a device that trusts no
keys never needs it.
"""

from __future__ import annotations

import base64
import hashlib
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import FewShotInputError

ALGORITHM = "ed25519"
SIGNED_PREFIX = b"fewshot-edge-bundle manifest signature v1\n"  # domain separation: never a valid other message
PUBLIC_KEY_SUFFIXES = (".pub", ".pem")  # the files a keys folder is read for

KeySource = str | Path | bytes
TrustedKeys = KeySource | Sequence[KeySource]


def _crypto() -> Any:
    """The ``cryptography`` Ed25519 module, or a one-line error saying how to install it."""
    try:
        from cryptography.hazmat.primitives.asymmetric import ed25519
    except ImportError:
        raise FewShotInputError(
            "signed bundles need the 'cryptography' package: pip install 'fewshot-edge[sign]'"
        ) from None
    return ed25519


def _raw_public(public_key: Any) -> bytes:
    from cryptography.hazmat.primitives import serialization

    raw: bytes = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return raw


def key_id(raw_public_key: bytes) -> str:
    """The id of a public key: sha256 of its raw 32 bytes, hex."""
    return hashlib.sha256(raw_public_key).hexdigest()


@dataclass(frozen=True)
class SigningKey:
    """A private Ed25519 key loaded for signing (``load_signing_key``)."""

    private_key: Any
    key_id: str

    def public_bytes(self) -> bytes:
        """The raw 32 bytes of the public key (a trusted key as ``load_trusted_keys`` takes it)."""
        return _raw_public(self.private_key.public_key())

    def sign(self, message: bytes) -> dict[str, str]:
        """The manifest's ``signature`` record for ``message`` (the canonical manifest without a signature)."""
        value = self.private_key.sign(SIGNED_PREFIX + message)
        return {"algorithm": ALGORITHM, "key_id": self.key_id, "value": base64.b64encode(value).decode("ascii")}


def load_signing_key(source: KeySource | SigningKey, password: bytes | None = None) -> SigningKey:
    """A private key from a PEM file (or its bytes); anything else is a one-line FewShotInputError."""
    if isinstance(source, SigningKey):
        return source
    ed25519 = _crypto()
    from cryptography.hazmat.primitives import serialization

    data = _read(source, "signing key")
    try:
        key = serialization.load_pem_private_key(data, password=password)
    except (ValueError, TypeError) as exc:
        raise FewShotInputError(
            f"signing key {_name(source)} is not a PEM private key this can read ({_first_line(exc)})"
        ) from None
    if not isinstance(key, ed25519.Ed25519PrivateKey):
        raise FewShotInputError(f"signing key {_name(source)} is not an Ed25519 key")
    return SigningKey(key, key_id(_raw_public(key.public_key())))


def load_trusted_keys(keys: TrustedKeys) -> dict[str, Any]:
    """key id -> public key, from files, folders of them (``*.pub``/``*.pem``), PEM bytes or raw 32 bytes.
    No key at all, or one that does not load, is a one-line FewShotInputError: a device configured to
    trust keys must never fall back to trusting every bundle."""
    sources: list[KeySource] = [keys] if isinstance(keys, (str, Path, bytes)) else list(keys)
    ed25519 = _crypto()
    from cryptography.hazmat.primitives import serialization

    files: list[KeySource] = []
    for source in sources:
        if isinstance(source, (str, Path)) and Path(source).is_dir():
            found = sorted(p for p in Path(source).iterdir() if p.suffix in PUBLIC_KEY_SUFFIXES and p.is_file())
            if not found:
                raise FewShotInputError(
                    f"trusted keys folder {source} holds no public key ({' or '.join(PUBLIC_KEY_SUFFIXES)} files)"
                )
            files += found
        else:
            files.append(source)
    if not files:
        raise FewShotInputError(
            "no trusted keys given (give at least one public key, or none to not require signatures)"
        )
    trusted: dict[str, Any] = {}
    for source in files:
        data = _read(source, "trusted key")
        if len(data) == 32 and not data.startswith(b"-----"):
            key: Any = ed25519.Ed25519PublicKey.from_public_bytes(data)
        else:
            try:
                key = serialization.load_pem_public_key(data)
            except (ValueError, TypeError) as exc:
                raise FewShotInputError(
                    f"trusted key {_name(source)} is not a PEM public key ({_first_line(exc)})"
                ) from None
            if not isinstance(key, ed25519.Ed25519PublicKey):
                raise FewShotInputError(f"trusted key {_name(source)} is not an Ed25519 public key")
        trusted[key_id(_raw_public(key))] = key
    return trusted


def check_signature_shape(signature: Any) -> Mapping[str, str]:
    """The ``signature`` record, checked for shape (not validity); a malformed one is a FewShotInputError."""
    if not isinstance(signature, dict) or set(signature) != {"algorithm", "key_id", "value"}:
        raise FewShotInputError("manifest signature must be an object with algorithm, key_id and value")
    if signature["algorithm"] != ALGORITHM:
        raise FewShotInputError(f"manifest signature algorithm must be {ALGORITHM!r}, got {signature['algorithm']!r}")
    kid, value = signature["key_id"], signature["value"]
    if not isinstance(kid, str) or len(kid) != 64 or any(c not in "0123456789abcdef" for c in kid):
        raise FewShotInputError("manifest signature key_id must be 64 lowercase hex digits")
    try:
        raw = base64.b64decode(value, validate=True) if isinstance(value, str) else b""
    except ValueError:
        raw = b""
    if len(raw) != 64:
        raise FewShotInputError("manifest signature value must be 64 bytes in base64")
    return signature


def verify_signature(signature: Any, message: bytes, trusted: Mapping[str, Any]) -> str:
    """Check ``signature`` (the manifest's record) over ``message`` against the trusted keys; the
    signing key's id, or a one-line FewShotInputError saying why the bundle is refused."""
    if signature is None:
        raise FewShotInputError("bundle is not signed, and this device only runs bundles signed by a trusted key")
    record = check_signature_shape(signature)
    public_key = trusted.get(record["key_id"])
    if public_key is None:
        raise FewShotInputError(
            f"bundle is signed by key {record['key_id'][:16]}, which is not among the {len(trusted)} trusted key(s)"
        )
    from cryptography.exceptions import InvalidSignature

    try:
        public_key.verify(base64.b64decode(record["value"]), SIGNED_PREFIX + message)
    except InvalidSignature:
        raise FewShotInputError(
            f"bundle signature by key {record['key_id'][:16]} does not verify (the manifest was changed after signing)"
        ) from None
    return record["key_id"]


def generate_key_pair(private_path: str | Path, public_path: str | Path) -> str:
    """Write a new Ed25519 key pair as PEM files (the private one readable by its owner only, refused
    when either file exists); its key id."""
    ed25519 = _crypto()
    from cryptography.hazmat.primitives import serialization

    private_path, public_path = Path(private_path), Path(public_path)
    for path in (private_path, public_path):
        if path.exists():
            raise FewShotInputError(f"{path} already exists; not overwriting a key")
    key = ed25519.Ed25519PrivateKey.generate()
    private_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    public_pem = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    try:
        fd = os.open(private_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(private_pem)
        public_path.write_bytes(public_pem)
    except OSError as exc:
        raise FewShotInputError(f"cannot write the key pair: {exc.filename}: {exc.strerror or exc}") from None
    return key_id(_raw_public(key.public_key()))


def _read(source: KeySource, what: str) -> bytes:
    if isinstance(source, bytes):
        return source
    try:
        return Path(source).read_bytes()
    except OSError as exc:
        raise FewShotInputError(f"{what} {source}: {exc.strerror or exc}") from None


def _name(source: KeySource) -> str:
    return "(bytes)" if isinstance(source, bytes) else str(source)


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__
