"""The Criteo-like generator's statistics: Kaggle's missing shares, Zipf categories, 25 % clicks, a ~0.80 ceiling."""

from __future__ import annotations

import numpy as np
import pytest

from fedrec.data.synthetic import (
    INT_MISSING,
    KAGGLE_CARDINALITY,
    TARGET_ORACLE_AUC,
    CriteoSignal,
    auc,
    expected_auc,
)


@pytest.fixture(scope="module", params=[0, 1])
def rows(request):
    signal = CriteoSignal(seed=request.param, vocab_size=10_000)
    return signal, signal.draw(np.random.default_rng([request.param, 7]), 100_000)


def test_missing_integer_shares_are_kaggles(rows):
    _, drawn = rows
    missing = 1.0 - drawn["int_present"].mean(axis=0)
    np.testing.assert_allclose(missing, INT_MISSING, atol=0.01)
    # Several integer fields are empty 40-80 % of the time (I1, I10: 45 %; I12: 76 %).
    assert int(((missing > 0.4) & (missing < 0.8)).sum()) >= 3


def test_category_frequencies_follow_a_power_law_with_a_long_tail(rows):
    signal, drawn = rows
    field = int(np.argmax(signal.cardinality))
    _, counts = np.unique(drawn["ranks"][:, field], return_counts=True)
    counts = np.sort(counts)[::-1]
    head = counts[: signal.cardinality[field] // 100].sum() / counts.sum()
    assert head > 0.5  # the top 1 % of categories holds most occurrences
    assert (counts < 5).mean() > 0.4  # and most categories are rare
    # log-frequency against log-rank is close to a line of slope -1.1 (Zipf) over the head.
    ranks = np.arange(1, 201)
    slope = np.polyfit(np.log(ranks), np.log(counts[:200]), 1)[0]
    assert -1.4 < slope < -0.8
    # Small fields stay small (C9 3 values, C20 4), as in the Kaggle data.
    assert signal.cardinality[8] == 3 and signal.cardinality[19] == 4
    assert list(signal.cardinality) == [min(c, 10_000) for c in KAGGLE_CARDINALITY]


def test_label_rate_and_the_ceiling_near_080(rows):
    _, drawn = rows
    assert 0.24 < drawn["label"].mean() < 0.26
    probability = 1.0 / (1.0 + np.exp(-drawn["logit"]))
    assert abs(expected_auc(probability, drawn["logit"]) - TARGET_ORACLE_AUC) < 0.01
    assert abs(auc(drawn["label"], drawn["logit"]) - TARGET_ORACLE_AUC) < 0.015
    # Part of the signal is pairwise interactions: the additive part alone scores lower.
    assert auc(drawn["label"], drawn["additive"]) < auc(drawn["label"], drawn["logit"]) - 0.01


def test_expected_auc_matches_sampled_labels():
    rng = np.random.default_rng(0)
    score = rng.normal(size=2000)
    probability = 1.0 / (1.0 + np.exp(-2 * score))
    sampled = np.mean([auc(rng.random(2000) < probability, score) for _ in range(200)])
    assert expected_auc(probability, score) == pytest.approx(sampled, abs=0.003)
    # Ties count half: a constant score has expected AUC 0.5.
    assert expected_auc(probability, np.zeros(2000)) == pytest.approx(0.5)
