"""Private row store: rows written by an interrupted attempt are invisible to its redo."""

from __future__ import annotations

import numpy as np

from fedrec.federated.private_store import PrivateRowStore, attempt_tag


def _store(tmp_path):
    initial = {"user_embedding.weight": np.arange(12, dtype=np.float32).reshape(6, 2)}
    return PrivateRowStore.create(str(tmp_path), initial), initial["user_embedding.weight"]


def test_reads_see_committed_rows_and_not_their_own_attempt(tmp_path):
    store, init = _store(tmp_path)
    users = np.array([1, 4])
    t0, t1 = attempt_tag(0, 0), attempt_tag(1, 0)
    assert np.array_equal(store.read(users, tag=t0)["user_embedding.weight"], init[users])
    store.write(users, {"user_embedding.weight": np.full((2, 2), 7.0)}, tag=t0)
    # A redo of attempt t0 (after a crash) starts from the rows as they were before it.
    assert np.array_equal(store.read(users, tag=t0)["user_embedding.weight"], init[users])
    # The next round sees the new rows.
    assert np.all(store.read(users, tag=t1)["user_embedding.weight"] == 7.0)
    # Redo of t0 writes again: the base is kept, the redo's rows replace the first try's.
    store.write(users, {"user_embedding.weight": np.full((2, 2), 8.0)}, tag=t0)
    assert np.array_equal(store.read(users, tag=t0)["user_embedding.weight"], init[users])
    assert np.all(store.read(users, tag=t1)["user_embedding.weight"] == 8.0)
    # Round 1 writes on top; a crash-redo of round 1 sees round 0's rows.
    store.write(users, {"user_embedding.weight": np.full((2, 2), 9.0)}, tag=t1)
    assert np.all(store.read(users, tag=t1)["user_embedding.weight"] == 8.0)
    assert np.all(store.read(users, tag=attempt_tag(2, 0))["user_embedding.weight"] == 9.0)
    # Untouched users keep their initial rows; every process sees the same files.
    reopened = PrivateRowStore.open(str(tmp_path), ["user_embedding.weight"])
    everyone = reopened.read_all(tag=attempt_tag(2, 0))["user_embedding.weight"]
    assert np.array_equal(everyone[[0, 2, 3, 5]], init[[0, 2, 3, 5]])
    assert np.all(everyone[users] == 9.0)


def test_a_later_attempt_of_the_same_round_sees_an_earlier_attempts_rows(tmp_path):
    store, _ = _store(tmp_path)
    users = np.array([2])
    store.write(users, {"user_embedding.weight": np.full((1, 2), 3.0)}, tag=attempt_tag(5, 0))
    # Attempt 1 of round 5 (a retry) keeps the client's local state from attempt 0, as a device would.
    assert np.all(store.read(users, tag=attempt_tag(5, 1))["user_embedding.weight"] == 3.0)
