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
import sqlite3
import unicodedata
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar, cast

import numpy as np

from .errors import FewShotInputError

T = TypeVar("T")

SCHEMA_VERSION = 2
RESERVED_LABEL = "unknown"
MAX_LABEL_LENGTH = 64
_FORBIDDEN_LABEL_CHARS = "/\\'\""

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


def validate_label(label: str) -> str:
    """The label stripped of surrounding space, or FewShotInputError saying why it cannot be a label."""
    if not isinstance(label, str):
        raise FewShotInputError(f"label must be a string, got {type(label).__name__}")
    text = label.strip()
    if not text:
        raise FewShotInputError("label is empty")
    if len(text) > MAX_LABEL_LENGTH:
        raise FewShotInputError(f"label is longer than {MAX_LABEL_LENGTH} characters ({len(text)})")
    for ch in text:
        if ch in _FORBIDDEN_LABEL_CHARS:
            raise FewShotInputError(f"label must not contain {ch!r}: {text!r}")
        if unicodedata.category(ch) in ("Cc", "Zl", "Zp"):
            raise FewShotInputError(f"label must not contain control characters: {text!r}")
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


class EnrollmentStore:
    """Enrolled classes and shots in SQLite, bound to one model id. Open with ``EnrollmentStore.open``."""

    def __init__(self, conn: sqlite3.Connection, model_id: str, bound_model_id: str, name: str) -> None:
        self._conn = conn
        self.model_id = model_id
        self.bound_model_id = bound_model_id
        self.name = name

    @classmethod
    def open(
        cls, path: str | Path | None, model_id: str, reembed: bool = False, timeout: float = 30.0
    ) -> EnrollmentStore:
        """Open (creating if needed) the store at ``path`` (None = in memory) for ``model_id``.

        A store bound to another model is refused unless ``reembed``; then ``needs_reembed`` is true
        and the caller re-embeds ``shots()`` and calls ``rebind`` before enrolling more.
        ``timeout`` is how long to wait for another process's write lock, in seconds.
        """
        name = ":memory:" if path is None else str(path)
        conn = None
        try:
            conn = sqlite3.connect(name, timeout=timeout, isolation_level=None)
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA foreign_keys=ON")
            bound = _initialise(conn, model_id)
        except (sqlite3.DatabaseError, FewShotInputError) as exc:
            if conn is not None:
                conn.close()
            raise FewShotInputError(f"cannot open enrollment store {name}: {exc}") from None
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
        value = self._meta(self._conn, "pixel_shape")
        return None if value is None else tuple(int(v) for v in value.split(","))

    def data_version(self) -> int:
        """A counter bumped by every committed change, by any process."""
        return self._conn.execute("SELECT value FROM meta WHERE key = 'data_version'").fetchone()[0]

    @property
    def adaptation(self) -> str | None:
        """The adaptation mode this store was last set to use (``set_adaptation``), or None."""
        return self._meta(self._conn, "adaptation")

    def set_adaptation(self, mode: str) -> None:
        """Remember ``mode`` as this store's adaptation mode (models opened without one use it)."""
        self._derived(lambda conn: self._set_meta(conn, "adaptation", mode))

    def load_state(self, key: str, version: int) -> dict[str, np.ndarray] | None:
        """The arrays saved under ``key`` if they were fitted on data_version ``version``, else None."""
        row = self._conn.execute("SELECT data_version, state FROM adapter_state WHERE key = ?", (key,)).fetchone()
        if row is None or row[0] != version or self.needs_reembed:
            return None
        with np.load(io.BytesIO(row[1]), allow_pickle=False) as saved:
            return {name: saved[name] for name in saved.files}

    def save_state(self, key: str, version: int, arrays: Mapping[str, np.ndarray]) -> None:
        """Keep ``arrays`` under ``key`` as fitted on data_version ``version``; skipped when the shots
        changed since (the state would be stale) or before a re-embed."""
        buffer = io.BytesIO()
        np.savez(buffer, **cast("dict[str, Any]", arrays))  # numpy's stub types **kwds like allow_pickle

        def change(conn: sqlite3.Connection) -> None:
            if conn.execute("SELECT value FROM meta WHERE key = 'data_version'").fetchone()[0] == version:
                conn.execute(
                    "INSERT OR REPLACE INTO adapter_state (key, data_version, state) VALUES (?, ?, ?)",
                    (key, version, buffer.getvalue()),
                )

        if not self.needs_reembed:
            self._derived(change)

    def list_classes(self) -> list[tuple[str, int]]:
        """(label, number of shots) per class, in enrollment order."""
        rows = self._conn.execute(
            "SELECT c.label, count(s.id) FROM classes c LEFT JOIN shots s ON s.class_id = c.id GROUP BY c.id ORDER BY c.id"
        )
        return [(label, n) for label, n in rows]

    def shots(self, pixels: bool = True) -> Shots:
        """All shots with their embeddings (and pixels unless ``pixels=False``), in one read transaction."""
        conn = self._conn
        conn.execute("BEGIN")
        try:
            self._check_binding(conn)
            classes = conn.execute("SELECT id, label FROM classes ORDER BY id").fetchall()
            rows = conn.execute(
                f"SELECT id, class_id, embedding{', pixels' if pixels else ''} FROM shots ORDER BY class_id, id"
            ).fetchall()
            version = self.data_version()
            dim, pixel_shape = self._meta(conn, "embedding_size"), self.pixel_shape
        finally:
            conn.execute("COMMIT")
        index = {class_id: i for i, (class_id, _) in enumerate(classes)}
        n = len(rows)
        return Shots(
            ids=np.array([r[0] for r in rows], dtype=np.int64),
            labels=[label for _, label in classes],
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

    def add_class(self, label: str, embeddings: np.ndarray, pixels: np.ndarray, hashes: Sequence[str]) -> int:
        """Enroll a new class with its shots; error if the label exists. Returns the new data_version."""
        return self._add(label, embeddings, pixels, hashes, new_class=True)

    def add_shots(self, label: str, embeddings: np.ndarray, pixels: np.ndarray, hashes: Sequence[str]) -> int:
        """Add shots to an enrolled class. Returns the new data_version."""
        return self._add(label, embeddings, pixels, hashes, new_class=False)

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
        self._conn.close()

    def __enter__(self) -> EnrollmentStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _add(
        self, label: str, embeddings: np.ndarray, pixels: np.ndarray, hashes: Sequence[str], new_class: bool
    ) -> int:
        label = validate_label(label)
        embeddings = _as_embeddings(embeddings)
        pixels = np.ascontiguousarray(pixels, dtype=np.uint8)
        if pixels.ndim != 4:
            raise FewShotInputError(f"pixels must be (N, C, H, W), got shape {pixels.shape}")
        if not len(embeddings) == len(pixels) == len(hashes) > 0:
            raise FewShotInputError(
                f"need one or more shots with matching counts, got {len(embeddings)} embeddings, {len(pixels)} pixels, {len(hashes)} hashes"
            )

        def change(conn: sqlite3.Connection) -> None:
            for key, value in (
                ("embedding_size", str(embeddings.shape[1])),
                ("pixel_shape", ",".join(map(str, pixels.shape[1:]))),
            ):
                stored = self._meta(conn, key)
                if stored is None:
                    self._set_meta(conn, key, value)
                elif stored != value:
                    raise FewShotInputError(f"store holds {key} {stored}, got {value}")
            if new_class:
                try:
                    class_id = conn.execute("INSERT INTO classes (label) VALUES (?)", (label,)).lastrowid
                except sqlite3.IntegrityError:
                    raise FewShotInputError(f"class {label!r} already exists; use add_shots to add to it") from None
            else:
                class_id = _class_id(conn, label)
            conn.executemany(
                "INSERT INTO shots (class_id, embedding, pixels, source_hash) VALUES (?, ?, ?, ?)",
                (
                    (class_id, e.tobytes(), p.tobytes(), str(h))
                    for e, p, h in zip(embeddings, pixels, hashes, strict=True)
                ),
            )

        return self._write(change)

    def _write(self, change: Callable[[sqlite3.Connection], None], rebinding: bool = False) -> int:
        """Run ``change`` in one write transaction that also bumps data_version; return the new version."""
        if self.needs_reembed and not rebinding:
            raise FewShotInputError(
                f"enrollment store {self.name} holds embeddings of model {self.bound_model_id[:12]}; re-embed before changing it"
            )

        def bumped(conn: sqlite3.Connection) -> int:
            change(conn)
            return conn.execute(
                "UPDATE meta SET value = value + 1 WHERE key = 'data_version' RETURNING value"
            ).fetchall()[0][0]

        return self._derived(bumped)

    def _derived(self, change: Callable[[sqlite3.Connection], T]) -> T:
        """Run ``change`` in one write transaction (no data_version bump on its own); return its result."""
        conn = self._conn
        conn.execute("BEGIN IMMEDIATE")
        try:
            self._check_binding(conn)
            result = change(conn)
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
        return result

    def _check_binding(self, conn: sqlite3.Connection) -> None:
        bound = self._meta(conn, "model_id")
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
        if version < SCHEMA_VERSION:
            for step in range(version, SCHEMA_VERSION):
                for statement in _MIGRATIONS[step]:
                    conn.execute(statement)
            conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        bound = conn.execute("SELECT value FROM meta WHERE key = 'model_id'").fetchone()[0]
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise
    return bound


def _class_id(conn: sqlite3.Connection, label: object) -> int:
    row = conn.execute(
        "SELECT id FROM classes WHERE label = ?", (label.strip() if isinstance(label, str) else label,)
    ).fetchone()
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
