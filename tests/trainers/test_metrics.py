"""Metrics against brute-force definitions."""

from __future__ import annotations

import math

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from fedrec.trainers import metrics as M


def brute_auc(labels, scores):
    pos = [s for s, y in zip(scores, labels) if y]
    neg = [s for s, y in zip(scores, labels) if not y]
    total = sum(1.0 if p > n else 0.5 if p == n else 0.0 for p in pos for n in neg)
    return total / (len(pos) * len(neg))


@settings(max_examples=50, deadline=None)
@given(st.lists(st.tuples(st.booleans(), st.integers(0, 5)), min_size=2, max_size=40))
def test_auc_matches_pairwise_definition(rows):
    labels = [y for y, _ in rows]
    scores = [float(s) for _, s in rows]
    auc = M.roc_auc(np.array(labels), np.array(scores))
    if all(labels) or not any(labels):
        assert math.isnan(auc)
    else:
        assert math.isclose(auc, brute_auc(labels, scores), abs_tol=1e-12)


def test_logloss_accuracy_rmse_mae():
    y = np.array([1, 0, 1, 0])
    p = np.array([0.9, 0.2, 0.4, 0.6])
    expected = -np.mean([math.log(0.9), math.log(0.8), math.log(0.4), math.log(0.4)])
    assert math.isclose(M.log_loss(y, p), expected, rel_tol=1e-9)
    assert M.accuracy(y, p) == 0.5
    assert math.isclose(M.rmse([1, 2], [2, 4]), math.sqrt(2.5))
    assert M.mae([1, 2], [2, 4]) == 1.5


def test_hit_rate_and_ndcg():
    pos = np.array([5.0, 1.0, 3.0])
    neg = np.array([[1.0] * 20, [2.0] * 20, [4.0, 4.0] + [0.0] * 18])
    hr, ndcg = M.hit_rate_and_ndcg(pos, neg, k=10)
    # user 0: rank 0 (hit, 1.0); user 1: rank 20 (miss); user 2: rank 2 (hit, 1/log2(4) = 0.5)
    assert math.isclose(hr, 2 / 3)
    assert math.isclose(ndcg, (1.0 + 0.5) / 3)


def test_negative_sampling_avoids_rated_items():
    users = np.array([0, 0, 1, 1, 1])
    items = np.array([1, 3, 0, 1, 2])
    indptr, rated = M.rated_csr(users, items, 2)
    rng = np.random.default_rng(0)
    neg, usable = M.sample_negatives(np.array([0, 1]), indptr, rated, 6, 3, rng)
    assert usable.all()
    assert not np.isin(neg[0], [1, 3]).any()
    assert not np.isin(neg[1], [0, 1, 2]).any()
    # A user who rated all but two items cannot be ranked against three negatives.
    indptr, rated = M.rated_csr(np.zeros(4, dtype=int), np.arange(4), 1)
    _, usable = M.sample_negatives(np.array([0]), indptr, rated, 6, 3, rng)
    assert not usable.any()
