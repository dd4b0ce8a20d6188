"""The enrollment store: enrolled classes and their shots in one SQLite file, bound to one model.

Each shot keeps its embedding (float32), its preprocessed input (uint8 (C, H, W) after
``to_pixels``) and the sha256 of its source, so FiLM can recompute context and a device can
re-embed everything after a model update. WAL mode and a busy timeout let one writer and several
reader processes share the file; every change is one ``BEGIN IMMEDIATE ... COMMIT`` transaction that
also bumps ``data_version``, which readers poll to refit only when the enrolled set changed.

It also keeps what an adaptation mode fitted (e.g. a fine-tuned head) tagged with the data_version it
was fitted on, so a restart reuses it while the enrolled set is unchanged, and the store's preferred
adaptation mode. Neither bumps ``data_version``: they are derived from the shots, not part of them.
"""

from __future__ import annotations

import io
import os
import sqlite3
import threading
import unicodedata
import zipfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar, cast

import numpy as np

from .errors import FewShotInputError

T = TypeVar("T")

SCHEMA_VERSION = 2
RESERVED_LABEL = "unknown"
MAX_LABEL_LENGTH = 64
_FORBIDDEN_LABEL_CHARS = "/\\'\""

# what a damaged, locked, read-only or full file raises from sqlite (text that is not UTF-8 included)
_DB_ERRORS = (sqlite3.Error, UnicodeDecodeError)

_NOW = "(strftime('%Y-%m-%dT%H:%M:%fZ', 'now'))"
_SCHEMA = (
    "CREATE TABLE meta (key TEXT PRIMARY KEY, value NOT NULL)",
    f"CREATE TABLE classes (id INTEGER PRIMARY KEY, label TEXT NOT NULL UNIQUE, created TEXT NOT NULL DEFAULT {_NOW})",
    "CREATE TABLE shots (id INTEGER PRIMARY KEY,"
    " class_id INTEGER NOT NULL REFERENCES classes(id) ON DELETE CASCADE,"
    f" embedding BLOB NOT NULL, pixels BLOB NOT NULL, source_hash TEXT NOT NULL, created TEXT NOT NULL DEFAULT {_NOW})",
    "CREATE INDEX shots_by_class ON shots(class_id)",
)
_MIGRATIONS = {  # schema version -> statements that bring it to the next one
    1: ("CREATE TABLE adapter_state (key TEXT PRIMARY KEY, data_version INTEGER NOT NULL, state BLOB NOT NULL)",),
}


# Characters a label must not hold, by Unicode category: controls, format characters (zero-width
# spaces and joiners, the bidi embeddings, overrides and isolates), line and paragraph separators,
# surrogates, private use and unassigned code points: all invisible or rendered unpredictably.
_FORBIDDEN_CATEGORIES = {
    "Cc": "control",
    "Cf": "invisible format (e.g. zero-width or bidi-override)",
    "Zl": "line separator",
    "Zp": "paragraph separator",
    "Cs": "surrogate",
    "Co": "private-use",
    "Cn": "unassigned",
}


def normalize_label(label: str) -> str:
    """A label as stored: Unicode NFC (so composed and decomposed accents are one label), every space
    character (no-break, thin, ...) a plain space, surrounding space stripped."""
    text = unicodedata.normalize("NFC", label)
    return "".join(" " if unicodedata.category(ch) == "Zs" else ch for ch in text).strip()


def validate_label(label: str) -> str:
    """The label normalised (``normalize_label``: NFC, plain spaces, stripped), or FewShotInputError
    saying in one line why it cannot be a label; labels that render the same normalise to one."""
    if not isinstance(label, str):
        raise FewShotInputError(f"label must be a string, got {type(label).__name__}")
    text = normalize_label(label)
    if not text:
        raise FewShotInputError("label is empty")
    if len(text) > MAX_LABEL_LENGTH:
        raise FewShotInputError(f"label is longer than {MAX_LABEL_LENGTH} characters ({len(text)})")
    for ch in text:
        if ch in _FORBIDDEN_LABEL_CHARS:
            raise FewShotInputError(f"label must not contain {ch!r}: {text!r}")
        kind = _FORBIDDEN_CATEGORIES.get(unicodedata.category(ch))
        if kind is not None:
            raise FewShotInputError(f"label must not contain {kind} characters (U+{ord(ch):04X}): {ascii(text)}")
    if text.lower() == RESERVED_LABEL:
        raise FewShotInputError(f"label {RESERVED_LABEL!r} is reserved for open-set answers")
    return text


