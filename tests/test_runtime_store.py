"""The enrollment store: round trips, labels, model binding, processes sharing it, crash safety."""

from __future__ import annotations

import os
import random
import signal
import sqlite3
import subprocess
import sys
import time

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from runtime_support import run_python

from fewshot_edge.runtime import EnrollmentStore, FewShotInputError, validate_label
from fewshot_edge.runtime.store import SCHEMA_VERSION, normalize_label

MODEL = "a" * 64
OTHER_MODEL = "b" * 64


def shots(n: int, seed: int = 0, dim: int = 4, shape: tuple = (1, 4, 4)):
    """n random (embeddings, pixels, hashes)."""
    rng = np.random.default_rng(seed)
    return (
        rng.normal(size=(n, dim)).astype(np.float32),
        rng.integers(0, 256, size=(n, *shape), dtype=np.uint8),
        [f"hash-{seed}-{i}" for i in range(n)],
    )


@pytest.fixture
def store(tmp_path):
    with EnrollmentStore.open(tmp_path / "device.db", MODEL) as s:
        yield s


def test_new_file_has_schema_version_wal_and_binding(tmp_path, store):
    conn = sqlite3.connect(tmp_path / "device.db")
    assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert dict(conn.execute("SELECT key, value FROM meta"))["model_id"] == MODEL
    assert store.list_classes() == [] and store.data_version() == 0 and store.pixel_shape is None


def test_enroll_add_remove_rename_round_trip(store):
    cat, dog, more = shots(3, 1), shots(2, 2), shots(2, 3)
    v1 = store.add_class("cat", *cat)
    v2 = store.add_class("dog", *dog)
    v3 = store.add_shots("cat", *more)
    assert (v1, v2, v3) == (1, 2, 3) == (1, 2, store.data_version())
    assert store.list_classes() == [("cat", 5), ("dog", 2)]
    assert store.pixel_shape == (1, 4, 4)

    s = store.shots()
    assert s.labels == ["cat", "dog"] and s.version == 3
    assert s.targets.tolist() == [0, 0, 0, 0, 0, 1, 1]
    np.testing.assert_array_equal(s.embeddings, np.concatenate([cat[0], more[0], dog[0]]))
    np.testing.assert_array_equal(s.pixels, np.concatenate([cat[1], more[1], dog[1]]))
    assert store.shots(pixels=False).pixels is None

    store.remove_shot(int(s.ids[0]))
    assert store.list_classes() == [("cat", 4), ("dog", 2)]
    np.testing.assert_array_equal(store.shots().embeddings[0], cat[0][1])

    store.rename("cat", "kitty")
    assert store.list_classes() == [("kitty", 4), ("dog", 2)]
    store.remove_class("kitty")
    assert store.list_classes() == [("dog", 2)]
    assert store.data_version() == 6
    assert sqlite3.connect(store.name).execute("SELECT count(*) FROM shots").fetchone()[0] == 2


def test_refused_changes_leave_store_and_version_unchanged(store):
    store.add_class("cat", *shots(2, 1))
    store.add_class("dog", *shots(1, 2))
    before = (store.list_classes(), store.data_version())
    with pytest.raises(FewShotInputError, match="already exists"):
        store.add_class("cat", *shots(1, 3))
    with pytest.raises(FewShotInputError, match="no class 'cow'"):
        store.add_shots("cow", *shots(1, 3))
    with pytest.raises(FewShotInputError, match="no class"):
        store.remove_class("cow")
    with pytest.raises(FewShotInputError, match="already exists"):
        store.rename("cat", "dog")
    with pytest.raises(FewShotInputError, match="last shot"):
        store.remove_shot(int(store.shots().ids[-1]))
    with pytest.raises(FewShotInputError, match="no shot"):
        store.remove_shot(999)
    with pytest.raises(FewShotInputError, match="embedding_size"):
        store.add_shots("cat", *shots(1, 3, dim=5))
    with pytest.raises(FewShotInputError, match="pixel_shape"):
        store.add_shots("cat", *shots(1, 3, shape=(3, 4, 4)))
    with pytest.raises(FewShotInputError, match="matching counts"):
        store.add_shots("cat", shots(2)[0], shots(1)[1], ["h"])
    with pytest.raises(FewShotInputError, match="NaN"):
        store.add_shots("cat", np.full((1, 4), np.nan, np.float32), *shots(1)[1:])
    assert (store.list_classes(), store.data_version()) == before


