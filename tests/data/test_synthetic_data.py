"""Synthetic generators: real raw formats, deterministic by seed, with the planted signal."""

from __future__ import annotations

import numpy as np
from criteo_reference import expected_arrays, reference_rows

from fedrec.data import movielens
from fedrec.data.synthetic import INT_MISSING, CriteoSignal, auc, write_criteo, write_movielens


def test_criteo_deterministic_by_seed(tmp_path):
    paths = [tmp_path / name for name in ("a.txt", "b.txt", "c.txt")]
    write_criteo(str(paths[0]), rows=3000, seed=4, vocab_size=200)
    write_criteo(str(paths[1]), rows=3000, seed=4, vocab_size=200)
    write_criteo(str(paths[2]), rows=3000, seed=5, vocab_size=200)
    assert paths[0].read_bytes() == paths[1].read_bytes()
    assert paths[0].read_bytes() != paths[2].read_bytes()


def test_criteo_format_and_missing_fields(tmp_path):
    path = tmp_path / "train.txt"
    facts = write_criteo(str(path), rows=20000, seed=0, vocab_size=500)
    data = path.read_bytes()
    rows, _, bad = reference_rows(data)
    assert bad == [] and len(rows) == 20000
    ints = np.array([r[1] for r in rows])
    raw_ints = [line.split(b"\t")[1:14] for line in data.split(b"\n")[:2000]]
    empty_rate = np.mean([[f == b"" for f in line] for line in raw_ints], axis=0)
    np.testing.assert_allclose(empty_rate, INT_MISSING, atol=0.05)
    assert (ints[:, 1] < 0).any()  # I2 is sometimes negative, as in the real data
    keys = expected_arrays(rows)["cat"]
    assert (keys == 0).any(axis=0).sum() >= 10  # empty categoricals in several fields
    distinct = [len(np.unique(keys[:, f][keys[:, f] > 0])) for f in range(26)]
    assert max(distinct) <= 500 and min(distinct) == 3  # C9 has 3 values, as in the Kaggle data
    # Zipf-like: the most frequent category of a field is far above uniform.
    _, counts = np.unique(keys[:, 0], return_counts=True)
    assert counts.max() > 20 * len(keys) / 500
    assert 0.22 < facts["positive_rate"] < 0.28
    assert 0.78 < facts["oracle_auc"] < 0.88


def test_planted_signal_is_learnable_and_absent_without_features():
    signal = CriteoSignal(seed=0, vocab_size=100)
    rows = signal.draw(np.random.default_rng([0, 1]), 40000)
    assert 0.78 < auc(rows["label"], rows["logit"]) < 0.88
    # A constant score has AUC 0.5; so does a score unrelated to the planted model.
    assert auc(rows["label"], np.zeros(len(rows["label"]))) == 0.5
    assert abs(auc(rows["label"], np.random.default_rng(3).random(len(rows["label"]))) - 0.5) < 0.02


def test_movielens_format_and_signal(tmp_path):
    path = tmp_path / "u.data"
    facts = write_movielens(str(path), rows=5000, seed=1, users=100, items=300, rank=4)
    again = tmp_path / "again.data"
    write_movielens(str(again), rows=5000, seed=1, users=100, items=300, rank=4)
    assert path.read_bytes() == again.read_bytes()
    table = np.loadtxt(path, dtype=np.int64)
    assert table.shape == (5000, 4)
    assert set(np.unique(table[:, 2])) <= {1, 2, 3, 4, 5}
    assert (np.diff(table[:, 3]) > 0).all()  # timestamps increase down the file
    pairs = table[:, 0] * 1000 + table[:, 1]
    assert len(np.unique(pairs)) == 5000  # each user rates an item once
    assert len(np.unique(table[:, 0])) == 100 and table[:, 0].min() == 1
    assert facts["planted_rmse"] < 0.7 * facts["global_mean_rmse"]
    assert movielens.detect_format(str(path)) == "ml-100k"
