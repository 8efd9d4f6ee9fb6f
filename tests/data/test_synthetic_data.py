"""Synthetic generators: real raw formats, deterministic by seed, with the planted signal."""

from __future__ import annotations

import numpy as np
import pytest
from criteo_reference import expected_arrays, reference_rows

from fedrec.config import load_config
from fedrec.data import movielens
from fedrec.data.synthetic import (
    INT_MISSING,
    CriteoSignal,
    auc,
    write_criteo,
    write_movielens,
    write_movielens_preset,
)
from fedrec.data.synthetic_movielens import draw_all as draw_movielens
from fedrec.data.synthetic_movielens import resolve_preset
from fedrec.data.synthetic_movielens import summary_statistics as movielens_statistics
from fedrec.errors import ConfigError


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


# ----------------------------------------------------------------------------- realistic MovieLens


def preset_table(tmp_path, preset, seed=0):
    path = tmp_path / f"{preset.name}-{seed}.data"
    write_movielens_preset(str(path), preset, seed=seed)
    return path, np.loadtxt(path, dtype=np.int64)


def test_ml100k_preset_matches_the_real_statistics(tmp_path):
    path, table = preset_table(tmp_path, resolve_preset("ml-100k"))
    assert movielens.detect_format(str(path)) == "ml-100k"
    user, item, rating = table[:, 0] - 1, table[:, 1] - 1, table[:, 2]
    stats = movielens_statistics(user, item, rating)
    assert (stats["ratings"], stats["users"], stats["items"]) == (100_000, 943, 1682)
    assert abs(stats["density"] - 0.063) < 0.001
    assert abs(stats["mean"] - 3.53) < 0.03 and abs(stats["sd"] - 1.13) < 0.03
    assert set(np.unique(rating)) == {1, 2, 3, 4, 5}
    shares = np.bincount(rating, minlength=6)[1:] / len(rating)
    np.testing.assert_allclose(shares, [0.061, 0.114, 0.272, 0.342, 0.212], atol=0.01)
    # Long-tailed activity: everyone at least 20, median near the real 65, a few users in the hundreds.
    assert stats["user_min"] == 20 and 50 <= stats["user_median"] <= 80 and 500 <= stats["user_max"] <= 742
    # Power-law-like popularity: some items rated once, the head in the hundreds, median in the tens.
    assert stats["item_min"] == 1 and 10 <= stats["item_median"] <= 40 and 350 <= stats["item_max"] <= 700
    assert len(np.unique(user * 10_000 + item)) == len(user)  # each user rates an item once


def test_presets_are_deterministic_by_seed(tmp_path):
    preset = resolve_preset("ml-100k", users=100, items=300)
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
    a, _ = preset_table(tmp_path / "a", preset, seed=3)
    b, _ = preset_table(tmp_path / "b", preset, seed=3)
    c, _ = preset_table(tmp_path / "b", preset, seed=4)
    assert a.read_bytes() == b.read_bytes() != c.read_bytes()


def test_later_ratings_are_rarer_items_and_drift():
    """The last rating of a user is harder to predict: rarer items and a drifting user bias."""
    drawn = draw_movielens(resolve_preset("ml-100k"), seed=0)
    user, item, rating, stamp = drawn["user"], drawn["item"], drawn["rating"], drawn["timestamp"]
    order = np.lexsort((stamp, user))
    user, item, rating = user[order], item[order], rating[order]
    counts = np.bincount(user)
    position = np.arange(len(user)) - np.concatenate(([0], np.cumsum(counts)[:-1]))[user]
    late = position >= counts[user] * 3 // 4
    early = position < counts[user] // 4
    popularity = np.bincount(item)[item]
    assert np.median(popularity[late]) < 0.5 * np.median(popularity[early])

    # Per-user change of the mean rating from the first to the last quarter: wider than in the same
    # ratings in a random order within each user (no drift).
    def spread(r):
        first = np.bincount(user[early], r[early], len(counts)) / np.bincount(
            user[early], minlength=len(counts)
        )
        last = np.bincount(user[late], r[late], len(counts)) / np.bincount(user[late], minlength=len(counts))
        return np.std(last - first)

    shuffled = rating[np.lexsort((np.random.default_rng(0).random(len(user)), user))]
    assert spread(rating.astype(float)) > 1.3 * spread(shuffled.astype(float))


def test_ml1m_and_population_presets_follow_their_laws():
    ml1m = resolve_preset("ml-1m")
    assert (ml1m.users, ml1m.items, ml1m.rows) == (6040, 3706, 1_000_209)
    population = resolve_preset("population-1m")
    assert population.users == 1_000_000 and population.rows > 100 * population.users
    # Scaled-down draws (same per-user law, fewer users): sizes scale with the users.
    for name, users, mean_per_user in (("ml-1m", 604, 165.6), ("population-1m", 2000, 105.0)):
        preset = resolve_preset(name, users=users)
        assert abs(preset.rows / users - mean_per_user) < 0.5
        drawn = draw_movielens(preset, seed=1)
        stats = movielens_statistics(drawn["user"], drawn["item"], drawn["rating"])
        assert stats["ratings"] == preset.rows and stats["users"] == users
        assert stats["user_min"] == 20 and stats["user_median"] < 0.8 * mean_per_user  # a long tail
        assert abs(stats["mean"] - 3.53) < 0.03 and abs(stats["sd"] - 1.13) < 0.03


def test_preset_config_keys(tmp_path):
    cfg = load_config("configs/mf_movielens.yml", ["model.preproc.synthetic.preset=ml-1m"])
    s = cfg.model.preproc.synthetic
    assert (s.users, s.items, s.rows) == (6040, 3706, 1_000_209)
    cfg = load_config(
        "configs/mf_movielens.yml", ["model.preproc.synthetic.users=100", "model.preproc.synthetic.items=300"]
    )
    s = cfg.model.preproc.synthetic
    assert (s.preset, s.users, s.items, s.rows) == ("ml-100k", 100, 300, round(100_000 * 100 / 943))
    with pytest.raises(ConfigError, match=r"synthetic\.preset.*ml-100k"):
        load_config("configs/mf_movielens.yml", ["model.preproc.synthetic.preset=ml-10m"])
    with pytest.raises(ConfigError, match=r"synthetic\.rows.*at least 20"):
        load_config(
            "configs/mf_movielens.yml",
            ["model.preproc.synthetic.users=100", "model.preproc.synthetic.rows=500"],
        )
    # Criteo keeps its own default line count.
    assert load_config("configs/dlrm.yml").model.preproc.synthetic.rows > 0
