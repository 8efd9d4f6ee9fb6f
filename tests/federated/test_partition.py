"""Partitions: every training row goes to exactly one client, deterministically; bad sizes are errors."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedrec.data.partition import (
    Partition,
    dirichlet_partition,
    iid_partition,
    make_partition,
    natural_partition,
    partition_statistics,
)
from fedrec.errors import ConfigError, DataError


def _rows_of(partition: Partition) -> list[np.ndarray]:
    return [partition.client_rows(c) for c in range(partition.num_clients)]


def _assert_exact_cover(partition: Partition, num_rows: int) -> None:
    rows = np.concatenate(_rows_of(partition))
    assert np.array_equal(np.sort(rows), np.arange(num_rows))


@settings(max_examples=30, deadline=None)
@given(st.integers(1, 400), st.integers(1, 50), st.integers(0, 3))
def test_iid_covers_every_row_once_with_near_equal_sizes(num_rows, num_clients, seed):
    if num_clients > num_rows:
        with pytest.raises(ConfigError, match="too few to give each worker a sample"):
            iid_partition(num_rows, num_clients, seed=seed)
        return
    partition = iid_partition(num_rows, num_clients, seed=seed)
    _assert_exact_cover(partition, num_rows)
    assert partition.sizes().max() - partition.sizes().min() <= 1


@settings(max_examples=30, deadline=None)
@given(st.integers(20, 500), st.integers(1, 20), st.floats(0.01, 100.0), st.integers(0, 3))
def test_dirichlet_covers_every_row_once_with_equal_sizes(num_rows, num_clients, alpha, seed):
    labels = (np.random.default_rng(seed).random(num_rows) < 0.3).astype(np.float32)
    partition = dirichlet_partition(labels, num_clients, alpha=alpha, seed=seed)
    _assert_exact_cover(partition, num_rows)
    assert partition.sizes().min() >= 1
    assert partition.sizes().max() - partition.sizes().min() <= 1


def test_dirichlet_skew_falls_as_alpha_grows_and_is_deterministic():
    labels = (np.random.default_rng(0).random(20000) < 0.25).astype(np.float32)
    skew = []
    for alpha in (0.05, 0.5, 100.0):
        partition = dirichlet_partition(labels, 200, alpha=alpha, seed=7)
        skew.append(partition_statistics(partition, labels)["mean_tv_distance_to_global_mix"])
    assert skew[0] > skew[1] > skew[2]
    assert skew[2] < 0.08
    a = dirichlet_partition(labels, 200, alpha=0.5, seed=7)
    b = dirichlet_partition(labels, 200, alpha=0.5, seed=7)
    c = dirichlet_partition(labels, 200, alpha=0.5, seed=8)
    assert np.array_equal(a.order, b.order) and np.array_equal(a.offsets, b.offsets)
    assert not np.array_equal(a.order, c.order)


def test_natural_keeps_each_user_on_one_client():
    rng = np.random.default_rng(0)
    users = rng.integers(0, 50, size=2000)
    one_each = natural_partition(users, None, seed=0)
    assert one_each.num_clients == len(np.unique(users))
    _assert_exact_cover(one_each, len(users))
    grouped = natural_partition(users, 7, seed=0)
    _assert_exact_cover(grouped, len(users))
    owner = {}
    for client in range(grouped.num_clients):
        client_users = grouped.client_users(client)
        assert set(users[grouped.client_rows(client)]) == set(client_users)
        for u in client_users:
            assert owner.setdefault(int(u), client) == client
    with pytest.raises(ConfigError, match="only 50 users"):
        natural_partition(users, 51, seed=0)


def test_make_partition_errors_name_the_key():
    arrays = {"label": np.zeros(10, dtype=np.float32)}
    with pytest.raises(ConfigError, match="natural"):
        make_partition("natural", arrays, 5, seed=0)
    with pytest.raises(ConfigError, match=r"fl\.num_workers"):
        make_partition("iid", arrays, None, seed=0)
    with pytest.raises(ConfigError, match="--num_workers 11"):
        make_partition("dirichlet", arrays, 11, seed=0)


def test_save_load_round_trip_without_pickle(tmp_path):
    users = np.random.default_rng(1).integers(0, 30, size=500)
    partition = natural_partition(users, 10, seed=3)
    path = str(tmp_path / "p.npz")
    partition.save(path)
    loaded = Partition.load(path)
    assert loaded.kind == "natural" and loaded.num_clients == 10
    for client in range(10):
        assert np.array_equal(loaded.client_rows(client), partition.client_rows(client))
        assert np.array_equal(loaded.client_users(client), partition.client_users(client))
    (tmp_path / "bad.npz").write_bytes(b"not a zip")
    with pytest.raises(DataError, match=r"bad\.npz"):
        Partition.load(str(tmp_path / "bad.npz"))
    with pytest.raises(DataError, match="out of range"):
        loaded.client_rows(10)