@pytest.mark.parametrize(
    "label, reason",
    [
        ("", "empty"),
        ("   ", "empty"),
        ("x" * 65, "longer than 64"),
        ("a/b", "'/'"),
        ("a\\b", "'\\\\'"),
        ("it's", '"\'"'),
        ('say "hi"', "'\"'"),
        ("tab\there", "control"),
        ("new\nline", "control"),
        ("unknown", "reserved"),
        (" Unknown ", "reserved"),
        (3, "string"),
    ],
)
def test_bad_labels_are_refused_with_one_line(store, label, reason):
    with pytest.raises(FewShotInputError) as info:
        store.add_class(label, *shots(1))
    assert reason in str(info.value) and "\n" not in str(info.value)
    assert store.list_classes() == []


@settings(max_examples=60, deadline=None)
@given(st.text(min_size=1, max_size=70))
def test_any_accepted_label_round_trips_stripped(label):
    try:
        expected = validate_label(label)
    except FewShotInputError:
        return
    with EnrollmentStore.open(None, MODEL) as s:
        s.add_class(label, *shots(1))
        assert s.list_classes() == [(expected, 1)] == [(normalize_label(label), 1)]


def test_store_bound_to_another_model_is_refused_unless_reembed(tmp_path, store):
    store.add_class("cat", *shots(2, 1))
    with pytest.raises(FewShotInputError, match=f"bound to model {MODEL[:12]}, not {OTHER_MODEL[:12]}") as info:
        EnrollmentStore.open(store.name, OTHER_MODEL)
    assert "reembed=True" in str(info.value) and "\n" not in str(info.value)

    other = EnrollmentStore.open(store.name, OTHER_MODEL, reembed=True)
    assert other.needs_reembed
    with pytest.raises(FewShotInputError, match="re-embed"):
        other.add_class("dog", *shots(1, 2))
    s = other.shots()
    with pytest.raises(FewShotInputError, match="changed while re-embedding"):
        other.rebind(s.ids[:1], np.ones((1, 8), np.float32))
    other.rebind(s.ids, np.ones((2, 8), np.float32))
    assert not other.needs_reembed
    np.testing.assert_array_equal(other.shots().embeddings, np.ones((2, 8), np.float32))
    other.add_class("dog", *shots(1, 2, dim=8))
    assert other.list_classes() == [("cat", 2), ("dog", 1)]

    with pytest.raises(FewShotInputError, match="re-bound"):
        store.add_shots("cat", *shots(1, 3))
    with pytest.raises(FewShotInputError, match="re-bound"):
        store.shots()
    EnrollmentStore.open(store.name, OTHER_MODEL).close()
    other.close()


def test_foreign_or_newer_files_are_refused(tmp_path):
    (tmp_path / "junk.db").write_bytes(b"not a database at all" * 100)
    with pytest.raises(FewShotInputError, match="cannot open enrollment store"):
        EnrollmentStore.open(tmp_path / "junk.db", MODEL)
    conn = sqlite3.connect(tmp_path / "other.db")
    conn.execute("CREATE TABLE t (x)")
    conn.commit()
    with pytest.raises(FewShotInputError, match="other tables"):
        EnrollmentStore.open(tmp_path / "other.db", MODEL)
    EnrollmentStore.open(tmp_path / "new.db", MODEL).close()
    conn = sqlite3.connect(tmp_path / "new.db")
    conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    conn.commit()
    with pytest.raises(FewShotInputError, match=f"schema version {SCHEMA_VERSION + 1}"):
        EnrollmentStore.open(tmp_path / "new.db", MODEL)


