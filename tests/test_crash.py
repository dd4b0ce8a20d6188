"""Crash test (issue 12): a process enrolling through FewShotModel (several classes per transaction,
then more shots for them) is SIGKILLed at random moments, again and again on one store; after every
kill the file passes sqlite's integrity check and every class is complete or absent."""

from __future__ import annotations

import os
import random
import signal
import sqlite3
import subprocess
import sys
import time

from runtime_support import make_bundle, weight

from fewshot_edge.runtime import EnrollmentStore, FewShotModel

KILLS = 24
CLASSES_PER_BATCH, SHOTS, MORE = 3, 40, 10

ENROLLER = """
import sys
import numpy as np
from fewshot_edge.runtime import FewShotModel
bundle, db, run = sys.argv[1], sys.argv[2], int(sys.argv[3])
classes, shots, more = (int(v) for v in sys.argv[4:7])
model = FewShotModel.open(bundle, store=db)
print("ready", flush=True)
for i in range(100000):
    rng = np.random.default_rng(run * 100000 + i)
    batch = {f"r{run}b{i}c{j}": list(rng.integers(0, 256, (shots, 8, 8), dtype=np.uint8)) for j in range(classes)}
    model.enroll_many(batch)
    extra = {label: list(rng.integers(0, 256, (more, 8, 8), dtype=np.uint8)) + given[:2] for label, given in batch.items()}
    model.enroll_many(extra, add=True)  # the two already stored are skipped
"""


def test_sigkill_while_enrolling_leaves_a_sound_store_with_whole_classes(tmp_path):
    bundle = tmp_path / "bundle"
    make_bundle(bundle, weight(0))
    db, rng = tmp_path / "crash.db", random.Random(0)
    started, kills, seen = time.monotonic(), 0, 0
    for run in range(KILLS):
        child = subprocess.Popen(
            [
                sys.executable,
                "-c",
                ENROLLER,
                str(bundle),
                str(db),
                str(run),
                str(CLASSES_PER_BATCH),
                str(SHOTS),
                str(MORE),
            ],
            stdout=subprocess.PIPE,
            text=True,
        )
        assert child.stdout is not None and child.stdout.readline() == "ready\n"
        time.sleep(rng.uniform(0.0, 0.25))
        os.kill(child.pid, signal.SIGKILL)
        child.wait()
        child.stdout.close()
        kills += child.returncode == -signal.SIGKILL

        conn = sqlite3.connect(db)
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        assert conn.execute("PRAGMA foreign_key_check").fetchall() == []
        conn.close()
        with FewShotModel.open(bundle, store=db, create=False) as model:
            classes = dict(model.classes())
            batches: dict[str, set[int]] = {}
            for label, n in classes.items():
                assert n in (SHOTS, SHOTS + MORE), (label, n)  # complete, never part of a write
                batches.setdefault(label.rsplit("c", 1)[0], set()).add(n)
            for name, counts in batches.items():
                members = [label for label in classes if label.rsplit("c", 1)[0] == name]
                assert len(members) == CLASSES_PER_BATCH and len(counts) == 1, (name, members, counts)
            assert model.store.data_version() == sum(2 if c == {SHOTS + MORE} else 1 for c in batches.values())
            if classes:
                model.predict(list(model.store.shots().pixels[:2, 0]))  # usable after the kill
            seen = len(classes)
    with EnrollmentStore.open(db, "ignored", reembed=True) as store:
        assert len(store.list_classes()) == seen
    assert kills >= 20 and seen > 3 * CLASSES_PER_BATCH
    assert time.monotonic() - started < 60
