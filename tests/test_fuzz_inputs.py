"""Fuzzing (issue 12): random bytes as an enrollment store and as an image give a one-line
FewShotInputError or success, never another exception. Bounded examples, so CI runs them."""

from __future__ import annotations

import io
import os
import sqlite3
import tempfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from fewshot_edge.runtime import EnrollmentStore, FewShotInputError, InputSpec
from fewshot_edge.runtime.preprocess import decode_image, to_pixels

MODEL = "m" * 64
SPECS = (InputSpec(channels=1, height=8, width=8), InputSpec(channels=3, height=8, width=8, crop_mode="center"))
# more examples locally: FEWSHOT_EDGE_FUZZ_EXAMPLES=2000
FUZZ = settings(
    max_examples=int(os.environ.get("FEWSHOT_EDGE_FUZZ_EXAMPLES", "60")),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)


def one_line_or_success(action) -> None:
    try:
        action()
    except FewShotInputError as exc:
        assert str(exc).strip() and "\n" not in str(exc), repr(exc)


def use_store(path: Path) -> None:
    with EnrollmentStore.open(path, MODEL, reembed=True) as store:
        store.list_classes()
        shots = store.shots()
        store.data_version()
        store.load_state("prototype", shots.version)
        store.pixel_shape  # noqa: B018 (read for its errors)


def store_file() -> bytes:
    """A small valid store's bytes, checkpointed into the main file."""
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "s.db"
        rng = np.random.default_rng(0)
        with EnrollmentStore.open(path, MODEL) as store:
            for label in ("cat", "dog"):
                store.add_class(
                    label, rng.normal(size=(3, 4)).astype(np.float32), np.zeros((3, 1, 4, 4), np.uint8), list("abc")
                )
            store.save_state("prototype", store.data_version(), {"w": np.ones(3)})
        conn = sqlite3.connect(path)
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        conn.execute("PRAGMA journal_mode=DELETE")
        conn.close()
        return path.read_bytes()


VALID_STORE = store_file()


@FUZZ
@given(st.binary(max_size=4096) | st.binary(max_size=2048).map(lambda b: b"SQLite format 3\x00" + b))
def test_random_bytes_as_a_store(tmp_path_factory, data):
    path = tmp_path_factory.mktemp("fuzz") / "s.db"
    path.write_bytes(data)
    one_line_or_success(lambda: use_store(path))


@FUZZ
@given(st.lists(st.tuples(st.integers(0, len(VALID_STORE) - 1), st.integers(0, 255)), min_size=1, max_size=20))
def test_a_store_with_random_bytes_changed(tmp_path_factory, edits):
    data = bytearray(VALID_STORE)
    for offset, value in edits:
        data[offset] = value
    path = tmp_path_factory.mktemp("fuzz") / "s.db"
    path.write_bytes(bytes(data))
    one_line_or_success(lambda: use_store(path))


def encoded(fmt: str) -> bytes:
    buffer = io.BytesIO()
    image = Image.fromarray(np.arange(64, dtype=np.uint8).reshape(8, 8)).convert("RGB" if fmt == "JPEG" else "L")
    image.save(buffer, format=fmt)
    return buffer.getvalue()


HEADERS = [encoded(fmt) for fmt in ("PNG", "JPEG", "GIF", "BMP", "TIFF", "WEBP")]


@FUZZ
@given(
    st.binary(max_size=2048)
    | st.tuples(st.sampled_from(HEADERS), st.integers(0, 200), st.binary(max_size=64)).map(
        lambda t: t[0][: t[1]] + t[2]  # a real image's start, then garbage
    )
    | st.tuples(
        st.sampled_from(HEADERS), st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 255)), max_size=8)
    ).map(
        lambda t: bytes(
            b if not any(o % len(t[0]) == i for o, _ in t[1]) else next(v for o, v in t[1] if o % len(t[0]) == i)
            for i, b in enumerate(t[0])
        )
    ),
    st.sampled_from(SPECS),
)
def test_random_bytes_as_an_image(tmp_path_factory, data, spec):
    one_line_or_success(lambda: decode_image(data, "fuzz"))
    path = tmp_path_factory.mktemp("fuzz") / "image.bin"
    path.write_bytes(data)
    one_line_or_success(lambda: to_pixels(path, spec))


def damaged_copy(tmp_path: Path, statement: str) -> Path:
    """The valid store with one SQL statement run on it (what a fuzz example found, pinned)."""
    path = tmp_path / "s.db"
    path.write_bytes(VALID_STORE)
    conn = sqlite3.connect(path)
    conn.execute(statement)
    conn.commit()
    conn.close()
    return path


def test_what_fuzzing_found_stays_fixed(tmp_path):
    path = damaged_copy(tmp_path, "UPDATE adapter_state SET state = x'504b0304deadbeef'")
    with EnrollmentStore.open(path, MODEL) as store:  # a damaged saved state is derived data: refit
        assert store.load_state("prototype", store.data_version()) is None
    for statement, message in (
        ("PRAGMA user_version = -2", "schema version -2"),
        ("UPDATE classes SET label = CAST(x'80ff' AS TEXT) WHERE label = 'cat'", "decode to UTF-8"),
        ("UPDATE shots SET embedding = x'00' WHERE id = 1", "do not match its meta rows"),
        ("UPDATE meta SET value = 'x' WHERE key = 'data_version'", "not a number"),
    ):
        path.unlink()
        path = damaged_copy(tmp_path, statement)
        with pytest.raises(FewShotInputError, match=message) as info:
            use_store(path)
        assert "\n" not in str(info.value)
