"""Rows of memory-mapped .npy arrays read from the file: the same values as indexing the map."""

from __future__ import annotations

import numpy as np
import pytest

import fedrec.data.file_rows as F
from fedrec.data.partition import natural_partition
from fedrec.federated.private_store import PrivateRowStore


def mapped(tmp_path, array: np.ndarray, name: str = "a.npy") -> np.memmap:
    path = tmp_path / name
    np.save(path, array)
    return np.load(path, mmap_mode="r")


def test_reads_equal_indexing_the_map(tmp_path):
    rng = np.random.default_rng(0)
    column = mapped(tmp_path, rng.integers(-5, 5, size=1000).astype(np.int32))
    table = mapped(tmp_path, rng.normal(size=(300, 2, 3)).astype(np.float32), "t.npy")
    assert F.backing_file(column) is not None and F.backing_file(table) is not None
    assert F.backing_file(column[10:]) is None and F.backing_file(np.asarray(column) + 0) is None
    assert np.array_equal(F.read_rows(column, 17, 530), column[17:530])
    assert np.array_equal(F.read_rows(column, 990, 2000), column[990:])  # clipped like a slice
    assert np.array_equal(F.read_rows(table, 5, 9), table[5:9])
    index = np.array([299, 0, 17, 17, 150])
    assert np.array_equal(F.read_items(table, index), table[index])
    assert F.read_items(table, np.array([], dtype=np.int64)).shape == (0, 2, 3)
    with pytest.raises(IndexError, match="row 300 out of range"):
        F.read_items(table, np.array([300]))
    chunks = list(F.scan_rows(column, 64))
    assert [start for start, _ in chunks] == list(range(0, 1000, 64))
    assert np.array_equal(np.concatenate([c for _, c in chunks]), column)
    assert np.array_equal(F.read_rows(np.arange(10), 2, 4), [2, 3])  # in memory: plain slicing


@pytest.mark.parametrize("chunk", [1, 7, 1 << 20])
def test_natural_partition_scans_a_mapped_column_in_chunks(tmp_path, monkeypatch, chunk):
    rng = np.random.default_rng(2)
    users = np.sort(rng.integers(0, 40, size=700)).astype(np.int32)
    monkeypatch.setattr(F, "SCAN_CHUNK_ROWS", chunk)
    partition = natural_partition(mapped(tmp_path, users), None, seed=0)
    distinct = np.unique(users)
    assert partition.order is None and partition.users.tolist() == distinct.tolist()
    for client, user in enumerate(distinct):
        assert partition.client_span(client) == (
            int(np.argmax(users == user)),
            int(700 - np.argmax(users[::-1] == user)),
        )
    shuffled = users.copy()
    shuffled[[100, 600]] = shuffled[[600, 100]]  # out of order across any chunk boundary: the sorting path
    reference = natural_partition(shuffled, None, seed=0)
    from_map = natural_partition(mapped(tmp_path, shuffled, "s.npy"), None, seed=0)
    assert from_map.order is not None and reference.order is not None
    for client in range(len(distinct)):
        assert np.array_equal(from_map.client_rows(client), reference.client_rows(client))


def test_private_store_reads_from_its_files_what_it_wrote(tmp_path):
    initial = np.arange(40 * 3, dtype=np.float32).reshape(40, 3)
    store = PrivateRowStore.create(str(tmp_path / "s"), {"user_emb": initial})
    store.write(np.array([3, 7]), {"user_emb": np.full((2, 3), -1.0, dtype=np.float32)}, tag=5)
    reopened = PrivateRowStore.open(str(tmp_path / "s"), ["user_emb"])
    assert F.backing_file(reopened.arrays["user_emb"].reshape(-1, 3)) is not None  # the file path is taken
    rows = reopened.read(np.array([7, 3, 0]), tag=6)["user_emb"]
    assert np.array_equal(rows, [[-1, -1, -1], [-1, -1, -1], initial[0]])
    # attempt 5 itself (a redo after a crash) still sees the rows from before its own write
    assert np.array_equal(reopened.read(np.array([3]), tag=5)["user_emb"], initial[[3]])


def test_rows_where_in_equals_a_mask_over_the_maps_chunk_by_chunk(tmp_path, monkeypatch):
    monkeypatch.setattr(F, "SCAN_CHUNK_ROWS", 64)  # several chunks, some without a kept row
    rng = np.random.default_rng(1)
    users = np.sort(rng.integers(0, 50, size=1000)).astype(np.int64)
    arrays = {
        "user": mapped(tmp_path, users, "user.npy"),
        "item": mapped(tmp_path, rng.integers(0, 9, size=1000).astype(np.int32), "item.npy"),
        "pair": mapped(tmp_path, rng.normal(size=(1000, 2)).astype(np.float32), "pair.npy"),
    }
    wanted = np.array([3, 17, 48])
    got = F.rows_where_in(arrays, "user", wanted)
    mask = np.isin(users, wanted)
    for name, array in arrays.items():
        np.testing.assert_array_equal(got[name], np.asarray(array)[mask])
        assert not isinstance(got[name], np.memmap)
    none = F.rows_where_in(arrays, "user", np.array([99]))
    assert none["pair"].shape == (0, 2) and none["item"].dtype == np.int32