@dataclass(frozen=True)
class Shots:
    """Every stored shot, read in one transaction, grouped by class in enrollment order."""

    ids: np.ndarray  # (S,) int64 shot ids
    labels: list[str]  # (C,) class labels in enrollment order
    targets: np.ndarray  # (S,) int64 index into labels
    embeddings: np.ndarray  # (S, D) float32
    pixels: np.ndarray | None  # (S, C, H, W) uint8, or None when not asked for
    version: int  # the data_version these shots belong to


@dataclass(frozen=True)
class NewShots:
    """Shots for one class, as ``add_many`` takes them: embeddings (N, D), pixels (N, C, H, W) uint8 and
    the sha256 of each shot's source."""

    label: str
    embeddings: np.ndarray
    pixels: np.ndarray
    hashes: Sequence[str]


@dataclass(frozen=True)
class Added:
    """What ``add_many`` did: the data_version after it, and label -> indices of the shots skipped as
    already stored (only with ``skip_duplicates``)."""

    version: int
    skipped: dict[str, list[int]]


class EnrollmentStore:
    """Enrolled classes and shots in SQLite, bound to one model id. Open with ``EnrollmentStore.open``."""

    def __init__(self, conn: sqlite3.Connection, model_id: str, bound_model_id: str, name: str) -> None:
        self._conn = conn
        self._lock = threading.RLock()  # one connection, shared by threads: one user at a time
        self.model_id = model_id
        self.bound_model_id = bound_model_id
        self.name = name

    @classmethod
    def open(
        cls,
        path: str | os.PathLike[str] | None,
        model_id: str,
        reembed: bool = False,
        timeout: float = 30.0,
        create: bool = True,
    ) -> EnrollmentStore:
        """Open the store at ``path`` (None = in memory) for ``model_id``, creating it unless ``create``
        is false: then a missing or empty (zero-byte) file is refused and left as it is.

        A store bound to another model is refused unless ``reembed``; then ``needs_reembed`` is true
        and the caller re-embeds ``shots()`` and calls ``rebind`` before enrolling more.
        ``timeout`` is how long to wait for another process's write lock, in seconds.

        One store may be shared by threads: every use of its connection holds the store's lock.
        """
        name = store_path(path)
        if name != ":memory:" and not create and not _holds_data(name):
            raise FewShotInputError(f"no enrollment store at {name}; enroll classes first")
        conn = None
        try:
            conn = sqlite3.connect(name, timeout=timeout, isolation_level=None, check_same_thread=False)
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA foreign_keys=ON")
            bound = _initialise(conn, model_id)
        except (*_DB_ERRORS, FewShotInputError) as exc:
            if conn is not None:
                conn.close()
            raise FewShotInputError(f"cannot open enrollment store {name}: {_one_line(exc)}") from None
        if bound != model_id and not reembed:
            conn.close()
            raise FewShotInputError(
                f"enrollment store {name} is bound to model {bound[:12]}, not {model_id[:12]};"
                " open it with reembed=True to re-embed its shots with the new model"
            )
        return cls(conn, model_id, bound, name)

    @property
    def needs_reembed(self) -> bool:
        """True while the file holds embeddings of another model (opened with reembed=True)."""
        return self.bound_model_id != self.model_id

    @property
    def pixel_shape(self) -> tuple[int, ...] | None:
        """(C, H, W) of the stored pixels, or None before the first shot."""
        value = self._read(lambda conn: self._meta(conn, "pixel_shape"))
        return None if value is None else tuple(int(v) for v in value.split(","))

    def data_version(self) -> int:
        """A counter bumped by every committed change, by any process."""
        return self._read(_data_version)

    @property
    def adaptation(self) -> str | None:
        """The adaptation mode this store was last set to use (``set_adaptation``), or None."""
        return self._read(lambda conn: self._meta(conn, "adaptation"))

    def set_adaptation(self, mode: str) -> None:
        """Remember ``mode`` as this store's adaptation mode (models opened without one use it)."""
        self._derived(lambda conn: self._set_meta(conn, "adaptation", mode))

    def load_state(self, key: str, version: int) -> dict[str, np.ndarray] | None:
        """The arrays saved under ``key`` if they were fitted on data_version ``version``, else None."""
        row = self._read(
            lambda conn: conn.execute("SELECT data_version, state FROM adapter_state WHERE key = ?", (key,)).fetchone()
        )
        if row is None or row[0] != version or self.needs_reembed:
            return None
        try:
            with np.load(io.BytesIO(row[1]), allow_pickle=False) as saved:
                return {name: saved[name] for name in saved.files}
        except (ValueError, OSError, EOFError, KeyError, TypeError, zipfile.BadZipFile):
            return None  # a damaged saved state is derived data: the mode fits afresh

    def save_state(self, key: str, version: int, arrays: Mapping[str, np.ndarray]) -> None:
        """Keep ``arrays`` under ``key`` as fitted on data_version ``version``; skipped when the shots
        changed since (the state would be stale) or before a re-embed."""
        buffer = io.BytesIO()
        np.savez(buffer, **cast("dict[str, Any]", arrays))  # numpy's stub types **kwds like allow_pickle

        def change(conn: sqlite3.Connection) -> None:
            if _data_version(conn) == version:
                conn.execute(
                    "INSERT OR REPLACE INTO adapter_state (key, data_version, state) VALUES (?, ?, ?)",
                    (key, version, buffer.getvalue()),
                )

        if not self.needs_reembed:
            self._derived(change)

    def list_classes(self) -> list[tuple[str, int]]:
        """(label, number of shots) per class, in enrollment order."""
        rows = self._read(
            lambda conn: conn.execute(
                "SELECT c.label, count(s.id) FROM classes c LEFT JOIN shots s ON s.class_id = c.id GROUP BY c.id ORDER BY c.id"
            ).fetchall()
        )
        return [(label, n) for label, n in rows]

    def shots(self, pixels: bool = True) -> Shots:
        """All shots with their embeddings (and pixels unless ``pixels=False``), in one read transaction."""

        def read(conn: sqlite3.Connection) -> tuple[list[Any], list[Any], int, str | None, str | None]:
            conn.execute("BEGIN")
            try:
                self._check_binding(conn)
                classes = conn.execute("SELECT id, label FROM classes ORDER BY id").fetchall()
                rows = conn.execute(
                    f"SELECT id, class_id, embedding{', pixels' if pixels else ''} FROM shots ORDER BY class_id, id"
                ).fetchall()
                return (
                    classes,
                    rows,
                    _data_version(conn),
                    self._meta(conn, "embedding_size"),
                    self._meta(conn, "pixel_shape"),
                )
            finally:
                conn.execute("COMMIT")

        classes, rows, version, dim, shape = self._read(read)
        try:
            pixel_shape = None if shape is None else tuple(int(v) for v in str(shape).split(","))
            index = {class_id: i for i, (class_id, _) in enumerate(classes)}
            n = len(rows)
            return Shots(
                ids=np.array([r[0] for r in rows], dtype=np.int64),
                labels=[str(label) for _, label in classes],
                targets=np.array([index[r[1]] for r in rows], dtype=np.int64),
                embeddings=np.frombuffer(b"".join(r[2] for r in rows), dtype="<f4")
                .reshape(n, int(dim or 0))
                .astype(np.float32),
                pixels=np.frombuffer(b"".join(r[3] for r in rows), dtype=np.uint8)
                .reshape(n, *(pixel_shape or (0, 0, 0)))
                .copy()
                if pixels
                else None,
                version=version,
            )
        except (ValueError, TypeError, KeyError) as exc:  # blobs or meta rows that do not fit together
            raise FewShotInputError(
                f"enrollment store {self.name} is damaged: its shots do not match its meta rows ({_one_line(exc)})"
            ) from None

    def add_class(self, label: str, embeddings: np.ndarray, pixels: np.ndarray, hashes: Sequence[str]) -> int:
        """Enroll a new class with its shots; error if the label exists. Returns the new data_version."""
        return self.add_many([NewShots(label, embeddings, pixels, hashes)], new_classes=True).version

    def add_shots(self, label: str, embeddings: np.ndarray, pixels: np.ndarray, hashes: Sequence[str]) -> int:
        """Add shots to an enrolled class. Returns the new data_version."""
        return self.add_many([NewShots(label, embeddings, pixels, hashes)], new_classes=False).version

    def add_many(self, batches: Sequence[NewShots], new_classes: bool, skip_duplicates: bool = False) -> Added:
        """Enroll several new classes (``new_classes``), or add shots to several enrolled ones, all in
        ONE transaction: every class is written or none is. With ``skip_duplicates`` a shot whose source
        hash its class already holds (or that came earlier in the same batch) is skipped, not stored
        twice; ``Added.skipped`` says which. Nothing left to write changes nothing (no version bump)."""
        checked = [_checked(b) for b in batches]
        if not checked:
            raise FewShotInputError("no classes given")
        labels = [b.label for b in checked]
        twice = next((label for i, label in enumerate(labels) if label in labels[:i]), None)
        if twice is not None:
            raise FewShotInputError(f"class {twice!r} is given twice")
        shapes = {(b.embeddings.shape[1], b.pixels.shape[1:]) for b in checked}
        if len(shapes) > 1:
            raise FewShotInputError(f"the classes' shots differ in shape: {sorted(map(str, shapes))}")
        skipped: dict[str, list[int]] = {}

        def change(conn: sqlite3.Connection) -> bool:
            first = checked[0]
            for key, value in (
                ("embedding_size", str(first.embeddings.shape[1])),
                ("pixel_shape", ",".join(map(str, first.pixels.shape[1:]))),
            ):
                stored = self._meta(conn, key)
                if stored is None:
                    self._set_meta(conn, key, value)
                elif stored != value:
                    raise FewShotInputError(f"store holds {key} {stored}, got {value}")
            written = False
            for batch in checked:
                if new_classes:
                    try:
                        class_id = conn.execute("INSERT INTO classes (label) VALUES (?)", (batch.label,)).lastrowid
                    except sqlite3.IntegrityError:
                        raise FewShotInputError(
                            f"class {batch.label!r} already exists; use add_shots to add to it"
                        ) from None
                else:
                    class_id = _class_id(conn, batch.label)
                keep = list(range(len(batch.hashes)))
                if skip_duplicates:
                    seen = {r[0] for r in conn.execute("SELECT source_hash FROM shots WHERE class_id = ?", (class_id,))}
                    keep = []
                    for i, h in enumerate(batch.hashes):
                        if h in seen:
                            skipped.setdefault(batch.label, []).append(i)
                        else:
                            seen.add(h)
                            keep.append(i)
                conn.executemany(
                    "INSERT INTO shots (class_id, embedding, pixels, source_hash) VALUES (?, ?, ?, ?)",
                    (
                        (class_id, batch.embeddings[i].tobytes(), batch.pixels[i].tobytes(), str(batch.hashes[i]))
                        for i in keep
                    ),
                )
                written = written or bool(keep) or new_classes
            return written

        return Added(self._write(change), skipped)

    def remove_shot(self, shot_id: int) -> int:
        """Remove one shot (not a class's last one: remove the class instead). Returns the new data_version."""

        def change(conn: sqlite3.Connection) -> None:
            row = conn.execute("SELECT class_id FROM shots WHERE id = ?", (int(shot_id),)).fetchone()
            if row is None:
                raise FewShotInputError(f"no shot with id {shot_id}")
            if conn.execute("SELECT count(*) FROM shots WHERE class_id = ?", row).fetchone()[0] == 1:
                raise FewShotInputError(f"shot {shot_id} is the last shot of its class; remove the class instead")
            conn.execute("DELETE FROM shots WHERE id = ?", (int(shot_id),))

        return self._write(change)

    def remove_class(self, label: str) -> int:
        """Remove a class and its shots. Returns the new data_version."""

        def change(conn: sqlite3.Connection) -> None:
            conn.execute("DELETE FROM classes WHERE id = ?", (_class_id(conn, label),))

        return self._write(change)

    def rename(self, old: str, new: str) -> int:
        """Rename a class; error if ``new`` is taken. Returns the new data_version."""
        new = validate_label(new)

        def change(conn: sqlite3.Connection) -> None:
            class_id = _class_id(conn, old)
            try:
                conn.execute("UPDATE classes SET label = ? WHERE id = ?", (new, class_id))
            except sqlite3.IntegrityError:
                raise FewShotInputError(f"class {new!r} already exists") from None

        return self._write(change)

    def rebind(self, shot_ids: Sequence[int] | np.ndarray, embeddings: np.ndarray) -> int:
        """Replace every shot's embedding (``shot_ids`` as read by ``shots()``) and bind the store to
        ``model_id``, in one transaction. Fails if the shots changed since they were read."""
        embeddings = _as_embeddings(embeddings)
        if len(embeddings) != len(shot_ids):
            raise FewShotInputError(f"{len(shot_ids)} shot ids but {len(embeddings)} embeddings")

        def change(conn: sqlite3.Connection) -> None:
            stored = sorted(r[0] for r in conn.execute("SELECT id FROM shots"))
            if stored != sorted(int(i) for i in shot_ids):
                raise FewShotInputError("the store changed while re-embedding; open it again to retry")
            conn.executemany(
                "UPDATE shots SET embedding = ? WHERE id = ?",
                ((e.tobytes(), int(i)) for i, e in zip(shot_ids, embeddings, strict=True)),
            )
            self._set_meta(conn, "model_id", self.model_id)
            self._set_meta(conn, "embedding_size", str(embeddings.shape[1]))

        version = self._write(change, rebinding=True)
        self.bound_model_id = self.model_id
        return version

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    def __enter__(self) -> EnrollmentStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _write(self, change: Callable[[sqlite3.Connection], bool | None], rebinding: bool = False) -> int:
        """Run ``change`` in one write transaction that also bumps data_version (unless ``change``
        returns False: nothing changed); return the data_version after it."""
        if self.needs_reembed and not rebinding:
            raise FewShotInputError(
                f"enrollment store {self.name} holds embeddings of model {self.bound_model_id[:12]}; re-embed before changing it"
            )

        def bumped(conn: sqlite3.Connection) -> int:
            if change(conn) is False:
                return _data_version(conn)
            row = conn.execute(
                "UPDATE meta SET value = value + 1 WHERE key = 'data_version' RETURNING value"
            ).fetchone()
            if row is None:
                raise FewShotInputError(_damaged(self.name, "data_version"))
            return int(row[0])

        return self._derived(bumped)

    def _derived(self, change: Callable[[sqlite3.Connection], T]) -> T:
        """Run ``change`` in one write transaction (no data_version bump on its own); return its result.
        A write the file refuses (read-only, disk full, I/O error) is rolled back and reported in one line."""
        with self._lock:
            conn = self._conn
            try:
                conn.execute("BEGIN IMMEDIATE")
                try:
                    self._check_binding(conn)
                    result = change(conn)
                    conn.execute("COMMIT")
                except BaseException:
                    if conn.in_transaction:
                        conn.execute("ROLLBACK")
                    raise
            except _DB_ERRORS as exc:
                raise FewShotInputError(
                    f"cannot write to enrollment store {self.name}: {_one_line(exc)};"
                    " nothing was written, the store is as it was"
                ) from None
            return result

    def _read(self, read: Callable[[sqlite3.Connection], T]) -> T:
        """Run ``read`` on the connection under the store's lock; a file that cannot be read is one line."""
        with self._lock:
            try:
                return read(self._conn)
            except _DB_ERRORS as exc:
                raise FewShotInputError(f"cannot read enrollment store {self.name}: {_one_line(exc)}") from None

    def _check_binding(self, conn: sqlite3.Connection) -> None:
        bound = self._meta(conn, "model_id")
        if bound is None:
            raise FewShotInputError(_damaged(self.name, "model_id"))
        if bound != self.bound_model_id:
            raise FewShotInputError(
                f"enrollment store {self.name} was re-bound to model {str(bound)[:12]} by another process; open it again"
            )

    @staticmethod
    def _meta(conn: sqlite3.Connection, key: str) -> str | None:
        row = conn.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return None if row is None else row[0]

    @staticmethod
    def _set_meta(conn: sqlite3.Connection, key: str, value: object) -> None:
        conn.execute(
            "INSERT INTO meta (key, value) VALUES (?, ?) ON CONFLICT (key) DO UPDATE SET value = excluded.value",
            (key, value),
        )