WRITER = """
import sys
import numpy as np
from fewshot_edge.runtime import EnrollmentStore
with EnrollmentStore.open(sys.argv[1], sys.argv[2]) as store:
    store.add_class("bird", np.full((3, 4), 7, np.float32), np.zeros((3, 1, 4, 4), np.uint8), ["a", "b", "c"])
"""


def test_class_enrolled_by_a_writer_process_is_visible_to_a_reader(store):
    store.add_class("cat", *shots(1))
    version = store.data_version()
    run_python(WRITER, store.name, MODEL)
    assert store.data_version() == version + 1
    assert store.list_classes() == [("cat", 1), ("bird", 3)]
    np.testing.assert_array_equal(store.shots().embeddings[1:], np.full((3, 4), 7, np.float32))


ENROLLER = """
import sys
import numpy as np
from fewshot_edge.runtime import EnrollmentStore
db, run, shots = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
store = EnrollmentStore.open(db, "m")
print("ready", flush=True)
for i in range(100000):
    emb = np.full((shots, 16), run * 1000 + i, np.float32) + np.arange(shots, dtype=np.float32)[:, None]
    pix = np.full((shots, 3, 32, 32), i % 256, np.uint8)
    store.add_class(f"r{run}-c{i}", emb, pix, [str(j) for j in range(shots)])
"""


def test_sigkill_during_enrollment_leaves_only_whole_classes(tmp_path):
    db, n_shots, rng = tmp_path / "crash.db", 24, random.Random(0)
    committed = 0
    for run in range(10):
        child = subprocess.Popen(
            [sys.executable, "-c", ENROLLER, str(db), str(run), str(n_shots)], stdout=subprocess.PIPE, text=True
        )
        assert child.stdout.readline() == "ready\n"
        time.sleep(rng.uniform(0.0, 0.15))
        os.kill(child.pid, signal.SIGKILL)
        child.wait()
        child.stdout.close()

        conn = sqlite3.connect(db)
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        conn.close()
        with EnrollmentStore.open(db, "m") as store:
            classes = store.list_classes()
            assert all(n == n_shots for _, n in classes), classes
            mine = [label for label, _ in classes if label.startswith(f"r{run}-")]
            assert mine == [f"r{run}-c{i}" for i in range(len(mine))]
            s = store.shots()
            for k, label in enumerate(s.labels):
                r, i = (int(part[1:]) for part in label.split("-"))
                rows = s.targets == k
                np.testing.assert_array_equal(s.embeddings[rows, 0], r * 1000 + i + np.arange(n_shots))
                assert (s.pixels[rows] == i % 256).all()
            assert store.data_version() == len(classes)
            committed = len(classes)
    assert committed > 10


def test_a_schema_1_store_is_upgraded_in_place_keeping_its_classes(tmp_path):
    path = tmp_path / "old.db"
    with EnrollmentStore.open(path, MODEL) as s:
        s.add_class("cat", *shots(2))
    conn = sqlite3.connect(path)  # what a schema-1 runtime wrote: no adapter_state table
    conn.executescript("DROP TABLE adapter_state; PRAGMA user_version = 1;")
    conn.close()
    with EnrollmentStore.open(path, MODEL) as s:
        assert s.list_classes() == [("cat", 2)]
        version = s.data_version()
        s.save_state("finetune:x", version, {"weight": np.eye(2)})
        np.testing.assert_array_equal(s.load_state("finetune:x", version)["weight"], np.eye(2))
        assert s.load_state("finetune:x", version + 1) is None and s.data_version() == version  # derived: no bump
        s.add_shots("cat", *shots(1, seed=1))
        assert s.load_state("finetune:x", s.data_version()) is None  # the shots changed: the state is stale
    assert sqlite3.connect(path).execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION == 2


def test_state_is_not_saved_for_a_set_that_changed_meanwhile(tmp_path, store):
    store.add_class("cat", *shots(2))
    fitted_on = store.data_version()
    store.add_class("dog", *shots(2, seed=3))  # another process enrolled while the head was being fitted
    store.save_state("finetune:x", fitted_on, {"weight": np.ones(3)})
    assert store.load_state("finetune:x", fitted_on) is None
