"""Issue 12, item 7: one FewShotModel shared by threads (a camera thread, a UI thread, a server's
workers): reads in parallel, writes serialised, no sqlite same-thread errors, no torn state."""

from __future__ import annotations

import sqlite3
import threading
import time

import numpy as np
import pytest
from runtime_support import images, make_bundle, weight

from fewshot_edge.runtime import FewShotModel
from fewshot_edge.runtime.model import _ReadWriteLock

LEVELS = (20, 70, 120, 170, 220)


@pytest.fixture
def model(tmp_path):
    make_bundle(tmp_path / "bundle", weight(0))
    with FewShotModel.open(tmp_path / "bundle", store=tmp_path / "s.db") as m:
        m.enroll("c20", images(20, 3, center=20, spread=4))
        yield m


def test_a_model_opened_in_one_thread_works_in_another(model):
    out: dict[str, object] = {}

    def work() -> None:
        try:
            model.enroll("c220", images(220, 2, center=220, spread=4))
            out["labels"] = [p.label for p in model.predict(images(9, 1, center=215, spread=4))]
            out["classes"] = model.classes()
        except BaseException as exc:  # reported below, in the test's thread
            out["error"] = exc

    thread = threading.Thread(target=work)
    thread.start()
    thread.join(30)
    assert "error" not in out, out.get("error")
    assert out == {"labels": ["c220"], "classes": [("c20", 3), ("c220", 2)]}


def test_threads_predicting_and_enrolling_at_once(model):
    errors: list[BaseException] = []
    seen: list[set[str]] = []
    stop = threading.Event()
    queries = images(5, 4, center=120, spread=30)

    def predictor() -> None:
        labels: set[str] = set()
        try:
            while not stop.is_set():
                predictions = model.predict(queries, top_k=3)
                probabilities = model.predict_proba(queries)
                assert np.allclose(probabilities.sum(1), 1.0, atol=1e-5)
                for p in predictions:
                    assert p.top_k[0][1] >= p.top_k[-1][1] and len(p.top_k) <= probabilities.shape[1]
                    labels.update(k for k, _ in p.top_k)
        except BaseException as exc:
            errors.append(exc)
        finally:
            seen.append(labels)

    def enroller(offset: int) -> None:
        try:
            for i in range(12):
                level = LEVELS[1 + (i + offset) % 4]
                model.enroll(f"t{offset}-{i}", images(100 * offset + i, 2, center=level, spread=6))
                model.add_shots(f"t{offset}-{i}", images(1000 + 100 * offset + i, 1, center=level, spread=6))
                if i % 4 == 3:
                    model.rename(f"t{offset}-{i}", f"r{offset}-{i}")
                if i % 5 == 4:
                    model.remove_class(f"t{offset}-{i}")
        except BaseException as exc:
            errors.append(exc)

    readers = [threading.Thread(target=predictor) for _ in range(4)]
    writers = [threading.Thread(target=enroller, args=(k,)) for k in range(2)]
    started = time.monotonic()
    for t in readers + writers:
        t.start()
    for t in writers:
        t.join(120)
    stop.set()
    for t in readers:
        t.join(120)
    assert not errors, errors[:3]
    assert time.monotonic() - started < 120
    expected = {"c20": 3}
    for k in range(2):
        for i in range(12):
            if i % 5 == 4 and i % 4 != 3:
                continue
            expected[f"{'r' if i % 4 == 3 else 't'}{k}-{i}"] = 3
    assert dict(model.classes()) == expected
    assert set(model.labels) == set(expected)
    assert all(labels for labels in seen)  # every reader got answers
    conn = sqlite3.connect(model.store.name)
    assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    conn.close()
    # after the writes, a fresh fit and the incremental one agree
    before = model.predict_proba(queries)
    model.refit()
    np.testing.assert_allclose(model.predict_proba(queries), before, atol=1e-5)


def test_reads_share_the_lock_and_a_write_waits_for_them():
    lock = _ReadWriteLock()
    inside = threading.Barrier(2, timeout=5)
    order: list[str] = []

    def reader(name: str) -> None:
        with lock.read():
            inside.wait()  # both readers are inside at once, or this times out
            time.sleep(0.05)
            order.append(name)

    def writer() -> None:
        time.sleep(0.01)
        with lock.write():
            order.append("write")

    threads = [threading.Thread(target=reader, args=(n,)) for n in ("r1", "r2")] + [threading.Thread(target=writer)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert sorted(order[:2]) == ["r1", "r2"] and order[2] == "write"