def _initialise(conn: sqlite3.Connection, model_id: str) -> str:
    """Create the schema in a new file, check the schema version of an old one; return its model id."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        if version == 0:
            if conn.execute("SELECT count(*) FROM sqlite_master").fetchone()[0]:
                raise FewShotInputError("the file holds other tables, not an enrollment store")
            for statement in _SCHEMA:
                conn.execute(statement)
            conn.executemany(
                "INSERT INTO meta (key, value) VALUES (?, ?)", (("model_id", model_id), ("data_version", 0))
            )
            version = 1
        elif version > SCHEMA_VERSION:
            raise FewShotInputError(f"schema version {version} is newer than this runtime reads ({SCHEMA_VERSION})")
        elif version < 0:
            raise FewShotInputError(f"the store is damaged: schema version {version}")
        if version < SCHEMA_VERSION:
            for step in range(version, SCHEMA_VERSION):
                for statement in _MIGRATIONS[step]:
                    conn.execute(statement)
            conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        meta = dict(conn.execute("SELECT key, value FROM meta WHERE key IN ('model_id', 'data_version')"))
        for key in ("model_id", "data_version"):
            if key not in meta:
                raise FewShotInputError(f"the store is damaged: its meta row {key!r} is missing")
        bound = str(meta["model_id"])
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise
    return bound


def store_path(path: object) -> str:
    """The file name sqlite is given for a store path (None = ":memory:"); anything else than a path, or
    an empty one (sqlite would keep a private temporary file, deleted on close), is refused in one line."""
    if path is None:
        return ":memory:"
    if not isinstance(path, (str, os.PathLike)):
        raise FewShotInputError(f"store must be a file path (str or os.PathLike) or None, got {type(path).__name__}")
    name = os.fspath(path)
    if not isinstance(name, str):
        raise FewShotInputError(f"store path must be text, got {type(name).__name__}")
    if not name.strip():
        raise FewShotInputError("store path is empty (pass None for an in-memory store)")
    if "\x00" in name:
        raise FewShotInputError("store path contains a NUL character")
    return name


def _holds_data(name: str) -> bool:
    """Whether ``name`` is a file with something in it (a missing or zero-byte file is no store yet)."""
    try:
        return os.path.isfile(name) and os.path.getsize(name) > 0
    except OSError:
        return False


def _data_version(conn: sqlite3.Connection) -> int:
    row = conn.execute("SELECT value FROM meta WHERE key = 'data_version'").fetchone()
    if row is None:
        raise FewShotInputError(_damaged(None, "data_version"))
    try:
        return int(row[0])
    except (TypeError, ValueError):
        raise FewShotInputError(f"enrollment store is damaged: data_version {row[0]!r} is not a number") from None


def _damaged(name: str | None, key: str) -> str:
    return f"enrollment store{'' if name is None else ' ' + name} is damaged: its meta row {key!r} is missing"


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else exc.__class__.__name__


def _checked(batch: NewShots) -> NewShots:
    """The batch with its label validated and its arrays checked, as ``add_many`` stores them."""
    label = validate_label(batch.label)
    embeddings = _as_embeddings(batch.embeddings)
    pixels = np.ascontiguousarray(batch.pixels, dtype=np.uint8)
    if pixels.ndim != 4:
        raise FewShotInputError(f"pixels must be (N, C, H, W), got shape {pixels.shape}")
    if not len(embeddings) == len(pixels) == len(batch.hashes) > 0:
        raise FewShotInputError(
            f"need one or more shots with matching counts, got {len(embeddings)} embeddings, {len(pixels)} pixels, {len(batch.hashes)} hashes"
        )
    return NewShots(label, embeddings, pixels, [str(h) for h in batch.hashes])


def _class_id(conn: sqlite3.Connection, label: object) -> int:
    row = None
    if isinstance(label, str):
        for key in dict.fromkeys((normalize_label(label), label.strip())):  # a label stored before normalising
            row = conn.execute("SELECT id FROM classes WHERE label = ?", (key,)).fetchone()
            if row is not None:
                break
    if row is None:
        raise FewShotInputError(f"no class {label!r} enrolled")
    return row[0]


def _as_embeddings(embeddings: np.ndarray) -> np.ndarray:
    embeddings = np.ascontiguousarray(embeddings, dtype="<f4")
    if embeddings.ndim != 2:
        raise FewShotInputError(f"embeddings must be (N, D), got shape {embeddings.shape}")
    if not np.isfinite(embeddings).all():
        raise FewShotInputError("embeddings contain NaN or infinite values")
    return embeddings
